//! How cost grows on the embedded transport: throughput and latency against concurrency,
//! FIFO groups and payload size, resident memory per queued message, and latency at fixed
//! offered rates, in one run.
//!
//! ```text
//! cargo bench -p sourceflow --bench scaling
//! ```
//!
//! Every row starts its own runtime (defaults: idempotency on with the memory store,
//! telemetry off) on a fresh `MemoryTransport`, with 2 tokio worker threads. Latency is
//! always *send → handler start*: the sender writes a timestamp into the payload just
//! before `Handle::send`, and the handler's first statement subtracts it from the clock.
//!
//! What each table's rows measure:
//!
//! * **Axes** (concurrency, FIFO groups, payload size), one row per setting. Two figures per
//!   row, from the same runtime:
//!   - *saturated msg/s*: `SATURATED` messages sent as fast as 4 producer tasks can, timed
//!     from the first send until the last handler started (one handler run = one message);
//!   - *light load p50 / p99 / max*: then `LIGHT_MESSAGES` messages offered at a fixed
//!     `LIGHT_RATE` msg/s (far below saturation), paced by a 1 ms tokio interval, and the
//!     latency of each.
//!
//!   The concurrency rows use a standard queue and 100-byte payloads; the FIFO rows a FIFO
//!   queue, concurrency 10, 100-byte payloads, message `i` in group `i % groups`; the
//!   payload rows a standard queue and concurrency 10. The payload size is the length of a
//!   string field in the command (the envelope and the other fields add ~400 bytes).
//! * **Memory**: resident set size (`VmRSS` of `/proc/self/status`) of a service that sends
//!   100,000 commands to a queue no one consumes, read before and after the sends (after
//!   the runtime started), as MiB per 100,000 queued messages. Measured first, before any
//!   other row has grown the heap, and both sizes kept alive until both are read, so the
//!   second does not reuse the first's freed memory.
//! * **Offered rate**: the orders flow of `benches/throughput.rs` (a command on a FIFO
//!   queue with 1,000 groups, whose handler raises an event on a topic, whose handler
//!   records), concurrency 10, offered at 1,000 / 10,000 / 50,000 commands/s for
//!   `RATE_SECONDS` each (paced by a 1 ms interval, so at 50,000/s 50 commands leave
//!   together each millisecond). *command → handler* is the command handler's start,
//!   *command → event → handler* the event handler's start, both from the command's send.
//!   *achieved* is the rate the sender really kept; when the service cannot keep up, the
//!   queue grows for the whole period and latency with it (the table says so).
//!   Each rate also runs, just before, a **baseline** of the same work without sourceflow
//!   (the same paced sender; the command envelope over a tokio mpsc channel to a task
//!   that decodes it, records, and encodes the event envelope onto a second channel to a
//!   task that decodes and records it), so that the machine's and the runtime's own tail
//!   at that rate is in the same run.
//!
//! `SCALING_IDEMPOTENCY=off` runs the same rows without the idempotency store;
//! `SCALING_ONLY=memory` runs the memory rows alone.
//!
//! Sizes are bounded so that one run takes under two minutes on 2 cores: the axis rows run
//! `SCALING_ROUNDS` times (default 3), alternating, and each figure is the median of its
//! rounds; the memory and offered-rate rows run once.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use sourceflow::{Handle, MemoryTransport};

const LIGHT_RATE: u64 = 1_000;
const LIGHT_MESSAGES: usize = 2_000;
const RATE_SECONDS: u64 = 2;
const PRODUCERS: usize = 4;
const QUEUED: usize = 100_000;
const SATURATED_FLOW: usize = 40_000;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_nanos() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// One latency slot per message of a row, and how many handlers have started.
#[derive(Clone)]
pub struct Sink(Arc<SinkInner>);

struct SinkInner {
    latencies: Vec<AtomicU64>,
    done: AtomicUsize,
}

impl Sink {
    fn new(slots: usize) -> Self {
        Sink(Arc::new(SinkInner {
            latencies: (0..slots).map(|_| AtomicU64::new(u64::MAX)).collect(),
            done: AtomicUsize::new(0),
        }))
    }

    fn record(&self, seq: u64, sent_nanos: u64) {
        let latency = now_nanos().saturating_sub(sent_nanos);
        if let Some(slot) = self.0.latencies.get(seq as usize) {
            slot.store(latency, Ordering::Relaxed);
        }
        self.0.done.fetch_add(1, Ordering::AcqRel);
    }

    fn done(&self) -> usize {
        self.0.done.load(Ordering::Acquire)
    }

    /// Waits until `n` handlers have started (panics after `limit`: a lost message).
    async fn wait(&self, n: usize, limit: Duration) {
        let until = Instant::now() + limit;
        while self.done() < n {
            assert!(
                Instant::now() < until,
                "only {} of {n} messages handled",
                self.done()
            );
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }

    fn latency(&self, slots: std::ops::Range<usize>) -> Latency {
        let mut v: Vec<u64> = self.0.latencies[slots]
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .filter(|l| *l != u64::MAX)
            .collect();
        v.sort_unstable();
        let at = |p: f64| Duration::from_nanos(v[((v.len() - 1) as f64 * p).round() as usize]);
        Latency {
            p50: at(0.50),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

#[derive(Clone, Copy)]
struct Latency {
    p50: Duration,
    p99: Duration,
    max: Duration,
}

/// A standard queue: the concurrency and payload rows.
mod standard {
    use super::Sink;
    use serde::{Deserialize, Serialize};
    use sourceflow::{command, handler, State};

    #[command(queue = "scale-standard", name = "scale.Standard.v1")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Standard {
        pub seq: u64,
        pub sent_nanos: u64,
        pub pad: String,
    }

    #[handler]
    async fn standard(m: Standard, State(sink): State<Sink>) -> sourceflow::Result<()> {
        sink.record(m.seq, m.sent_nanos);
        Ok(())
    }
}

/// A FIFO queue: the group rows.
mod fifo {
    use super::Sink;
    use serde::{Deserialize, Serialize};
    use sourceflow::{command, handler, State};

    #[command(queue = "scale-grouped.fifo", name = "scale.Grouped.v1")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Grouped {
        #[entity_id]
        pub group: u64,
        pub seq: u64,
        pub sent_nanos: u64,
        pub pad: String,
    }

    #[handler]
    async fn grouped(m: Grouped, State(sink): State<Sink>) -> sourceflow::Result<()> {
        sink.record(m.seq, m.sent_nanos);
        Ok(())
    }
}

/// The orders flow (command → event): the offered-rate rows.
mod flow {
    use super::Sink;
    use serde::{Deserialize, Serialize};
    use sourceflow::{command, event, handler, Context, State};

    #[derive(Clone)]
    pub struct Flow {
        pub command: Sink,
        pub event: Sink,
    }

    #[command(queue = "scale-orders.fifo", name = "scale.PlaceOrder.v1")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct PlaceOrder {
        #[entity_id]
        pub customer: u64,
        pub seq: u64,
        pub sent_nanos: u64,
        pub note: String,
    }

    #[event(topic = "scale-order-events", name = "scale.OrderPlaced.v1")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct OrderPlaced {
        #[entity_id]
        pub customer: u64,
        pub seq: u64,
        pub sent_nanos: u64,
    }

    #[handler]
    async fn place_order(
        cmd: PlaceOrder,
        ctx: &Context,
        State(flow): State<Flow>,
    ) -> sourceflow::Result<()> {
        flow.command.record(cmd.seq, cmd.sent_nanos);
        ctx.raise(OrderPlaced {
            customer: cmd.customer,
            seq: cmd.seq,
            sent_nanos: cmd.sent_nanos,
        })
        .await
    }

    #[handler]
    async fn order_placed(evt: OrderPlaced, State(flow): State<Flow>) -> sourceflow::Result<()> {
        flow.event.record(evt.seq, evt.sent_nanos);
        Ok(())
    }
}

/// A command no handler in this binary consumes: the memory rows.
mod parked {
    use serde::{Deserialize, Serialize};
    use sourceflow::command;

    #[command(queue = "scale-parked", name = "scale.Parked.v1")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Parked {
        pub seq: u64,
        pub pad: String,
    }
}

/// `SCALING_IDEMPOTENCY=off` runs every row without the idempotency store (the default is
/// the defaults: idempotency on).
fn options(b: sourceflow::Builder) -> sourceflow::Builder {
    if std::env::var("SCALING_IDEMPOTENCY").as_deref() == Ok("off") {
        b.without_idempotency()
    } else {
        b
    }
}

/// What one axis row sends.
#[derive(Clone, Copy)]
enum Shape {
    Standard { concurrency: usize, payload: usize },
    Fifo { groups: u64 },
}

impl Shape {
    fn concurrency(self) -> usize {
        match self {
            Shape::Standard { concurrency, .. } => concurrency,
            Shape::Fifo { .. } => 10,
        }
    }

    fn payload(self) -> usize {
        match self {
            Shape::Standard { payload, .. } => payload,
            Shape::Fifo { .. } => 100,
        }
    }

    /// Bounded by bytes so that the 200 KiB row stays short.
    fn saturated(self) -> usize {
        20_000.min((400 << 20) / self.payload())
    }

    async fn send(self, app: &Handle, seq: u64, pad: &str) {
        let sent_nanos = now_nanos();
        let pad = pad.to_string();
        match self {
            Shape::Standard { .. } => app
                .send(standard::Standard {
                    seq,
                    sent_nanos,
                    pad,
                })
                .await
                .map(drop),
            Shape::Fifo { groups } => app
                .send(fifo::Grouped {
                    group: seq % groups,
                    seq,
                    sent_nanos,
                    pad,
                })
                .await
                .map(drop),
        }
        .expect("send");
    }
}

struct AxisRun {
    saturated_per_sec: f64,
    light: Latency,
    achieved: f64,
}

/// Sends `count` messages from `first` at `rate` per second, paced by a 1 ms interval;
/// returns the rate achieved.
async fn paced<F, Fut>(first: u64, count: usize, rate: u64, mut send: F) -> f64
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let start = Instant::now();
    let mut sent = 0usize;
    while sent < count {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as usize + 1).min(count);
        while sent < due {
            send(first + sent as u64).await;
            sent += 1;
        }
    }
    count as f64 / start.elapsed().as_secs_f64()
}

async fn axis_row(shape: Shape) -> AxisRun {
    let saturated = shape.saturated();
    let sink = Sink::new(saturated + LIGHT_MESSAGES);
    let prefix = match shape {
        Shape::Standard { .. } => "scaling::standard",
        Shape::Fifo { .. } => "scaling::fifo",
    };
    let app = options(sourceflow::builder())
        .service("scaling")
        .transport(MemoryTransport::new())
        .handlers_in(prefix)
        .state(sink.clone())
        .concurrency(shape.concurrency())
        .depth_sample_interval(Duration::ZERO)
        .start()
        .await
        .expect("start");
    let pad: Arc<str> = "x".repeat(shape.payload()).into();

    let start = Instant::now();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let (app, pad) = (app.clone(), pad.clone());
            tokio::spawn(async move {
                for seq in (p..saturated).step_by(PRODUCERS) {
                    shape.send(&app, seq as u64, &pad).await;
                }
            })
        })
        .collect();
    for p in producers {
        p.await.expect("producer");
    }
    sink.wait(saturated, Duration::from_secs(120)).await;
    let saturated_per_sec = saturated as f64 / start.elapsed().as_secs_f64();

    let (app_ref, pad_ref) = (&app, &pad);
    let achieved = paced(
        saturated as u64,
        LIGHT_MESSAGES,
        LIGHT_RATE,
        move |seq| async move { shape.send(app_ref, seq, pad_ref).await },
    )
    .await;
    sink.wait(saturated + LIGHT_MESSAGES, Duration::from_secs(60))
        .await;
    app.shutdown().await.expect("shutdown");
    AxisRun {
        saturated_per_sec,
        light: sink.latency(saturated..saturated + LIGHT_MESSAGES),
        achieved,
    }
}

/// Resident set size of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// Sends [`QUEUED`] commands with a `payload`-byte field to a queue no one consumes;
/// returns the resident memory they added, and the service holding them.
async fn queued_memory(payload: usize) -> (u64, Handle, MemoryTransport) {
    let transport = MemoryTransport::new();
    let app = sourceflow::builder()
        .service("scaling-parked")
        .transport(transport.clone())
        .handlers(|_| false)
        .depth_sample_interval(Duration::ZERO)
        .start()
        .await
        .expect("start");
    let pad = "x".repeat(payload);
    let before = rss();
    for seq in 0..QUEUED as u64 {
        app.send(parked::Parked {
            seq,
            pad: pad.clone(),
        })
        .await
        .expect("send");
    }
    let after = rss();
    let queue = app.queue_of::<parked::Parked>();
    let depth = transport.depth(&queue).expect("queue");
    assert_eq!(depth.visible, QUEUED, "every message queued");
    (after.saturating_sub(before), app, transport)
}

/// The length and allocated size of the envelope body of one parked command (a shared
/// `str`: its length plus the two reference counts).
fn body_size(payload: usize) -> (usize, usize) {
    let out = sourceflow::envelope::encode(
        &parked::Parked {
            seq: 99_999,
            pad: "x".repeat(payload),
        },
        sourceflow::envelope::SendMeta::default(),
    )
    .expect("encode");
    let counts = 2 * std::mem::size_of::<usize>();
    (out.body.len(), out.body.len() + counts)
}

struct RateRun {
    offered: Option<u64>,
    achieved: f64,
    completed: f64,
    command: Latency,
    event: Latency,
    backlog_peak: usize,
}

/// The orders flow at `rate` commands/s (`None`: as fast as one sender can) for `count`.
async fn offered_rate(rate: Option<u64>, count: usize) -> RateRun {
    let state = flow::Flow {
        command: Sink::new(count),
        event: Sink::new(count),
    };
    let app = options(sourceflow::builder())
        .service("scaling")
        .transport(MemoryTransport::new())
        .handlers_in("scaling::flow")
        .state(state.clone())
        .concurrency(10)
        .depth_sample_interval(Duration::ZERO)
        .start()
        .await
        .expect("start");
    let note = "two espressos, one croissant";
    let backlog_peak = std::cell::Cell::new(0usize);
    let (app_ref, state_ref, peak) = (&app, &state, &backlog_peak);
    let start = Instant::now();
    let achieved = paced(0, count, rate.unwrap_or(u64::MAX >> 8), move |seq| {
        let behind = (seq as usize).saturating_sub(state_ref.event.done());
        peak.set(peak.get().max(behind));
        let app = app_ref;
        async move {
            app.send(flow::PlaceOrder {
                customer: seq % 1_000,
                seq,
                sent_nanos: now_nanos(),
                note: note.into(),
            })
            .await
            .expect("send");
        }
    })
    .await;
    state.event.wait(count, Duration::from_secs(120)).await;
    let completed = count as f64 / start.elapsed().as_secs_f64();
    app.shutdown().await.expect("shutdown");
    RateRun {
        offered: rate,
        achieved,
        completed,
        command: state.command.latency(0..count),
        event: state.event.latency(0..count),
        backlog_peak: backlog_peak.get(),
    }
}

/// The baseline of [`offered_rate`]: the same paced sends and envelope work over two tokio
/// mpsc channels, no sourceflow.
async fn offered_rate_baseline(rate: Option<u64>, count: usize) -> RateRun {
    use sourceflow::envelope::{self, SendMeta};
    use sourceflow::transport::Attributes;
    let (command, event) = (Sink::new(count), Sink::new(count));
    let (tx1, mut rx1) = tokio::sync::mpsc::channel::<(Arc<str>, Attributes)>(1024);
    let (tx2, mut rx2) = tokio::sync::mpsc::channel::<(Arc<str>, Attributes)>(1024);
    let sink = command.clone();
    let stage1 = tokio::spawn(async move {
        while let Some((body, attrs)) = rx1.recv().await {
            let env = envelope::decode(&body, &attrs).expect("envelope");
            let cmd: flow::PlaceOrder = serde_json::from_str(env.payload.get()).expect("payload");
            sink.record(cmd.seq, cmd.sent_nanos);
            let evt = flow::OrderPlaced {
                customer: cmd.customer,
                seq: cmd.seq,
                sent_nanos: cmd.sent_nanos,
            };
            let out = envelope::encode(&evt, SendMeta::default()).expect("encode");
            if tx2.send((out.body, out.attributes)).await.is_err() {
                break;
            }
        }
    });
    let sink = event.clone();
    let stage2 = tokio::spawn(async move {
        while let Some((body, attrs)) = rx2.recv().await {
            let env = envelope::decode(&body, &attrs).expect("envelope");
            let evt: flow::OrderPlaced = serde_json::from_str(env.payload.get()).expect("payload");
            sink.record(evt.seq, evt.sent_nanos);
        }
    });
    let backlog_peak = std::cell::Cell::new(0usize);
    let (tx, events, peak) = (&tx1, &event, &backlog_peak);
    let start = Instant::now();
    let achieved = paced(0, count, rate.unwrap_or(u64::MAX >> 8), move |seq| {
        peak.set(peak.get().max((seq as usize).saturating_sub(events.done())));
        async move {
            let cmd = flow::PlaceOrder {
                customer: seq % 1_000,
                seq,
                sent_nanos: now_nanos(),
                note: "two espressos, one croissant".into(),
            };
            let out = envelope::encode(&cmd, SendMeta::default()).expect("encode");
            tx.send((out.body, out.attributes)).await.expect("send");
        }
    })
    .await;
    event.wait(count, Duration::from_secs(120)).await;
    let completed = count as f64 / start.elapsed().as_secs_f64();
    drop(tx1);
    let _ = (stage1.await, stage2.await);
    RateRun {
        offered: rate,
        achieved,
        completed,
        command: command.latency(0..count),
        event: event.latency(0..count),
        backlog_peak: backlog_peak.get(),
    }
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 1.0 {
        format!("{:.0} µs", ms * 1e3)
    } else if ms < 100.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

fn median_by<T>(v: &[T], key: impl Fn(&T) -> f64) -> f64 {
    let mut k: Vec<f64> = v.iter().map(key).collect();
    k.sort_by(f64::total_cmp);
    k[k.len() / 2]
}

fn main() {
    let _ = epoch();
    let rounds: usize = std::env::var("SCALING_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
        .max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let began = Instant::now();
    rt.block_on(async {
        // Memory first, before the other rows have grown the heap.
        let base = rss();
        let (small, keep_small, transport_small) = queued_memory(100).await;
        let (large, keep_large, transport_large) = queued_memory(1_024).await;
        let _ = keep_small.shutdown().await;
        let _ = keep_large.shutdown().await;
        drop((keep_small, keep_large, transport_small, transport_large));
        println!(
            "## Resident memory per {QUEUED} queued messages (no consumer; process RSS at start {:.1} MiB)",
            base as f64 / (1 << 20) as f64
        );
        println!(
            "| payload field | MiB per 100k queued | bytes per message | envelope body length / capacity |"
        );
        println!("|---|---|---|---|");
        for (payload, bytes) in [(100, small), (1_024, large)] {
            let (len, capacity) = body_size(payload);
            println!(
                "| {payload} B | {:.1} | {:.0} | {len} / {capacity} B |",
                bytes as f64 / (1 << 20) as f64 * (100_000.0 / QUEUED as f64),
                bytes as f64 / QUEUED as f64
            );
        }
        println!();
        if std::env::var("SCALING_ONLY").as_deref() == Ok("memory") {
            return;
        }

        // Warm-up.
        axis_row(Shape::Standard {
            concurrency: 10,
            payload: 100,
        })
        .await;

        let axes: Vec<(&str, Vec<(String, Shape)>)> = vec![
            (
                "concurrency (standard queue, 100 B)",
                [1, 10, 100]
                    .into_iter()
                    .map(|c| {
                        (
                            format!("concurrency {c}"),
                            Shape::Standard {
                                concurrency: c,
                                payload: 100,
                            },
                        )
                    })
                    .collect(),
            ),
            (
                "FIFO groups (concurrency 10, 100 B)",
                [1, 10, 1_000]
                    .into_iter()
                    .map(|g| (format!("{g} groups"), Shape::Fifo { groups: g }))
                    .collect(),
            ),
            (
                "payload size (standard queue, concurrency 10)",
                [(100, "100 B"), (10 << 10, "10 KiB"), (200 << 10, "200 KiB")]
                    .into_iter()
                    .map(|(p, name)| {
                        (
                            name.to_string(),
                            Shape::Standard {
                                concurrency: 10,
                                payload: p,
                            },
                        )
                    })
                    .collect(),
            ),
        ];
        let mut runs: Vec<Vec<Vec<AxisRun>>> = axes
            .iter()
            .map(|(_, rows)| rows.iter().map(|_| Vec::new()).collect())
            .collect();
        for _ in 0..rounds {
            for (a, (_, rows)) in axes.iter().enumerate() {
                for (r, (_, shape)) in rows.iter().enumerate() {
                    runs[a][r].push(axis_row(*shape).await);
                }
            }
        }
        for ((title, rows), runs) in axes.iter().zip(&runs) {
            println!("## {title}");
            println!(
                "| | saturated msg/s | messages | light load p50 | p99 | max | (offered {LIGHT_RATE}/s, achieved) |"
            );
            println!("|---|---|---|---|---|---|---|");
            for ((name, shape), r) in rows.iter().zip(runs) {
                let d = |f: fn(&AxisRun) -> Duration| {
                    Duration::from_secs_f64(median_by(r, |x| f(x).as_secs_f64()))
                };
                println!(
                    "| {name} | {:.0} | {} | {} | {} | {} | {:.0}/s |",
                    median_by(r, |x| x.saturated_per_sec),
                    shape.saturated(),
                    ms(d(|x| x.light.p50)),
                    ms(d(|x| x.light.p99)),
                    ms(d(|x| x.light.max)),
                    median_by(r, |x| x.achieved),
                );
            }
            println!();
        }

        let mut rates = Vec::new();
        for rate in [1_000, 10_000, 50_000] {
            let count = (rate * RATE_SECONDS) as usize;
            rates.push(("baseline", offered_rate_baseline(Some(rate), count).await));
            rates.push(("sourceflow", offered_rate(Some(rate), count).await));
        }
        rates.push(("baseline", offered_rate_baseline(None, SATURATED_FLOW).await));
        rates.push(("sourceflow", offered_rate(None, SATURATED_FLOW).await));
        println!(
            "## Latency at a fixed offered rate (orders flow: FIFO command, 1,000 groups → event; concurrency 10; {RATE_SECONDS} s each)"
        );
        println!("| offered cmd/s | | sent/s | completed/s | command → handler p50 | p99 | max | command → event → handler p50 | p99 | max | peak backlog |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        for (what, r) in &rates {
            println!(
                "| {} | {what} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
                r.offered.map_or(format!("saturated ({SATURATED_FLOW} at once)"), |o| o.to_string()),
                r.achieved,
                r.completed,
                ms(r.command.p50),
                ms(r.command.p99),
                ms(r.command.max),
                ms(r.event.p50),
                ms(r.event.p99),
                ms(r.event.max),
                r.backlog_peak,
            );
        }
    });
    println!(
        "\n2 worker threads, {rounds} round(s), whole run {:.0} s",
        began.elapsed().as_secs_f64()
    );
}
