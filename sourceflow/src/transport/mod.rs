//! Transports move serialized envelopes between services.
//!
//! [`Transport`] is the narrow seam between the runtime (routing, listeners, retries) and a
//! message broker. It speaks SQS/SNS concepts on purpose: queues with visibility timeouts,
//! receipts and dead-letter queues, and topics that fan out to subscribed queues. The
//! embedded [`memory`] transport models exactly those semantics so that a program behaves
//! the same on a laptop as on AWS.

#[cfg(feature = "aws")]
pub mod aws;
pub mod memory;

use std::time::Duration;

use async_trait::async_trait;

use crate::envelope::OutgoingMessage;
use crate::error::Result;

/// Largest message an SQS queue accepts (body plus attributes), in bytes.
pub const SQS_MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Largest message an SNS topic accepts (body plus attributes), in bytes.
pub const SNS_MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// How long a FIFO queue remembers a deduplication id.
pub const FIFO_DEDUP_WINDOW: Duration = Duration::from_secs(5 * 60);

/// A queue to provision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    /// Full name, prefix included.
    pub name: String,
    /// FIFO queue (name ends in `.fifo`).
    pub fifo: bool,
    /// How long a received message stays invisible.
    pub visibility_timeout: Duration,
    /// Its dead-letter queue and the receive count after which messages move there.
    /// `None` for a dead-letter queue itself.
    pub dead_letter: Option<DeadLetterSpec>,
}

/// Where a queue's messages go after too many receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterSpec {
    /// The dead-letter queue's full name.
    pub queue: String,
    /// Receives after which a message is moved (SQS `maxReceiveCount`).
    pub max_receive_count: u32,
}

/// A topic to provision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// Full name, prefix included.
    pub name: String,
    /// FIFO topic (name ends in `.fifo`).
    pub fifo: bool,
}

/// A subscription of a queue to a topic, with raw message delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionSpec {
    /// Topic full name.
    pub topic: String,
    /// Queue full name.
    pub queue: String,
    /// Wire names delivered through this subscription (an SNS filter policy on the
    /// `sourceflow.type` attribute); empty for all.
    pub message_types: Vec<String>,
}

/// Everything a service needs to exist before it sends or listens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    /// Queues, dead-letter queues included (listed before the queues that use them).
    pub queues: Vec<QueueSpec>,
    /// Topics.
    pub topics: Vec<TopicSpec>,
    /// Subscriptions of this service's queues to topics.
    pub subscriptions: Vec<SubscriptionSpec>,
}

/// A message as received from a queue.
#[derive(Debug, Clone)]
pub struct ReceivedMessage {
    /// The broker's id for this message (SQS `MessageId`), for logs.
    pub broker_id: String,
    /// The receipt handle, valid until the message is deleted, returned or received again.
    pub receipt: String,
    /// The body (a JSON envelope, unless something else wrote to the queue).
    pub body: String,
    /// Message attributes.
    pub attributes: Vec<(String, String)>,
    /// How many times the message has been received, this time included.
    pub receive_count: u32,
    /// FIFO message group id.
    pub group_id: Option<String>,
}

/// A message broker with SQS/SNS semantics.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Short name for logs and errors (`memory`, `aws`).
    fn name(&self) -> &'static str;

    /// Creates what is missing of `topology`; must be idempotent.
    async fn provision(&self, topology: &Topology) -> Result<()>;

    /// Sends messages to a queue. Either all are accepted or an error says which were not.
    async fn send(&self, queue: &str, messages: Vec<OutgoingMessage>) -> Result<()>;

    /// Publishes messages to a topic.
    async fn publish(&self, topic: &str, messages: Vec<OutgoingMessage>) -> Result<()>;

    /// Receives up to `max` messages, waiting up to `wait` for the first one.
    async fn receive(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>>;

    /// Deletes received messages by receipt.
    async fn delete(&self, queue: &str, receipts: Vec<String>) -> Result<()>;

    /// Makes a received message invisible for `timeout` from now (zero: visible at once).
    async fn change_visibility(&self, queue: &str, receipt: &str, timeout: Duration) -> Result<()>;

    /// Moves a received message to the queue's dead-letter queue with `reason` attached as
    /// the [`attr::DLQ_REASON`](crate::envelope::attr::DLQ_REASON) attribute.
    async fn dead_letter(&self, queue: &str, message: &ReceivedMessage, reason: &str)
        -> Result<()>;

    /// Approximate message counts of a queue (SQS `ApproximateNumberOfMessages*`), for
    /// metrics and health; `None` when the transport cannot tell.
    async fn queue_depth(&self, queue: &str) -> Result<Option<QueueDepth>> {
        let _ = queue;
        Ok(None)
    }

    /// The resources of `topology` that do not exist (for health checks); an error when the
    /// broker cannot be reached. The default assumes everything exists.
    async fn missing(&self, topology: &Topology) -> Result<Vec<String>> {
        let _ = topology;
        Ok(Vec::new())
    }
}

/// A count of a queue's messages by state, like SQS's `ApproximateNumberOfMessages*`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepth {
    /// Visible, waiting to be received.
    pub visible: usize,
    /// Received and not yet deleted or returned.
    pub in_flight: usize,
    /// Not yet visible because of a delay.
    pub delayed: usize,
}

impl QueueDepth {
    /// All messages in the queue.
    pub fn total(&self) -> usize {
        self.visible + self.in_flight + self.delayed
    }
}

/// Moves every message of `dead_letter_queue` back to `source_queue` — body, attributes
/// (without the dead-letter reason) and FIFO group id kept — and returns how many moved.
/// Each message is sent before it is deleted, so a failure midway duplicates rather than
/// loses; receivers are idempotent by message id.
pub async fn redrive(
    transport: &dyn Transport,
    dead_letter_queue: &str,
    source_queue: &str,
) -> Result<usize> {
    use crate::envelope::attr;
    let mut moved = 0;
    loop {
        let batch = transport
            .receive(dead_letter_queue, 10, Duration::from_secs(1))
            .await?;
        if batch.is_empty() {
            return Ok(moved);
        }
        let mut out = Vec::with_capacity(batch.len());
        let mut receipts = Vec::with_capacity(batch.len());
        for m in batch {
            let wire_name = crate::envelope::attribute(&m.attributes, attr::TYPE)
                .and_then(|t| crate::registry::message_routes().find(|r| r.name == t))
                .map_or("redriven", |r| r.name);
            out.push(OutgoingMessage {
                body: m.body,
                attributes: m
                    .attributes
                    .into_iter()
                    .filter(|(k, _)| k != attr::DLQ_REASON)
                    .collect(),
                // A fresh deduplication id: the original one may still be in the window.
                dedup_id: m
                    .group_id
                    .as_ref()
                    .map(|_| format!("redrive-{}", m.broker_id)),
                group_id: m.group_id,
                delay: None,
                wire_name,
                message_id: m.broker_id,
            });
            receipts.push(m.receipt);
        }
        let n = out.len();
        transport.send(source_queue, out).await?;
        transport.delete(dead_letter_queue, receipts).await?;
        moved += n;
        tracing::info!(
            from = dead_letter_queue,
            to = source_queue,
            moved = n,
            "redrove messages"
        );
    }
}
