//! What the claim check costs per message on an AWS API (the emulator): the same service,
//! the same 200 KiB command, sent inline and through S3 (threshold lowered to 1 KiB), in
//! one run, plus a 2 MiB command (over SQS's limit, so S3 is the only way), with the AWS
//! requests per message counted by an SDK interceptor.
//!
//! ```text
//! eval "$(tests/support/emulator.sh start)"    # with S3 in SERVICES
//! cargo bench -p sourceflow --bench claim_check
//! ```
//!
//! Four producer tasks send; the service's own listener (concurrency 16, 1 s receive wait)
//! receives, fetches, verifies and handles. A round is timed from the first send to the
//! last handler; rounds alternate inline / stored, the median is reported.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sourceflow::transport::aws::{AwsTransport, RequestCounter};
use sourceflow::{command, handler, ClaimCheck, State};

const ROUNDS: usize = 3;
const PRODUCERS: usize = 4;
const BUCKET: &str = "sourceflow-bench-claims";

#[command(queue = "bench-cc-blobs", name = "bench.Blob.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Blob {
    pub n: u64,
    pub data: String,
}

#[derive(Clone, Default)]
pub struct Done(Arc<AtomicUsize>);

#[handler]
async fn blob(b: Blob, State(d): State<Done>) -> sourceflow::Result<()> {
    assert!(!b.data.is_empty());
    d.0.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

struct Run {
    elapsed: Duration,
    messages: usize,
    operations: Vec<(String, u64)>,
}

impl Run {
    fn ms_per_message(&self) -> f64 {
        self.elapsed.as_secs_f64() * 1000.0 / self.messages as f64
    }

    fn requests(&self) -> String {
        self.operations
            .iter()
            .map(|(op, n)| format!("{op} {:.2}", *n as f64 / self.messages as f64))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

async fn round(prefix: &str, claim: Option<ClaimCheck>, size: usize, messages: usize) -> Run {
    let cfg = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    let counter = RequestCounter::new();
    let transport = AwsTransport::from_sdk_config_counted(&cfg, &counter);
    let done = Done::default();
    let mut builder = sourceflow::builder()
        .service("bench-cc")
        .prefix(prefix)
        .transport(transport)
        .handlers(|_| true)
        .state(done.clone())
        .concurrency(16)
        .receive_wait(Duration::from_secs(1))
        .depth_sample_interval(Duration::ZERO);
    if let Some(c) = claim {
        builder = builder.claim_check(c);
    }
    let app = builder.start().await.expect("start");
    let data: Arc<str> = "x".repeat(size).into();
    counter.reset();
    let start = Instant::now();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let (app, data) = (app.clone(), data.clone());
            tokio::spawn(async move {
                for n in (p..messages).step_by(PRODUCERS) {
                    let data = data.to_string();
                    app.send(Blob { n: n as u64, data }).await.expect("send");
                }
            })
        })
        .collect();
    for p in producers {
        p.await.expect("producer");
    }
    while done.0.load(Ordering::Relaxed) < messages {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed();
    let operations = counter.by_operation();
    app.shutdown().await.expect("shutdown");
    Run {
        elapsed,
        messages,
        operations,
    }
}

fn median(mut v: Vec<Run>) -> Run {
    v.sort_by_key(|r| r.elapsed);
    v.remove(v.len() / 2)
}

fn main() {
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap_or_default();
    if !endpoint.starts_with("http://127.0.0.1")
        && std::env::var("SOURCEFLOW_BENCH_REAL_AWS").as_deref() != Ok("1")
    {
        eprintln!("start the emulator first: eval \"$(tests/support/emulator.sh start)\" (or set SOURCEFLOW_BENCH_REAL_AWS=1)");
        return;
    }
    let messages: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(200);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let prefix = format!("bench{}", fastrand::u32(..) % 100_000);
        let stored = || Some(ClaimCheck::bucket(BUCKET).threshold(1024));
        let (mut inline, mut through_s3, mut large) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            inline.push(round(&prefix, None, 200 * 1024, messages).await);
            through_s3.push(round(&prefix, stored(), 200 * 1024, messages).await);
            large.push(round(&prefix, stored(), 2 * 1024 * 1024, messages / 4).await);
        }
        let (i, s, l) = (median(inline), median(through_s3), median(large));
        println!(
            "AWS API (emulator at {endpoint}), {messages} messages per round ({} for 2 MiB), median of {ROUNDS} rounds",
            messages / 4
        );
        println!("{:<32} {:>10} {:>12}", "", "ms/msg", "messages/s");
        for (name, r) in [
            ("200 KiB inline", &i),
            ("200 KiB through S3", &s),
            ("2 MiB through S3", &l),
        ] {
            println!(
                "{name:<32} {:>10.2} {:>12.0}",
                r.ms_per_message(),
                1000.0 / r.ms_per_message()
            );
        }
        println!(
            "ratio: the claim check costs {:.2}x the inline message of the same size",
            s.ms_per_message() / i.ms_per_message()
        );
        println!("requests/msg by operation:");
        println!("  200 KiB inline:     {}", i.requests());
        println!("  200 KiB through S3: {}", s.requests());
        println!("  2 MiB through S3:   {}", l.requests());
    });
}
