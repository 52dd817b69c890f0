//! Throughput on an AWS API (the emulator) next to a hand-written `aws-sdk-sqs` loop doing
//! the same work, in one run, with the AWS requests per message counted by an SDK
//! interceptor.
//!
//! ```text
//! eval "$(tests/support/emulator.sh start)"
//! cargo bench -p sourceflow --bench aws_throughput
//! ```
//!
//! Both sides move the same command envelopes through one standard SQS queue: 8 producer
//! tasks send, consumers receive (long polling, 10 at a time), decode the envelope and
//! payload, and delete. The hand-written loop uses `SendMessageBatch` of 10, four receive
//! loops and `DeleteMessageBatch` per received batch — what a careful developer writes by
//! hand. sourceflow uses its defaults (idempotency on) with concurrency 40 and, like the
//! hand-written loop, a 1 s receive wait (see below); its producers send ten commands per
//! `Handle::send_all` (the loop's batches), and in a second row one per `send`, which the
//! transport coalesces across the 8 producers. Rounds alternate;
//! the median is reported. The emulator's single Python process is the ceiling here.
//!
//! `sourceflow/peers/benches/aws_peers.rs` includes this file (`#[path]`) to run the same
//! two sides next to the `omniqueue` crate, hence the `pub(crate)` items.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sourceflow::envelope::{self, SendMeta};
use sourceflow::transport::aws::{AwsTransport, RequestCounter};
use sourceflow::{command, handler, State};

pub(crate) const MESSAGES: usize = 2_000;
const ROUNDS: usize = 3;

pub(crate) const PRODUCERS: usize = 8;

#[command(queue = "bench-aws-work", name = "bench.Work.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Work {
    pub n: u64,
    pub note: String,
}

#[derive(Clone, Default)]
pub struct Done(Arc<AtomicUsize>);

#[handler]
async fn work(_w: Work, State(d): State<Done>) -> sourceflow::Result<()> {
    d.0.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

pub(crate) fn item(n: u64) -> Work {
    Work {
        n,
        note: "a typical small command payload".into(),
    }
}

pub(crate) async fn config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await
}

pub(crate) struct Run {
    pub(crate) elapsed: Duration,
    pub(crate) requests: u64,
    /// Requests by API operation, most first.
    pub(crate) operations: Vec<(String, u64)>,
}

/// `SendMessageBatch 0.100, ReceiveMessage 0.120, …`: requests per message by operation.
pub(crate) fn per_operation(r: &Run) -> String {
    r.operations
        .iter()
        .map(|(op, n)| format!("{op} {:.3}", *n as f64 / MESSAGES as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

/// sourceflow with its producers sending ten commands per `send_all` — what the
/// hand-written loop's producers do with `SendMessageBatch`.
pub(crate) async fn framework(prefix: &str) -> Run {
    framework_with(prefix, 10).await
}

/// sourceflow with its producers sending `per_call` commands per call (1: `send`).
pub(crate) async fn framework_with(prefix: &str, per_call: usize) -> Run {
    let counter = RequestCounter::new();
    let transport = AwsTransport::from_sdk_config_counted(&config().await, &counter);
    let done = Done::default();
    let app = sourceflow::builder()
        .service("bench")
        .prefix(prefix)
        .transport(transport)
        .handlers_in(module_path!())
        .state(done.clone())
        .concurrency(40)
        // LocalStack answers a 20 s long poll late when messages arrive while several
        // receivers wait (the last messages of a round waited ~20 s); a 1 s wait, as in the
        // hand-written loop, measures throughput instead of that emulator lag.
        // BENCH_WAIT=20 shows it.
        .receive_wait(Duration::from_secs(
            std::env::var("BENCH_WAIT")
                .ok()
                .and_then(|w| w.parse().ok())
                .unwrap_or(1),
        ))
        .depth_sample_interval(Duration::ZERO)
        .start()
        .await
        .expect("start");
    counter.reset();
    let start = Instant::now();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let app = app.clone();
            tokio::spawn(async move {
                let mine: Vec<u64> = (p..MESSAGES).step_by(PRODUCERS).map(|n| n as u64).collect();
                for chunk in mine.chunks(per_call) {
                    match chunk {
                        [n] => drop(app.send(item(*n)).await.expect("send")),
                        _ => drop(
                            app.send_all(chunk.iter().map(|n| item(*n)))
                                .await
                                .expect("send_all"),
                        ),
                    }
                }
            })
        })
        .collect();
    for p in producers {
        p.await.expect("producer");
    }
    while done.0.load(Ordering::Relaxed) < MESSAGES {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed();
    let requests = counter.total();
    let operations = counter.by_operation();
    app.shutdown().await.expect("shutdown");
    Run {
        elapsed,
        requests,
        operations,
    }
}

pub(crate) async fn hand_written(queue_url: &str) -> Run {
    use aws_sdk_sqs::types::{
        DeleteMessageBatchRequestEntry, MessageAttributeValue, SendMessageBatchRequestEntry,
    };
    let counter = RequestCounter::new();
    let conf = aws_sdk_sqs::config::Builder::from(&config().await)
        .interceptor(counter.clone())
        .build();
    let sqs = aws_sdk_sqs::Client::from_conf(conf);
    let done = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let consumers: Vec<_> = (0..4)
        .map(|_| {
            let sqs = sqs.clone();
            let url = queue_url.to_string();
            let done = done.clone();
            tokio::spawn(async move {
                while done.load(Ordering::Relaxed) < MESSAGES {
                    let out = sqs
                        .receive_message()
                        .queue_url(&url)
                        .max_number_of_messages(10)
                        .wait_time_seconds(1)
                        .message_attribute_names("All")
                        .send()
                        .await
                        .expect("receive");
                    let msgs = out.messages();
                    if msgs.is_empty() {
                        continue;
                    }
                    let mut entries = Vec::new();
                    for (i, m) in msgs.iter().enumerate() {
                        let attrs: Vec<(sourceflow::AttributeName, sourceflow::AttributeValue)> = m
                            .message_attributes()
                            .map(|a| {
                                a.iter()
                                    .filter_map(|(k, v)| {
                                        Some((k.clone().into(), v.string_value()?.into()))
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        let env = envelope::decode(m.body().unwrap_or_default(), &attrs)
                            .expect("envelope");
                        let w: Work = serde_json::from_str(env.payload.get()).expect("payload");
                        std::hint::black_box(w);
                        entries.push(
                            DeleteMessageBatchRequestEntry::builder()
                                .id(i.to_string())
                                .receipt_handle(m.receipt_handle().unwrap_or_default())
                                .build()
                                .expect("entry"),
                        );
                    }
                    let n = entries.len();
                    sqs.delete_message_batch()
                        .queue_url(&url)
                        .set_entries(Some(entries))
                        .send()
                        .await
                        .expect("delete");
                    done.fetch_add(n, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let sqs = sqs.clone();
            let url = queue_url.to_string();
            tokio::spawn(async move {
                let mine: Vec<usize> = (p..MESSAGES).step_by(PRODUCERS).collect();
                for chunk in mine.chunks(10) {
                    let entries = chunk
                        .iter()
                        .enumerate()
                        .map(|(i, n)| {
                            let out = envelope::encode(&item(*n as u64), SendMeta::default())
                                .expect("encode");
                            let mut e = SendMessageBatchRequestEntry::builder()
                                .id(i.to_string())
                                .message_body(&*out.body);
                            for (k, v) in out.attributes.iter() {
                                e = e.message_attributes(
                                    k.clone(),
                                    MessageAttributeValue::builder()
                                        .data_type(v.data_type())
                                        .string_value(v.as_str())
                                        .build()
                                        .expect("attr"),
                                );
                            }
                            e.build().expect("entry")
                        })
                        .collect();
                    sqs.send_message_batch()
                        .queue_url(&url)
                        .set_entries(Some(entries))
                        .send()
                        .await
                        .expect("send");
                }
            })
        })
        .collect();
    for p in producers {
        p.await.expect("producer");
    }
    for c in consumers {
        c.await.expect("consumer");
    }
    Run {
        elapsed: start.elapsed(),
        requests: counter.total(),
        operations: counter.by_operation(),
    }
}

pub(crate) fn median(mut v: Vec<Run>) -> Run {
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let prefix = format!("bench{}", fastrand::u32(..) % 100_000);
        let sqs = aws_sdk_sqs::Client::new(&config().await);
        let baseline_queue = sqs
            .create_queue()
            .queue_name(format!("{prefix}-handwritten"))
            .send()
            .await
            .expect("queue");
        let url = baseline_queue.queue_url().expect("url").to_string();
        let (mut ours, mut single, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            theirs.push(hand_written(&url).await);
            ours.push(framework(&prefix).await);
            single.push(framework_with(&prefix, 1).await);
        }
        let (o, s, t) = (median(ours), median(single), median(theirs));
        let rate = |r: &Run| MESSAGES as f64 / r.elapsed.as_secs_f64();
        println!("AWS API (emulator at {endpoint}), {MESSAGES} messages per round, median of {ROUNDS} rounds");
        println!("{:<28} {:>12} {:>16}", "", "messages/s", "requests/msg");
        println!(
            "{:<28} {:>12.0} {:>16.3}",
            "hand-written aws-sdk-sqs",
            rate(&t),
            t.requests as f64 / MESSAGES as f64
        );
        println!(
            "{:<28} {:>12.0} {:>16.3}",
            "sourceflow (send_all of 10)",
            rate(&o),
            o.requests as f64 / MESSAGES as f64
        );
        println!(
            "{:<28} {:>12.0} {:>16.3}",
            "sourceflow (send, one each)",
            rate(&s),
            s.requests as f64 / MESSAGES as f64
        );
        println!("ratio: {:.2} of the hand-written loop ({:.2} sending one at a time)", rate(&o) / rate(&t), rate(&s) / rate(&t));
        println!("requests/msg by operation:");
        println!("  hand-written: {}", per_operation(&t));
        println!("  sourceflow:   {}", per_operation(&o));
        println!("  one each:     {}", per_operation(&s));
    });
}
