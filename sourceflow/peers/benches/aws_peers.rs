//! sourceflow next to its Rust peers on an AWS API (the emulator), in one run: the
//! hand-written `aws-sdk-sqs` loop and sourceflow of `sourceflow/benches/aws_throughput.rs`
//! (that file is included here, so both sides are the same code), and the `omniqueue`
//! crate's SQS backend.
//!
//! ```text
//! eval "$(tests/support/emulator.sh start)"
//! cargo bench --manifest-path sourceflow/peers/Cargo.toml
//! ```
//!
//! Every side moves `MESSAGES` sourceflow command envelopes through a standard SQS queue
//! of its own, sent by `PRODUCERS` tasks and received by consumers that decode the envelope
//! and the payload, then delete. Rounds alternate (hand-written, sourceflow, omniqueue); the
//! median of `ROUNDS` is reported. AWS requests are counted by sourceflow's
//! `RequestCounter`, an SDK interceptor, on every side: omniqueue takes the SQS client
//! config it uses (`QueueBuilder::sqs_config`), so it gets one built with the interceptor.
//!
//! omniqueue 0.3 side, written as its API allows at best: producers send batches of 10
//! (`send_raw_batch`, one `SendMessageBatch`); four consumers call `receive_all(10, 1 s)`
//! (one `ReceiveMessage` of up to 10, 1 s wait, like the hand-written loop) and ack every
//! delivery of a batch concurrently. omniqueue has no batch ack: each ack is one
//! `DeleteMessage`. It carries no message attributes, so its consumer passes the one
//! attribute the envelope decoder checks (the type) from what it knows the queue carries.
//!
//! FIFO: omniqueue's SQS producer sets no `MessageGroupId` (nor a deduplication id) and
//! has no way to set one, which SQS requires on every send to a FIFO queue. The bench
//! sends one message to a FIFO queue through omniqueue and prints what happens.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use omniqueue::backends::{SqsBackend, SqsConfig};
use omniqueue::QueueProducer as _;
use sourceflow::envelope::{self, attr, SendMeta};
use sourceflow::transport::aws::RequestCounter;
use sourceflow::Message as _;

#[allow(dead_code)] // its own `main` is not used here
#[path = "../../benches/aws_throughput.rs"]
mod aws_throughput;

use aws_throughput::{config, framework, hand_written, item, median, Run, MESSAGES, PRODUCERS};

const ROUNDS: usize = 3;
const CONSUMERS: usize = 4;

async fn counted_sqs_config(counter: &RequestCounter) -> aws_sdk_sqs::Config {
    aws_sdk_sqs::config::Builder::from(&config().await)
        .interceptor(counter.clone())
        .build()
}

async fn omniqueue_side(queue_url: &str) -> Run {
    let counter = RequestCounter::new();
    let (producer, consumer) = SqsBackend::builder(SqsConfig {
        queue_dsn: queue_url.to_string(),
        override_endpoint: false,
    })
    .sqs_config(counted_sqs_config(&counter).await)
    .build_pair()
    .await
    .expect("omniqueue pair");
    let (producer, consumer) = (Arc::new(producer), Arc::new(consumer));
    let done = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let consumers: Vec<_> = (0..CONSUMERS)
        .map(|_| {
            let (consumer, done) = (consumer.clone(), done.clone());
            tokio::spawn(async move {
                let attributes = vec![(
                    sourceflow::AttributeName::from(attr::TYPE),
                    aws_throughput::Work::NAME.to_string().into(),
                )];
                while done.load(Ordering::Relaxed) < MESSAGES {
                    let deliveries = consumer
                        .receive_all(10, Duration::from_secs(1))
                        .await
                        .expect("receive");
                    if deliveries.is_empty() {
                        continue;
                    }
                    let n = deliveries.len();
                    let acks = deliveries.into_iter().map(|d| {
                        let body = std::str::from_utf8(d.borrow_payload().unwrap_or_default())
                            .expect("utf-8")
                            .to_string();
                        let env = envelope::decode(&body, &attributes).expect("envelope");
                        let w: aws_throughput::Work =
                            serde_json::from_str(env.payload.get()).expect("payload");
                        std::hint::black_box(w);
                        async move { d.ack().await.map_err(|(e, _)| e).expect("ack") }
                    });
                    futures_util::future::join_all(acks).await;
                    done.fetch_add(n, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let producer = producer.clone();
            tokio::spawn(async move {
                let mine: Vec<usize> = (p..MESSAGES).step_by(PRODUCERS).collect();
                for chunk in mine.chunks(10) {
                    let bodies: Vec<String> = chunk
                        .iter()
                        .map(|n| {
                            envelope::encode(&item(*n as u64), SendMeta::default())
                                .expect("encode")
                                .body
                                .to_string()
                        })
                        .collect();
                    // omniqueue takes items that are `AsRef<String>`.
                    let batch: Vec<Arc<String>> = bodies.into_iter().map(Arc::new).collect();
                    producer.send_raw_batch(batch).await.expect("send");
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

/// What omniqueue does with a FIFO queue: one send, its result.
async fn omniqueue_fifo(sqs: &aws_sdk_sqs::Client, prefix: &str) -> String {
    let fifo = sqs
        .create_queue()
        .queue_name(format!("{prefix}-omniqueue.fifo"))
        .attributes(aws_sdk_sqs::types::QueueAttributeName::FifoQueue, "true")
        .send()
        .await
        .expect("FIFO queue");
    let url = fifo.queue_url().expect("url").to_string();
    let producer = SqsBackend::builder(SqsConfig {
        queue_dsn: url,
        override_endpoint: false,
    })
    .sqs_config(aws_sdk_sqs::Config::from(&config().await))
    .build_producer()
    .await
    .expect("omniqueue producer");
    match producer.send_raw("{}").await {
        Ok(()) => "accepted (unexpected: SQS requires a MessageGroupId on FIFO queues)".into(),
        Err(e) => format!("refused: {e}"),
    }
}

fn main() {
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap_or_default();
    if !endpoint.starts_with("http://127.0.0.1") {
        eprintln!("start the emulator first: eval \"$(tests/support/emulator.sh start)\"");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let prefix = format!("peers{}", fastrand::u32(..) % 100_000);
        let sqs = aws_sdk_sqs::Client::new(&config().await);
        let mut urls = Vec::new();
        for side in ["handwritten", "omniqueue"] {
            let q = sqs
                .create_queue()
                .queue_name(format!("{prefix}-{side}"))
                .send()
                .await
                .expect("queue");
            urls.push(q.queue_url().expect("url").to_string());
        }
        let (mut loop_runs, mut ours, mut omni) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            loop_runs.push(hand_written(&urls[0]).await);
            ours.push(framework(&prefix).await);
            omni.push(omniqueue_side(&urls[1]).await);
        }
        let fifo = omniqueue_fifo(&sqs, &prefix).await;
        let (l, o, q) = (median(loop_runs), median(ours), median(omni));
        let rate = |r: &Run| MESSAGES as f64 / r.elapsed.as_secs_f64();
        println!(
            "AWS API (emulator at {endpoint}), standard queue, {MESSAGES} messages per round, median of {ROUNDS} rounds"
        );
        println!(
            "| | messages/s | vs hand-written | AWS requests per message |\n|---|---|---|---|"
        );
        for (name, r) in [
            ("hand-written aws-sdk-sqs loop", &l),
            ("sourceflow (defaults)", &o),
            ("omniqueue 0.3 (sqs)", &q),
        ] {
            println!(
                "| {name} | {:.0} | {:.2} | {:.3} |",
                rate(r),
                rate(r) / rate(&l),
                r.requests as f64 / MESSAGES as f64
            );
        }
        println!("omniqueue on a FIFO queue: {fifo}");
    });
}
