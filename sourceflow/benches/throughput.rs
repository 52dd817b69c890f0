//! End-to-end throughput on the embedded transport, next to a plain tokio mpsc baseline
//! doing the same JSON work, in one run.
//!
//! ```text
//! cargo bench -p sourceflow --bench throughput             # the system allocator (glibc)
//! cargo bench -p sourceflow --bench throughput_mimalloc    # the same with mimalloc
//! cargo bench -p sourceflow --bench throughput -- telemetry # only rows whose name has a word
//! ```
//!
//! The flow is the orders flow: a `PlaceOrder` command on a FIFO queue (1,000 entity ids,
//! so 1,000 message groups) is handled by a handler that raises `OrderPlaced` on a topic;
//! an event handler records the end-to-end latency. A "handled message" is one handler run,
//! so each command counts twice (command + event).
//!
//! The baseline does the same serialization work without sourceflow: the producer encodes
//! the command envelope, a tokio mpsc channel carries it to a stage that decodes it and
//! encodes the event envelope, a second channel carries that to a stage that decodes it.
//!
//! Rows, alternated round by round (median of the rounds):
//! * `baseline`: the mpsc pipeline;
//! * `sourceflow`: the defaults (idempotency on, memory store), telemetry off;
//! * `sourceflow, no idempotency`;
//! * `sourceflow, telemetry on`: every span recorded through `sourceflow::telemetry::layer`
//!   (the `tracing-opentelemetry` layer the README recommends) into an OpenTelemetry SDK
//!   tracer (batch processor, exporter that drops), and every metric recorded into an SDK
//!   meter provider. The ratio to `sourceflow` is the telemetry overhead;
//! * `sourceflow, telemetry on, layer defaults`: the same through
//!   `tracing_opentelemetry::layer()` with its defaults (context activation on every poll,
//!   inactivity timings, thread and location attributes), for comparison;
//! * `sourceflow, telemetry on, direct spans`: the same spans made with the OpenTelemetry
//!   API directly (`Builder::tracer_provider` with the same SDK tracer provider; no
//!   `tracing` span), the same metrics.
//!
//! After the table come two floors: what the same six spans and 14 instrument calls per
//! command cost on one thread without sourceflow, through `sourceflow::telemetry::layer`
//! (`telemetry_floor`) and through the OpenTelemetry API directly (`otel_api_floor`).

//!
//! Where the time goes (profile of one whole run of this bench, all four rows, `perf record
//! -e cpu-clock -F 499 -g` on the release binary, 2 cores, 27,201 samples; 2026-12-01, after
//! the delivery-core rebuild, with typed attributes): glibc's allocator is 43 % of the
//! samples (`_int_malloc` 17 %, `malloc_consolidate` 6 %, `_int_free` 6 %, `malloc` 5 %,
//! `free` 4 %, `unlink_chunk` 3 %, `realloc` 2 %); `memmove` 6 %, of which the clones of a
//! stored message on every receive of the embedded queue (`Queue::received`, `Vec::clone`)
//! are the named part; `clock_gettime` 2 %; the memory queue's `receive_now` 2 %; the memory
//! idempotency store's claim 1.4 % with SipHash 1.8 % (default hasher); serde_json 3 %; the
//! `tracing-opentelemetry` layer (`on_new_span`, `on_enter`/`on_exit`/`on_close`, attribute
//! visitors) and the batch span processor 2.5 % over the whole run (it only runs in the
//! telemetry row). The call graphs have no frame pointers, so the allocator's callers are not
//! attributed; the next step is a build with `-C force-frame-pointers=yes` to find them.
//!
//! The defaults row alone (`-- defaults`), `perf record -e cpu-clock -F 299 --call-graph
//! dwarf,16384`, 2026-12-01, 2 cores shared with other builds (load ~6), 3,970 samples at
//! `d83e3eb`: the allocator 43 % again; by caller, the embedded queue's `Queue::received`
//! 9.2 % (it cloned the stored body and every attribute string on every receive), the
//! handler context's second copy of the attributes 2.6 %, their frees (`drop_in_place` of
//! the received message and of the stored one) 5.6 %, the memory idempotency store's claim
//! 7.3 % with SipHash 2.7 %, the key's `format!` regrowth 2.9 %. After `2f1058e`/`f7ecda8`
//! (bodies `Arc<str>`, attributes `Arc<[..]>` shared by the broker, the receive, the
//! context and the dispatcher's retry copy; foldhash maps; keys built at their length),
//! 3,563 samples: `Queue::received` 1 % (a receipt and the broker id are still formatted
//! and cloned per receive), no body or attribute clone left on the receive path; the
//! largest remaining `String::clone` callers are the queue's group/dedup ids and the
//! heartbeat's copies of each receipt. Left: serde_json decode of the envelope and payload
//! (9 %), tokio task spawn and wake per message (`Cell::new` 4 %), the encoder's attribute
//! strings (`envelope::attributes` and `AttributeValue::from` 2.5 %), the idempotency
//! claim and complete under one mutex (6 %), and glibc's `malloc_consolidate` (7 %), which
//! a global allocator removes (see `throughput_mimalloc`).
//!
//! The telemetry row alone (`-- telemetry`, which also runs the warm-up of the baseline and
//! the defaults), `perf record -e cpu-clock -F 199 --call-graph dwarf`, next to `--
//! defaults` at 499 Hz for the CPU ratio; 2026-12-01, 2 cores shared with other builds:
//! * before (commit 4ca5c56): the telemetry run took 1.95× the CPU of the defaults run
//!   (18,779 samples against 9,653). Stacks through the `tracing-opentelemetry` layer
//!   27 % of the row (its `on_enter`/`on_exit` attach an OTel context and read the clock
//!   twice per poll; its field visitors copy every string value), the SDK's batch span
//!   processor and its exporter thread (which frees every span) 7 %, the `tracing-subscriber`
//!   registry 5 %, the SDK meters 2.6 %, sourceflow's `telemetry` module 1.8 % (the
//!   `traceparent` `format!`). The largest single item, 6.3 %, was the SDK span's attribute
//!   vector reallocated when the layer adds `busy_ns`/`idle_ns` at close (the layer sizes
//!   it by the declared fields, and the process span's grew into a size that makes glibc
//!   consolidate its heap); the four `span.record` calls on the started process span came
//!   next.
//! * after (this doc comment's commit): 1.76× (13,252 against 7,550 samples); the layer
//!   22 %, the batch processor 6.4 %, the registry 4 %, the meters 3.5 % (the attribute
//!   sets are precomputed, the SDK still hashes them per call), sourceflow's module 0.7 %;
//!   the close-time reallocation is gone (`otel.status_code` is declared on each span). The
//!   rest is the per-span floor of `tracing-opentelemetry` and the SDK: the layer's copies
//!   of the eight string fields of a process span (4 % in the allocator alone), the builder,
//!   the extensions, the batch hand-off and the frees on the exporter thread.
//! * how large that floor is (`telemetry_floor`, printed after the table): at `6eef1b6`,
//!   quiet machine, the same six spans and 14 instrument calls per command, made without
//!   sourceflow through the same layer and providers, cost 25.7 µs of CPU per command with
//!   glibc (20.3 µs with mimalloc), against 23.4 µs (14.7 µs) per command for the whole
//!   defaults row: at least a 35 % (41 %) overhead before sourceflow adds anything, against
//!   the 58 % (61 %) measured (that floor counted the spans alone: its loop without
//!   telemetry made the instrument calls too). The ≤ 10 % target needs fewer spans or
//!   spans made outside `tracing-opentelemetry`.
//! * spans made outside it (`Builder::tracer_provider`, the `direct spans` row), at
//!   `5d617d6`: overhead 34 % (mimalloc 33 %) against 62 % (50 %) through the layer in the
//!   same run; floors 9.2 µs of CPU per command through the API against 20.3 µs through the
//!   layer (both with the 14 instrument calls). At `00e39c5` (36 %, 42 %), `perf record -e
//!   cpu-clock -F 499 -g` of `--bench direct` (6,459 samples): sourceflow's span functions under 2 % (process
//!   attributes 0.8 %, the trace context read per outgoing message 0.5 %, attribute clones
//!   0.4 %); glibc's allocator 17 %, `memmove` 7 %, the kernel 19 % (wake-ups, task
//!   switches); the SDK's `on_end` 1.5 % and `build_recording_span` 0.8 %. The API floor
//!   alone is a 20-24 % overhead: the target is out of reach while every span is exported.
//!
//! The defaults row alone (`-- "(defaults)"`), `perf record -e cpu-clock -F 299
//! --call-graph dwarf,16384`, 2026-12-02, quiet machine, 3,765 samples at `bdbd03a`: 44 % of
//! the samples are in glibc's allocator or waiting on its arena lock, and the kernel's
//! wake-up and task-switch paths are 16 %, most of it futex calls from
//! `__lll_lock_wait_private`/`__lll_lock_wake_private` inside `malloc` and `free` (a
//! message allocated on one worker and freed on the other). By the first caller outside
//! the allocator: dropping a received message 8 % (its receipt, broker id, group id, and
//! the attribute strings allocated by the sender's thread), tokio's task cell per unit
//! 3.8 % (an over-aligned allocation: glibc's `_mid_memalign` takes the arena lock and
//! skips the per-thread cache), the memory queue's receive 4.6 %, the idempotency claim
//! 2.4 %, the heartbeat's copies of receipts 2 %, the encoder's attributes 1.8 %. Since
//! `603b3e3` the seven attribute names sourceflow sets are static (`AttributeName`);
//! alternated against the build before, that made the baseline (which is that envelope
//! code alone) 20 % faster and left sourceflow's rows where they were, which says the
//! rest of its per-message work dominates. `GLIBC_TUNABLES=glibc.malloc.tcache_count=1024`
//! takes sourceflow's rows up 15-20 % (and the baseline 14 %).
//!
//! The defaults row alone again, 2026-12-02, quiet machine, 7,075 samples at `bc2b11f`, by
//! the first caller outside the allocator: the memory idempotency store's claim 6.3 %, most
//! of it making room when full (every 10,000 claims above its 100,000 records it cloned and
//! sorted every key) and rehashing; the envelope's decode 6.4 %; the embedded queue's send,
//! receive, delete and bookkeeping together 19 %; dropping received messages 9 %; glibc's
//! arena lock 12 % of all samples (`__lll_lock_wait_private`/`__lll_lock_wake_private`).
//! Rates this noisy (one binary: 93k-140k msg/s in twelve runs) cannot show a 3 % change,
//! so `throughput_allocations` counts allocations per command instead, and a sampling
//! allocator (a backtrace every 997th allocation, not committed) named their sites. From
//! `bc2b11f` to `2560eb9` the defaults row went from 99.9 to 78.8 allocations per command
//! (baseline 35.0 to 29.0, no idempotency 75.9 to 62.8; each commit gives its step) and
//! from a median 95,769 to 115,886 msg/s in four alternated runs (user + system CPU for
//! the whole run 11.3 s to 9.8 s). Of the 79 left, the envelope's decode is 6 per message,
//! the idempotency claim ~5, and telemetry on adds 74 per command (~12 per span).
//!
//! From `2560eb9` to `d7f0b97` (2026-12-02): 78.8 to 55.8 allocations per command (the
//! listener's envelope borrowing from the body, shared receipts, one allocation per claim,
//! the context's attributes, the outbox flushed as given; no idempotency 62.8 to 43.8). Run
//! alternately against the build before (three runs each, quiet machine), the rate did not
//! move: glibc defaults 134,969-139,884 msg/s before and 129,593-141,023 after, user CPU
//! 11.80-12.17 s and 11.65-12.17 s; mimalloc within 4 %. A flat profile of the defaults
//! row after (`perf record -F 999`, 999 Hz, no call graph): the kernel's scheduler 18 %
//! (`_raw_spin_unlock_irqrestore`, `finish_task_switch`: threads parked and woken; `strace
//! -c` counts 0.2 `futex`, 0.1 `sched_yield` and 0.05 `epoll_wait` per command), glibc's
//! allocator 19 %, `memmove` 6 %, the memory idempotency store's claim 3 %, the embedded
//! queue's receive 4 %, serde_json ~4 %. The wake-ups of parked workers per hand-off, not
//! the count of allocations, are what is left to take on.
//!
//! Where the `sched_yield` calls come from (`perf record -e syscalls:sys_enter_sched_yield
//! --call-graph dwarf,8192`, the defaults row, at `d7f0b97`): all from `parking_lot`'s
//! `lock_slow`, on the embedded queue's lock (send 28 %, publish 21 %, delete 25 %, receive
//! 1 %) and the memory idempotency store's (claim 13 %, complete 12 %), where glibc's
//! `malloc`/`free` ran inside the lock. `d72f1a2` moves those allocations out of both
//! locks: `sched_yield` per defaults run 341,502 → 148,576 (`perf stat`), context switches
//! 92,047 → 78,030, and the rows 5-7 % up in three alternated runs.
//!
//! Where `memmove` comes from (8.5 % of the defaults row's samples at `ba9cb78`, `perf
//! record -F 199 --call-graph dwarf,16384 -- "(defaults)"`, 2026-12-03): the listener's
//! pipeline 1.3 %, the memory idempotency store's map growing (`HashMap::insert`, 1 %: the
//! store starts empty every round; a full store does not rehash), and tokio moving each
//! unit's future into its task (`spawn`, `Cell::new`, `set_stage`: 2.2 %). That future is
//! 6,416 bytes (`size_of_val`, measured with a print not committed): a unit's whole state
//! machine, stages and settling included. Boxing it inside the task (one 6 KB allocation
//! instead of the copies) took `memmove` to 5.6 % and raised `_int_malloc` from 3.2 % to
//! 4.1 %; in eight alternated `perf stat -e task-clock` runs against the build before, the
//! CPU per run was 7.7-11.8 s against 8.1-11.5 s, no difference this noise can show, so it
//! is not committed. Shrinking the future (fewer states held across awaits) is the lever
//! left there.
//!
//! Where the worker threads sleep, and why (2026-12-03, quiet machine, the defaults row at
//! `322f15d`): a run used 1.47 of the 2 CPUs. `perf record -a -e sched:sched_switch -g`,
//! each switch-out matched with the switch back in: 1.2 s off the CPU on glibc's arena
//! lock (`__lll_lock_wait_private`, mean 71 µs), 0.5 s parked for want of work. With
//! `--call-graph dwarf`, 64 % of the workers' sleeps were in the `free` of a handled
//! message's parts (`drop_in_place<ReceivedMessage>` at the end of a unit), waiting for the
//! other thread, which held the lock in `malloc_consolidate`: glibc serves an allocation
//! over 1 KiB from its large bins only after consolidating every small chunk freed since
//! (`perf probe -x libc.so.6 malloc_consolidate`: 514,927 calls per run). By caller
//! (`perf record -e probe_libc:malloc_consolidate --call-graph dwarf`): tokio's task cell
//! (a task per unit, its 3.5 KB state machine; and a task per receive that had to wait),
//! each handler's boxed future (1,776 bytes, the `raise` it awaits 1,616 of them: the
//! sealing path's state), and the embedded receive's vector with room for ten messages
//! (1,040 bytes). Removing one such allocation moves the consolidation to the next one
//! (the workers alone: 505,172 calls); after `7c36bb5` (long-lived workers), `b383011`
//! (long poll in the caller's task, receive vectors of their size) and `b23b26f` (a
//! message that is not sealed is encoded without a future), 63,460 calls per run, CPU per
//! run of the defaults and no-idempotency rows 13.6-15.4 s before and 11.8-13.8 s after
//! in four alternated `perf stat -e task-clock` runs, the defaults row 97-120k msg/s
//! before and 126-171k after. (The workers left out, the others gave 267,925 calls and
//! 14.2-15.1 s.) Running a batch's units in one task (`join_all`, not committed) instead
//! gave no difference: its vector of ten unit futures was a large-bin allocation too.
//! Of the 63,192 calls left (by caller, at `b23b26f`), 81 % follow the vector a full
//! receive returns (ten `ReceivedMessage`s of 104 bytes: 1,040, just over the line; the
//! `Transport::receive` signature makes it a `Vec`), 10 % the listener's vector of units
//! per batch (`group_in_order`), 3 % its vector of held units: the next lever.
//!
//! Taken at `3bcf6cb` (2026-12-08): each poller receives into vectors it keeps
//! (`Transport::receive_into`; the embedded broker writes into the caller's vector) and a
//! FIFO run is allocated once at its length. `perf stat -e probe_libc:malloc_consolidate`
//! on `-- "(defaults)"`: 68,820 calls per run before, about 22,000 after. Of those left,
//! 87 % (`perf record -e probe_libc:malloc_consolidate --call-graph dwarf`) follow a
//! backlogged FIFO group's run of ten messages (1,040 bytes, one allocation per unit). A
//! free list of emptied units (the workers giving them back to the pollers) took the calls
//! to 1,746, but ten alternated runs against the committed build showed no gain (median
//! 269,521 against 284,344 msg/s, CPU per run 4.54 against 4.31 s), so it is not committed:
//! at this count the consolidations are no longer what the workers wait on. The flat
//! profile after (`perf record -F 999`, ~5,000 samples, grouped by symbol): glibc's
//! allocator 17 %, serde_json 12 %, the kernel 10 %, the embedded broker 9 %, `memmove`
//! 8 %, the listener 7 %, hashing 5 %, the memory idempotency store 5 %, the clock 3.5 %.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, SdkMeterProvider};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use serde::{Deserialize, Serialize};
use sourceflow::{command, event, handler, Context, State};
use tokio::sync::Notify;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{filter::LevelFilter, reload, Layer};

const COMMANDS: u64 = 50_000;
const GROUPS: u64 = 1_000;
const ROUNDS: usize = 5;
const CONCURRENCY: usize = 10;

#[command(queue = "bench-orders.fifo", name = "bench.PlaceOrder.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlaceOrder {
    #[entity_id]
    pub customer: u64,
    pub order: u64,
    pub sent_nanos: u64,
    pub note: String,
}

#[event(topic = "bench-order-events", name = "bench.OrderPlaced.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderPlaced {
    #[entity_id]
    pub customer: u64,
    pub order: u64,
    pub sent_nanos: u64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_nanos() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// Per-round results: one latency slot per order, and a completion signal.
#[derive(Clone)]
pub struct Sink {
    latencies: Arc<Vec<AtomicU64>>,
    done: Arc<AtomicUsize>,
    finished: Arc<Notify>,
}

impl Sink {
    fn new() -> Self {
        Sink {
            latencies: Arc::new((0..COMMANDS).map(|_| AtomicU64::new(0)).collect()),
            done: Arc::new(AtomicUsize::new(0)),
            finished: Arc::new(Notify::new()),
        }
    }

    fn record(&self, order: u64, sent_nanos: u64) {
        if let Some(slot) = self.latencies.get(order as usize) {
            slot.store(now_nanos().saturating_sub(sent_nanos), Ordering::Relaxed);
        }
        if self.done.fetch_add(1, Ordering::AcqRel) + 1 == COMMANDS as usize {
            self.finished.notify_one();
        }
    }

    async fn wait(&self) {
        while self.done.load(Ordering::Acquire) < COMMANDS as usize {
            let notified = self.finished.notified();
            if self.done.load(Ordering::Acquire) >= COMMANDS as usize {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
    }

    fn percentiles(&self) -> (Duration, Duration) {
        let mut v: Vec<u64> = self
            .latencies
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        v.sort_unstable();
        let at = |p: f64| Duration::from_nanos(v[((v.len() - 1) as f64 * p) as usize]);
        (at(0.50), at(0.99))
    }
}

#[handler]
async fn place_order(cmd: PlaceOrder, ctx: &Context) -> sourceflow::Result<()> {
    ctx.raise(OrderPlaced {
        customer: cmd.customer,
        order: cmd.order,
        sent_nanos: cmd.sent_nanos,
    })
    .await
}

#[handler]
async fn order_placed(evt: OrderPlaced, State(sink): State<Sink>) -> sourceflow::Result<()> {
    sink.record(evt.order, evt.sent_nanos);
    Ok(())
}

fn order(i: u64) -> PlaceOrder {
    PlaceOrder {
        customer: i % GROUPS,
        order: i,
        sent_nanos: now_nanos(),
        note: "two espressos, one croissant".into(),
    }
}

struct Measured {
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    /// Heap allocations made while the round ran, where the binary counts them
    /// (`throughput_allocations`).
    allocations: Option<u64>,
}

/// The allocation counter of the binary's global allocator, set by `throughput_allocations`
/// (the other binaries do not count: a shared counter would slow down what they time).
pub static ALLOCATIONS: OnceLock<fn() -> u64> = OnceLock::new();

fn allocations() -> Option<u64> {
    ALLOCATIONS.get().map(|count| count())
}

impl Measured {
    fn handled_per_sec(&self) -> f64 {
        (2 * COMMANDS) as f64 / self.elapsed.as_secs_f64()
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Defaults,
    NoIdempotency,
    Telemetry,
    /// Telemetry on, spans made with the OpenTelemetry API (`Builder::tracer_provider`).
    TelemetryDirect,
}

async fn framework(mode: Mode, meters: &SdkMeterProvider, tracers: &SdkTracerProvider) -> Measured {
    let sink = Sink::new();
    let mut b = sourceflow::builder()
        .service("bench")
        .handlers_in(module_path!())
        .state(sink.clone())
        .concurrency(CONCURRENCY)
        .depth_sample_interval(Duration::ZERO);
    b = match mode {
        Mode::Defaults => b,
        Mode::NoIdempotency => b.without_idempotency(),
        Mode::Telemetry => b.meter_provider(meters),
        Mode::TelemetryDirect => b.meter_provider(meters).tracer_provider(tracers),
    };
    let app = b.start().await.expect("start");
    let start = Instant::now();
    let allocated = allocations();
    // Producers: several tasks, each keeping its customers' orders in sequence.
    let producers: Vec<_> = (0..4u64)
        .map(|p| {
            let app = app.clone();
            tokio::spawn(async move {
                let mut i = p;
                while i < COMMANDS {
                    app.send(order(i)).await.expect("send");
                    i += 4;
                }
            })
        })
        .collect();
    for p in producers {
        p.await.expect("producer");
    }
    sink.wait().await;
    let elapsed = start.elapsed();
    let allocations = allocations().zip(allocated).map(|(end, start)| end - start);
    app.shutdown().await.expect("shutdown");
    let (p50, p99) = sink.percentiles();
    Measured {
        elapsed,
        p50,
        p99,
        allocations,
    }
}

async fn baseline() -> Measured {
    use sourceflow::envelope::{self, SendMeta};
    let sink = Sink::new();
    let (tx1, mut rx1) =
        tokio::sync::mpsc::channel::<(Arc<str>, sourceflow::transport::Attributes)>(1024);
    let (tx2, mut rx2) =
        tokio::sync::mpsc::channel::<(Arc<str>, sourceflow::transport::Attributes)>(1024);
    let start = Instant::now();
    let allocated = allocations();
    let stage1 = tokio::spawn(async move {
        while let Some((body, attrs)) = rx1.recv().await {
            let env = envelope::decode(&body, &attrs).expect("envelope");
            let cmd: PlaceOrder = serde_json::from_str(env.payload.get()).expect("payload");
            let evt = OrderPlaced {
                customer: cmd.customer,
                order: cmd.order,
                sent_nanos: cmd.sent_nanos,
            };
            let out = envelope::encode(&evt, SendMeta::default()).expect("encode");
            if tx2.send((out.body, out.attributes)).await.is_err() {
                break;
            }
        }
    });
    let sink2 = sink.clone();
    let stage2 = tokio::spawn(async move {
        while let Some((body, attrs)) = rx2.recv().await {
            let env = envelope::decode(&body, &attrs).expect("envelope");
            let evt: OrderPlaced = serde_json::from_str(env.payload.get()).expect("payload");
            sink2.record(evt.order, evt.sent_nanos);
        }
    });
    for i in 0..COMMANDS {
        let out = envelope::encode(&order(i), SendMeta::default()).expect("encode");
        tx1.send((out.body, out.attributes)).await.expect("send");
    }
    drop(tx1);
    sink.wait().await;
    let elapsed = start.elapsed();
    let allocations = allocations().zip(allocated).map(|(end, start)| end - start);
    let _ = stage1.await;
    let _ = stage2.await;
    let (p50, p99) = sink.percentiles();
    Measured {
        elapsed,
        p50,
        p99,
        allocations,
    }
}

/// Spans go through the whole OpenTelemetry pipeline and are then dropped.
#[derive(Debug)]
struct DropExporter;

impl SpanExporter for DropExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        std::hint::black_box(batch);
        Ok(())
    }
}

/// The 14 instrument calls per command of both floors: a counter, a histogram and an
/// up-down counter with precomputed attribute sets, as sourceflow's metrics are.
struct FloorInstruments {
    count: opentelemetry::metrics::Counter<u64>,
    hist: opentelemetry::metrics::Histogram<f64>,
    gauge: opentelemetry::metrics::UpDownCounter<i64>,
    attrs: [opentelemetry::KeyValue; 3],
}

impl FloorInstruments {
    fn new(meters: &SdkMeterProvider) -> Self {
        use opentelemetry::metrics::MeterProvider as _;
        use opentelemetry::KeyValue;
        let meter = meters.meter("floor");
        FloorInstruments {
            count: meter.u64_counter("floor.count").build(),
            hist: meter.f64_histogram("floor.duration").build(),
            gauge: meter.i64_up_down_counter("floor.in_flight").build(),
            attrs: [
                KeyValue::new("messaging.destination.name", "bench-orders.fifo"),
                KeyValue::new("sourceflow.wire_name", "bench.PlaceOrder.v1"),
                KeyValue::new("sourceflow.outcome", "success"),
            ],
        }
    }

    /// `k` instrument calls, the three kinds in turn.
    fn record(&self, k: usize) {
        for i in 0..k {
            match i % 3 {
                0 => self.count.add(1, &self.attrs),
                1 => self.hist.record(0.000_1, &self.attrs[..2]),
                _ => self.gauge.add(1, &self.attrs[..1]),
            }
        }
    }
}

/// The remote span context of a `traceparent` the floors wrote (`00-<trace>-<span>-01`).
fn remote_span_context(traceparent: &str) -> Option<opentelemetry::trace::SpanContext> {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    let mut parts = traceparent.split('-').skip(1);
    let trace = TraceId::from_hex(parts.next()?).ok()?;
    let span = SpanId::from_hex(parts.next()?).ok()?;
    Some(SpanContext::new(
        trace,
        span,
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ))
}

/// The telemetry floor: what the same spans and metrics cost through the same subscriber
/// and SDKs with no sourceflow around them. Per command, sourceflow makes six spans — the
/// send's `sourceflow.dispatch`; for the command and for its event a
/// `sourceflow.process` continuing the sender's trace (parsed from its `traceparent`) with a
/// `sourceflow.handler` inside; the publish's `sourceflow.dispatch` inside the command's
/// handler — and 14 instrument calls with precomputed attribute sets. This makes them with
/// the same fields, each entered and left once, on one thread, `n` times, and returns the
/// time per command. The caller subtracts the same loop with telemetry off (the layer's
/// filter off, `metrics` false: no span is recorded and no instrument called).
fn telemetry_floor(n: u64, meters: &SdkMeterProvider, metrics_on: bool) -> Duration {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let instruments = FloorInstruments::new(meters);
    let id = "5f0c6a4e-8a1b-4c2d-9e3f-0a1b2c3d4e5f";
    let traceparent = |span: &tracing::Span| {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        format!("00-{}-{}-01", sc.trace_id(), sc.span_id())
    };
    let process = |queue: &str, wire: &str, parent: &str| {
        let span = tracing::info_span!(
            "sourceflow.process",
            otel.kind = "consumer",
            messaging.system = "aws_sqs",
            messaging.destination.name = queue,
            messaging.operation.type = "process",
            messaging.message.id = id,
            messaging.message.conversation_id = id,
            sourceflow.wire_name = wire,
            sourceflow.entity_id = "42",
            sourceflow.receive_count = 1u32,
            sourceflow.service = "bench",
            otel.status_code = tracing::field::Empty,
        );
        if !span.is_disabled() {
            if let Some(sc) = remote_span_context(parent) {
                let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
            }
        }
        span
    };
    let dispatch = |dest: &str, op: &str| {
        tracing::info_span!(
            "sourceflow.dispatch",
            otel.kind = "producer",
            messaging.system = "aws_sqs",
            messaging.destination.name = dest,
            messaging.operation.type = op,
            messaging.batch.message_count = 1usize,
            sourceflow.service = "bench",
            otel.status_code = tracing::field::Empty,
        )
    };
    let handler = |name: &str| {
        tracing::info_span!(
            "sourceflow.handler",
            sourceflow.handler = name,
            otel.status_code = tracing::field::Empty,
        )
    };
    let metrics = |k: usize| {
        if metrics_on {
            instruments.record(k);
        }
    };
    let start = Instant::now();
    for _ in 0..n {
        let send = dispatch("bench-orders.fifo", "send");
        let tp = send.in_scope(|| traceparent(&send));
        metrics(2);
        drop(send);
        let cmd = process("bench-orders.fifo", "bench.PlaceOrder.v1", &tp);
        let tp = cmd.in_scope(|| {
            let h = handler("place_order");
            let tp = h.in_scope(|| {
                let publish = dispatch("bench-order-events", "publish");
                let tp = publish.in_scope(|| traceparent(&publish));
                metrics(2);
                tp
            });
            metrics(5);
            tp
        });
        drop(cmd);
        let evt = process("bench-placed", "bench.OrderPlaced.v1", &tp);
        evt.in_scope(|| handler("order_placed").in_scope(|| metrics(5)));
    }
    start.elapsed() / n as u32
}

/// The same six spans and 14 instrument calls as [`telemetry_floor`], with the spans made
/// through the OpenTelemetry API directly (`span_builder(..).start_with_context` on the
/// same SDK tracer provider, each span's context carried in an `opentelemetry::Context`)
/// instead of `tracing` and `tracing-opentelemetry`: what spans made outside `tracing`
/// would cost at least. Returns the time per command, `n` commands, on one thread.
fn otel_api_floor(n: u64, tracers: &SdkTracerProvider, meters: &SdkMeterProvider) -> Duration {
    use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer as _};
    use opentelemetry::{Context, KeyValue};
    let tracer = tracers.tracer("floor");
    let instruments = FloorInstruments::new(meters);
    let metrics = |k: usize| instruments.record(k);
    let id = "5f0c6a4e-8a1b-4c2d-9e3f-0a1b2c3d4e5f";
    let traceparent = |cx: &Context| {
        let span = cx.span();
        let sc = span.span_context();
        format!("00-{}-{}-01", sc.trace_id(), sc.span_id())
    };
    let remote = |tp: &str| match remote_span_context(tp) {
        Some(sc) => Context::new().with_remote_span_context(sc),
        None => Context::new(),
    };
    let process = |queue: &'static str, wire: &'static str, tp: &str| {
        let parent = remote(tp);
        let span = tracer
            .span_builder("sourceflow.process")
            .with_kind(SpanKind::Consumer)
            .with_attributes([
                KeyValue::new("messaging.system", "aws_sqs"),
                KeyValue::new("messaging.destination.name", queue),
                KeyValue::new("messaging.operation.type", "process"),
                KeyValue::new("messaging.message.id", id.to_string()),
                KeyValue::new("messaging.message.conversation_id", id.to_string()),
                KeyValue::new("sourceflow.wire_name", wire),
                KeyValue::new("sourceflow.entity_id", "42".to_string()),
                KeyValue::new("sourceflow.receive_count", 1i64),
                KeyValue::new("sourceflow.service", "bench"),
            ])
            .start_with_context(&tracer, &parent);
        parent.with_span(span)
    };
    let dispatch = |parent: &Context, dest: &'static str, op: &'static str| {
        let span = tracer
            .span_builder("sourceflow.dispatch")
            .with_kind(SpanKind::Producer)
            .with_attributes([
                KeyValue::new("messaging.system", "aws_sqs"),
                KeyValue::new("messaging.destination.name", dest),
                KeyValue::new("messaging.operation.type", op),
                KeyValue::new("messaging.batch.message_count", 1i64),
                KeyValue::new("sourceflow.service", "bench"),
            ])
            .start_with_context(&tracer, parent);
        parent.with_span(span)
    };
    let handler = |parent: &Context, name: &'static str| {
        let span = tracer
            .span_builder("sourceflow.handler")
            .with_attributes([KeyValue::new("sourceflow.handler", name)])
            .start_with_context(&tracer, parent);
        parent.with_span(span)
    };
    let start = Instant::now();
    for _ in 0..n {
        let send = dispatch(&Context::new(), "bench-orders.fifo", "send");
        let tp = traceparent(&send);
        metrics(2);
        send.span().end();
        let cmd = process("bench-orders.fifo", "bench.PlaceOrder.v1", &tp);
        let h = handler(&cmd, "place_order");
        let publish = dispatch(&h, "bench-order-events", "publish");
        let tp = traceparent(&publish);
        metrics(2);
        publish.span().end();
        h.span().end();
        metrics(5);
        cmd.span().end();
        let evt = process("bench-placed", "bench.OrderPlaced.v1", &tp);
        let h = handler(&evt, "order_placed");
        metrics(5);
        h.span().end();
        evt.span().end();
    }
    start.elapsed() / n as u32
}

fn median(mut v: Vec<Measured>) -> Measured {
    v.sort_by_key(|m| m.elapsed);
    v.remove(v.len() / 2)
}

/// Runs every row and prints the table (also the entry point of `throughput_mimalloc`).
pub fn main() {
    let _ = epoch();
    // Telemetry is switched on and off with a reloadable filter on one global subscriber.
    let tracer = SdkTracerProvider::builder()
        .with_batch_exporter(DropExporter)
        .build();
    // Two layers into the same tracer, each behind its own switch: the one the README
    // recommends (`sourceflow::telemetry::layer`) and `tracing-opentelemetry`'s defaults.
    let (filter, switch) = reload::Layer::new(LevelFilter::OFF);
    let (filter_defaults, switch_defaults) = reload::Layer::new(LevelFilter::OFF);
    tracing_subscriber::registry()
        .with(sourceflow::telemetry::layer(tracer.tracer("bench")).with_filter(filter))
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer.tracer("bench"))
                .with_filter(filter_defaults),
        )
        .init();
    let meters = SdkMeterProvider::builder()
        .with_periodic_exporter(InMemoryMetricExporter::default())
        .build();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let level = |on: bool| {
        if on {
            LevelFilter::INFO
        } else {
            LevelFilter::OFF
        }
    };
    let set_telemetry = |on: bool| switch.modify(|f| *f = level(on)).expect("reload");
    let set_telemetry_defaults =
        |on: bool| switch_defaults.modify(|f| *f = level(on)).expect("reload");

    let mut rows: Vec<(&str, Vec<Measured>)> = vec![
        ("baseline: JSON over tokio mpsc", Vec::new()),
        ("sourceflow (defaults)", Vec::new()),
        ("sourceflow, no idempotency", Vec::new()),
        ("sourceflow, telemetry on", Vec::new()),
        ("sourceflow, telemetry on, layer defaults", Vec::new()),
        ("sourceflow, telemetry on, direct spans", Vec::new()),
    ];
    // Words on the command line (cargo passes `--bench`, skipped) pick the rows to run, e.g.
    // `telemetry` to profile that row alone; none runs them all.
    let words: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run: Vec<bool> = rows
        .iter()
        .map(|(name, _)| words.is_empty() || words.iter().any(|w| name.contains(w.as_str())))
        .collect();
    rt.block_on(async {
        // Warm-up.
        baseline().await;
        framework(Mode::Defaults, &meters, &tracer).await;
        for _ in 0..ROUNDS {
            if run[0] {
                rows[0].1.push(baseline().await);
            }
            if run[1] {
                rows[1]
                    .1
                    .push(framework(Mode::Defaults, &meters, &tracer).await);
            }
            if run[2] {
                rows[2]
                    .1
                    .push(framework(Mode::NoIdempotency, &meters, &tracer).await);
            }
            if run[3] {
                set_telemetry(true);
                rows[3]
                    .1
                    .push(framework(Mode::Telemetry, &meters, &tracer).await);
                set_telemetry(false);
            }
            if run[4] {
                set_telemetry_defaults(true);
                rows[4]
                    .1
                    .push(framework(Mode::Telemetry, &meters, &tracer).await);
                set_telemetry_defaults(false);
            }
            if run[5] {
                rows[5]
                    .1
                    .push(framework(Mode::TelemetryDirect, &meters, &tracer).await);
            }
        }
    });
    let results: Vec<(&str, Option<Measured>)> = rows
        .into_iter()
        .map(|(n, v)| (n, (!v.is_empty()).then(|| median(v))))
        .collect();
    println!(
        "embedded transport, {COMMANDS} commands + {COMMANDS} events per round, {GROUPS} FIFO groups, \
         concurrency {CONCURRENCY}, 2 worker threads, median of {ROUNDS} rounds"
    );
    if ALLOCATIONS.get().is_some() {
        // The counting binary: allocations, not rates (its shared counter slows it down).
        println!("{:<42} {:>22}", "", "allocations per command");
        for (name, m) in &results {
            if let Some(n) = m.as_ref().and_then(|m| m.allocations) {
                println!("{:<42} {:>22.1}", name, n as f64 / COMMANDS as f64);
            }
        }
    } else {
        print_rates(&results, &tracer, &meters, set_telemetry);
    }
    let _ = tracer.shutdown();
}

/// The rates table, the telemetry overhead and its floor (the timing binaries).
fn print_rates(
    results: &[(&str, Option<Measured>)],
    tracers: &SdkTracerProvider,
    meters: &SdkMeterProvider,
    set_telemetry: impl Fn(bool),
) {
    let rate = |i: usize| results[i].1.as_ref().map(Measured::handled_per_sec);
    println!(
        "{:<42} {:>14} {:>10} {:>10} {:>10}",
        "", "handled msg/s", "vs base", "p50", "p99"
    );
    for (name, m) in results {
        let Some(m) = m else { continue };
        let vs_base = rate(0).map_or(f64::NAN, |base| m.handled_per_sec() / base);
        println!(
            "{:<42} {:>14.0} {:>10.2} {:>8.2}ms {:>8.2}ms",
            name,
            m.handled_per_sec(),
            vs_base,
            m.p50.as_secs_f64() * 1e3,
            m.p99.as_secs_f64() * 1e3
        );
    }
    if let (Some(defaults), Some(on)) = (rate(1), rate(4)) {
        println!(
            "telemetry overhead, tracing-opentelemetry's defaults: {:.1}% (vs sourceflow defaults)",
            (1.0 - on / defaults) * 100.0
        );
    }
    if let (Some(defaults), Some(on)) = (rate(1), rate(5)) {
        println!(
            "telemetry overhead, spans made directly (Builder::tracer_provider): {:.1}% (vs sourceflow defaults)",
            (1.0 - on / defaults) * 100.0
        );
    }
    if let (Some(defaults), Some(on)) = (rate(1), rate(3)) {
        println!(
            "telemetry overhead: {:.1}% (sourceflow, telemetry on vs defaults)",
            (1.0 - on / defaults) * 100.0
        );
        // The floor, off then on, on this thread (the runtime is idle now).
        let n = 20_000;
        let off = telemetry_floor(n, meters, false);
        set_telemetry(true);
        let on_cost = telemetry_floor(n, meters, true);
        set_telemetry(false);
        let api = otel_api_floor(n, tracers, meters);
        // Per command the defaults row takes 2/rate of wall time on two workers; the floor's
        // CPU, spread over both, adds half of it to the wall time at best.
        let per_command = 2.0 / defaults;
        for (floor, through) in [
            (on_cost, "sourceflow::telemetry::layer and the SDKs"),
            (api, "the OpenTelemetry API directly and the SDKs"),
        ] {
            let floor = floor.saturating_sub(off);
            let added = floor.as_secs_f64() / 2.0;
            println!(
                "telemetry floor: {:.2} µs of CPU per command (6 spans, 14 instrument calls) through {through} alone = at least {:.1}% overhead on the defaults' {:.2} µs per command, spread over both workers",
                floor.as_secs_f64() * 1e6,
                added / (per_command + added) * 100.0,
                per_command * 1e6
            );
        }
    }
}
