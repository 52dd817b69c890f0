//! `sourceflow::lambda` against the emulator: the function handler called in process with
//! `LambdaEvent<SqsEvent>`s whose records were received from SQS (LocalStack) with the
//! plain SDK — real attributes, real envelopes sent by the framework, real receipt
//! handles — and the orders example's function under `cargo lambda watch`.
//!
//! ```text
//! set -a; source servers.env; set +a     # or: eval "$(tests/support/emulator.sh start)"
//! SOURCEFLOW_TEST_AWS=1 cargo test -p sourceflow --features lambda --test lambda
//! ```

mod app;
mod batches;
#[path = "../../examples/orders.rs"]
#[allow(dead_code)]
mod orders;
mod watch;

use std::collections::HashMap;
use std::time::Duration;

use aws_lambda_events::event::sqs::SqsEvent;
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use lambda_runtime::{Context, LambdaEvent};
use sourceflow::lambda::Function;
use sourceflow::transport::aws::{AwsTransport, ProvisionMode};
use sourceflow::RetryPolicy;

#[path = "../common/emulator.rs"]
mod emulator;

pub(crate) fn enabled() -> bool {
    emulator::enabled("SOURCEFLOW_TEST_AWS", "tests/run.sh does")
}

/// A resource prefix of this test's own.
pub(crate) fn prefix() -> String {
    format!("lam{}", fastrand::u32(..) % 1_000_000)
}

pub(crate) async fn sdk_config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await
}

/// A transport that creates what is missing (the tests' setup).
pub(crate) async fn creating() -> AwsTransport {
    AwsTransport::from_sdk_config(&sdk_config().await).provision_mode(ProvisionMode::Create)
}

/// The service the test functions run, under `prefix`: the handlers of [`app`], two
/// handler attempts, a one-second retry backoff.
pub(crate) async fn service(prefix: &str, transport: AwsTransport) -> sourceflow::Builder {
    sourceflow::builder()
        .service("lambda-test")
        .prefix(prefix)
        .transport(transport)
        .handlers_in("lambda::app")
        .max_receive_count(2)
        .retry(RetryPolicy::exponential(
            Duration::from_secs(1),
            Duration::from_secs(1),
        ))
}

/// The function, with idempotency on (the in-memory store) or off.
pub(crate) async fn function(prefix: &str, idempotent: bool) -> Function {
    let b = service(prefix, creating().await).await;
    let b = match idempotent {
        true => b.idempotency(sourceflow::idempotency::MemoryIdempotencyStore::new()),
        false => b.without_idempotency(),
    };
    Function::new(b).await.expect("the function starts")
}

/// A running service of the same prefix with no handlers, to send with the framework.
pub(crate) async fn sender(prefix: &str) -> sourceflow::Handle {
    sourceflow::builder()
        .service("lambda-sender")
        .prefix(prefix)
        .transport(creating().await)
        .handlers(|_| false)
        .start()
        .await
        .expect("the sender starts")
}

/// An invocation of `event` with a deadline a minute away.
pub(crate) fn invocation(event: SqsEvent) -> LambdaEvent<SqsEvent> {
    let mut ctx = Context::default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    ctx.deadline = (now + Duration::from_secs(60)).as_millis() as u64;
    ctx.request_id = format!("req-{}", fastrand::u64(..));
    LambdaEvent::new(event, ctx)
}

/// SQS as the plain SDK sees it.
pub(crate) struct Sqs {
    pub sqs: aws_sdk_sqs::Client,
}

impl Sqs {
    pub(crate) async fn new() -> Self {
        Sqs {
            sqs: aws_sdk_sqs::Client::new(&sdk_config().await),
        }
    }

    pub(crate) async fn url(&self, queue: &str) -> String {
        self.sqs
            .get_queue_url()
            .queue_name(queue)
            .send()
            .await
            .expect("queue url")
            .queue_url()
            .expect("url")
            .to_string()
    }

    async fn arn(&self, url: &str) -> String {
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .expect("queue attributes");
        out.attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn))
            .expect("QueueArn")
            .clone()
    }

    /// Receives until `n` messages came (or `wait` passed), as an event source mapping
    /// would: every message and system attribute, the queue's own visibility timeout.
    /// The records are the JSON Lambda sends, parsed as `aws_lambda_events` parses it.
    pub(crate) async fn event(&self, queue: &str, n: usize, wait: Duration) -> SqsEvent {
        let url = self.url(queue).await;
        let arn = self.arn(&url).await;
        let started = std::time::Instant::now();
        let mut records = Vec::new();
        while records.len() < n && started.elapsed() < wait {
            let out = self
                .sqs
                .receive_message()
                .queue_url(&url)
                .max_number_of_messages(10.min(n - records.len()) as i32)
                .wait_time_seconds(1)
                .message_attribute_names("All")
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .send()
                .await
                .expect("receive");
            records.extend(out.messages().iter().map(|m| record(m, &arn)));
        }
        serde_json::from_value(serde_json::json!({ "Records": records })).expect("an SqsEvent")
    }

    /// Sends a raw body with raw attributes (a foreign producer, or a copy of a message).
    pub(crate) async fn send_raw(
        &self,
        queue: &str,
        body: &str,
        attributes: &HashMap<String, aws_lambda_events::event::sqs::SqsMessageAttribute>,
    ) {
        let mut req = self
            .sqs
            .send_message()
            .queue_url(self.url(queue).await)
            .message_body(body);
        for (k, a) in attributes {
            let v = aws_sdk_sqs::types::MessageAttributeValue::builder()
                .data_type(a.data_type.clone().unwrap_or_default())
                .set_string_value(a.string_value.clone())
                .build()
                .expect("attribute");
            req = req.message_attributes(k, v);
        }
        req.send().await.expect("send");
    }

    /// The messages now on `queue` (received and left in flight), with their
    /// `sourceflow.dlq_reason`.
    pub(crate) async fn reasons(&self, queue: &str, n: usize) -> Vec<String> {
        let event = self.event(queue, n, Duration::from_secs(5)).await;
        event
            .records
            .iter()
            .map(|r| {
                r.message_attributes
                    .get("sourceflow.dlq_reason")
                    .and_then(|a| a.string_value.clone())
                    .unwrap_or_default()
            })
            .collect()
    }
}

/// A received message as a Lambda SQS record.
fn record(m: &aws_sdk_sqs::types::Message, arn: &str) -> serde_json::Value {
    let attributes: serde_json::Map<String, serde_json::Value> = m
        .attributes()
        .map(|a| {
            a.iter()
                .map(|(k, v)| (k.as_str().to_string(), v.clone().into()))
                .collect()
        })
        .unwrap_or_default();
    let message_attributes: serde_json::Map<String, serde_json::Value> = m
        .message_attributes()
        .map(|a| {
            a.iter()
                .map(|(k, v)| {
                    let json = serde_json::json!({
                        "stringValue": v.string_value(),
                        "stringListValues": [],
                        "binaryListValues": [],
                        "dataType": v.data_type(),
                    });
                    (k.clone(), json)
                })
                .collect()
        })
        .unwrap_or_default();
    serde_json::json!({
        "messageId": m.message_id(),
        "receiptHandle": m.receipt_handle(),
        "body": m.body(),
        "attributes": attributes,
        "messageAttributes": message_attributes,
        "md5OfBody": m.md5_of_body(),
        "eventSource": "aws:sqs",
        "eventSourceARN": arn,
        "awsRegion": arn.split(':').nth(3),
    })
}

/// The `messageId` of the record whose body contains `needle`.
pub(crate) fn id_of(event: &SqsEvent, needle: &str) -> String {
    let found: Vec<_> = event
        .records
        .iter()
        .filter(|r| r.body.as_deref().unwrap_or_default().contains(needle))
        .collect();
    assert_eq!(found.len(), 1, "one record contains {needle}");
    found[0].message_id.clone().expect("messageId")
}

/// The ids a response reports failed, in its order.
pub(crate) fn failures(r: &aws_lambda_events::event::sqs::SqsBatchResponse) -> Vec<String> {
    r.batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone())
        .collect()
}
