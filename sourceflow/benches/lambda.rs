//! `sourceflow::lambda`: the init time of the example function and the per-record cost of
//! the framework against a hand-written `lambda_runtime` batch loop, in one run.
//!
//! ```text
//! cargo bench -p sourceflow --features lambda --bench lambda
//! ```
//!
//! 1. Init: `examples/orders_lambda` (built here in release) started with
//!    `AWS_LAMBDA_RUNTIME_API` pointing at a small HTTP server of the bench's own: the time
//!    from spawning the process to its first `GET /2018-06-01/runtime/invocation/next`, the
//!    moment it is ready for its first invocation (every AWS endpoint is a closed loopback
//!    port: the function makes no call before it). Median of `INIT_RUNS`.
//! 2. Per record: batches of 10 records (`LambdaEvent<SqsEvent>`, the records a receive
//!    from the embedded broker returned, so receipts are real) through
//!    `Function::handle` — decode, route, claim, invoke, commit, settle (delete) — with
//!    idempotency off and on (in-memory store), against a hand-written loop that parses
//!    each body and calls the same handler body, collecting `batchItemFailures`. Rounds
//!    alternate; the median of each is reported, with the ratios.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage, SqsMessageAttribute};
use lambda_runtime::{Context, LambdaEvent};
use serde::{Deserialize, Serialize};
use sourceflow::lambda::Function;
use sourceflow::transport::{Receive, ReceivedMessage, Transport};
use sourceflow::{command, handler, MemoryTransport};
use tokio::io::AsyncReadExt;

const INIT_RUNS: usize = 7;
const BATCHES: usize = 500;
const ROUNDS: usize = 5;

#[command(queue = "bench-payments", name = "bench.Payment.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Payment {
    order_id: u64,
    amount_cents: u64,
}

static CHARGED: AtomicU64 = AtomicU64::new(0);

/// The handler body both sides run.
fn charge(p: &Payment) -> Result<(), String> {
    if p.amount_cents > 1_000_000 {
        return Err("over the limit".into());
    }
    CHARGED.fetch_add(p.amount_cents, Ordering::Relaxed);
    Ok(())
}

#[handler]
async fn pay(p: Payment) -> sourceflow::Result<()> {
    charge(&p).map_err(|e| sourceflow::Error::Other(e.into()))
}

fn main() {
    let init = init_times();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (plain, off, on) = rt.block_on(per_record());
    println!(
        "init (process start -> first /invocation/next), median of {INIT_RUNS}: {:.1} ms",
        ms(init)
    );
    println!("per record, batches of 10, {BATCHES} batches per round, median of {ROUNDS} rounds:");
    println!("  hand-written lambda_runtime loop : {:>8.2} us", us(plain));
    println!(
        "  sourceflow, idempotency off      : {:>8.2} us  ({:.1}x)",
        us(off),
        ratio(off, plain)
    );
    println!(
        "  sourceflow, idempotency on (mem) : {:>8.2} us  ({:.1}x)",
        us(on),
        ratio(on, plain)
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}
fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Builds the example in release and times its cold starts.
fn init_times() -> Duration {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = std::process::Command::new(env!("CARGO"))
        .args([
            "build",
            "-q",
            "--release",
            "-p",
            "sourceflow",
            "--features",
            "lambda",
        ])
        .args(["--example", "orders_lambda"])
        .current_dir(&root)
        .status()
        .expect("cargo");
    assert!(status.success(), "the example builds");
    let target = std::env::var("CARGO_TARGET_DIR").map_or(root.join("target"), Into::into);
    let exe = target.join("release/examples/orders_lambda");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    median(
        (0..INIT_RUNS)
            .map(|_| rt.block_on(one_start(&exe)))
            .collect(),
    )
}

async fn one_start(exe: &std::path::Path) -> Duration {
    let api = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let closed = closed.local_addr().expect("addr");
    let started = Instant::now();
    let mut child = tokio::process::Command::new(exe)
        .env_clear()
        .env(
            "AWS_LAMBDA_RUNTIME_API",
            api.local_addr().expect("addr").to_string(),
        )
        .env("AWS_LAMBDA_FUNCTION_NAME", "orders_lambda")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_REGION", "eu-west-1")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_ENDPOINT_URL", format!("http://{closed}"))
        .env("RUST_LOG", "off")
        .kill_on_drop(true)
        .spawn()
        .expect("the example starts");
    let (mut s, _) = tokio::time::timeout(Duration::from_secs(30), api.accept())
        .await
        .expect("the function polls for an invocation")
        .expect("accept");
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).await.expect("read");
    let took = started.elapsed();
    assert!(
        buf[..n].starts_with(b"GET /2018-06-01/runtime/invocation/next"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    let _ = child.kill().await;
    took
}

/// The three sides' per-record medians: hand-written, sourceflow without and with
/// idempotency.
async fn per_record() -> (Duration, Duration, Duration) {
    let t = MemoryTransport::new();
    let off = function(&t, false).await;
    let on = function(&t, true).await;
    let sender = sourceflow::builder()
        .service("bench-sender")
        .transport(t.clone())
        .handlers(|_| false)
        .start()
        .await
        .expect("sender");
    let (mut plain, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let events = batches(&sender, &t).await;
        plain.push(run(events.clone(), |e| async { hand_written(e) }).await);
        a.push(run(events, |e| off.handle(e)).await);
        let events = batches(&sender, &t).await;
        b.push(run(events, |e| on.handle(e)).await);
    }
    (median(plain), median(a), median(b))
}

async fn function(t: &MemoryTransport, idempotent: bool) -> Function {
    let b = sourceflow::builder()
        .service("bench")
        .transport(t.clone())
        .handlers_in(module_path!());
    let b = match idempotent {
        true => b.idempotency(sourceflow::idempotency::MemoryIdempotencyStore::new()),
        false => b.without_idempotency(),
    };
    Function::new(b).await.expect("function")
}

/// Per-record time of handling every batch.
async fn run<F, Fut, E>(events: Vec<SqsEvent>, handle: F) -> Duration
where
    F: Fn(LambdaEvent<SqsEvent>) -> Fut,
    Fut: std::future::Future<Output = Result<SqsBatchResponse, E>>,
    E: std::fmt::Debug,
{
    let records: usize = events.iter().map(|e| e.records.len()).sum();
    let started = Instant::now();
    for e in events {
        let r = handle(LambdaEvent::new(e, Context::default()))
            .await
            .expect("handled");
        assert!(r.batch_item_failures.is_empty());
    }
    started.elapsed() / records as u32
}

/// `BATCHES` batches of 10 records, sent with the framework and received from the
/// embedded broker.
async fn batches(sender: &sourceflow::Handle, t: &MemoryTransport) -> Vec<SqsEvent> {
    for i in 0..BATCHES * 10 {
        let p = Payment {
            order_id: i as u64,
            amount_cents: 1_000 + i as u64,
        };
        sender.send(p).await.expect("send");
    }
    let mut events = Vec::with_capacity(BATCHES);
    while events.len() < BATCHES {
        let got = t
            .receive(
                "bench-payments",
                Receive {
                    max: 10,
                    wait: Duration::ZERO,
                    visibility: Duration::from_secs(300),
                },
            )
            .await
            .expect("receive");
        let mut e = SqsEvent::default();
        e.records = got.iter().map(record).collect();
        events.push(e);
    }
    events
}

fn record(m: &ReceivedMessage) -> SqsMessage {
    let mut r = SqsMessage::default();
    r.message_id = Some(m.broker_id.to_string());
    r.receipt_handle = Some(m.receipt.to_string());
    r.body = Some(m.body.to_string());
    r.event_source_arn = Some("arn:aws:sqs:eu-west-1:000000000000:bench-payments".into());
    r.attributes.insert(
        "ApproximateReceiveCount".into(),
        m.receive_count.to_string(),
    );
    for (k, v) in m.attributes.iter() {
        let mut a = SqsMessageAttribute::default();
        a.data_type = Some(v.data_type().into());
        a.string_value = Some(v.as_str().into());
        r.message_attributes.insert(k.to_string(), a);
    }
    r
}

/// The loop a user writes with `lambda_runtime` alone: parse each body, run the handler
/// body, report what failed.
fn hand_written(e: LambdaEvent<SqsEvent>) -> Result<SqsBatchResponse, String> {
    #[derive(Deserialize)]
    struct Body {
        payload: Payment,
    }
    let mut r = SqsBatchResponse::default();
    for rec in &e.payload.records {
        let ok = serde_json::from_str::<Body>(rec.body.as_deref().unwrap_or_default())
            .map_err(|e| e.to_string())
            .and_then(|b| charge(&b.payload));
        if ok.is_err() {
            r.add_failure(rec.message_id.clone().unwrap_or_default());
        }
    }
    Ok(r)
}
