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

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::envelope::{AttributeName, AttributeValue, OutgoingMessage};
use crate::error::Result;
pub use crate::error::{BatchError, EntryError};
pub use crate::topology::{
    BucketSpec, DeadLetterSpec, Finding, Ownership, QueueSettings, QueueSpec, ServerSideEncryption,
    SubscriptionSpec, TopicSpec, Topology,
};

/// Largest message an SQS queue accepts (body plus attributes), in bytes.
pub const SQS_MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Largest message an SNS topic accepts (body plus attributes), in bytes.
pub const SNS_MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// How long a FIFO queue remembers a deduplication id.
pub const FIFO_DEDUP_WINDOW: Duration = Duration::from_secs(5 * 60);

/// A received message's attributes: shared, so that handing them on (to the handler's
/// context, to a dead-letter queue) does not copy them.
pub type Attributes = Arc<[(AttributeName, AttributeValue)]>;

/// A receipt handle: shared, so that the listener's heartbeat and its delete or visibility
/// change hold the same string the receive returned (a clone copies nothing).
pub type Receipt = Arc<str>;

/// A message as received from a queue.
#[derive(Debug, Clone)]
pub struct ReceivedMessage {
    /// The broker's id for this message (SQS `MessageId`), for logs (shared with the
    /// broker's copy and the listener's bookkeeping: a clone copies no string).
    pub broker_id: Arc<str>,
    /// The receipt handle. The latest receipt of a message deletes it until someone
    /// receives it again; an earlier receipt, or one of a deleted message, is accepted by
    /// `delete` and may do nothing (as on SQS).
    pub receipt: Receipt,
    /// The body (a JSON envelope, unless something else wrote to the queue), shared with the
    /// broker's copy where the broker is in process: a receive does not copy it.
    pub body: Arc<str>,
    /// Message attributes: names and typed values, shared like the body.
    pub attributes: Attributes,
    /// How many times the message has been received, this time included.
    pub receive_count: u32,
    /// FIFO message group id (shared like the broker id).
    pub group_id: Option<Arc<str>>,
    /// When this receive returned it: the 12-hour visibility limit counts from here.
    pub received_at: tokio::time::Instant,
}

/// What a [`Transport::receive`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receive {
    /// At most this many messages (1 to 10).
    pub max: usize,
    /// How long to wait for the first message (long polling; at most 20 s on SQS).
    pub wait: Duration,
    /// How long the received messages stay invisible (the receive's own
    /// `VisibilityTimeout`, whatever the queue's default is).
    pub visibility: Duration,
}

/// Longest delivery delay SQS accepts for a message (`DelaySeconds` 900).
pub const MAX_DELAY: Duration = Duration::from_secs(15 * 60);

/// Longest a message can be kept invisible from its receive (SQS: 12 hours).
pub const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 60 * 60);

/// Most entries an SQS or SNS batch call takes.
pub const MAX_BATCH_ENTRIES: usize = 10;

/// A message broker with SQS/SNS semantics.
///
/// The calls that take several entries (`send`, `publish`, `delete`, `change_visibility`)
/// report per entry: `Ok(())` when every entry was done, else a [`BatchError`] listing the
/// entries that were not, each with why; every entry it does not list was done. An
/// implementation retries what may succeed on retry before it gives up on an entry, and
/// never does an entry twice because a neighbour failed. Entries handed in are done even
/// if the caller stops waiting for the answer.
///
/// Order: the messages of one FIFO group keep the order of the call. Once an entry of a
/// group is not done (refused, or failed after the retries), the entries of that group
/// after it in the same call are not sent either: they fail as transient ("held back"),
/// so that a caller retrying the failed entries in their order keeps the group's order.
/// (One residue: inside a single wire request of up to ten entries, AWS may accept a
/// group's later entry while failing an earlier one; a retry then lands behind it.)
/// A delay of zero is no delay.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Short name for logs and errors (`memory`, `aws`).
    fn name(&self) -> &'static str;

    /// Creates what is missing of `topology`; must be idempotent.
    async fn provision(&self, topology: &Topology) -> Result<()>;

    /// Sends messages to a queue. A message over the size limit, or with a delay longer
    /// than [`MAX_DELAY`], is refused (that entry only).
    async fn send(
        &self,
        queue: &str,
        messages: Vec<OutgoingMessage>,
    ) -> std::result::Result<(), BatchError>;

    /// Publishes messages to a topic, which delivers a copy to every subscribed queue whose
    /// filter accepts it. Topics take no per-message delay: a message with one is refused.
    async fn publish(
        &self,
        topic: &str,
        messages: Vec<OutgoingMessage>,
    ) -> std::result::Result<(), BatchError>;

    /// Receives up to `request.max` messages, waiting up to `request.wait` for the first
    /// one; they stay invisible for `request.visibility`.
    ///
    /// Like SQS, a receive that is abandoned (its future dropped) may still take messages
    /// on the broker's side, which then stay invisible for the visibility timeout: await a
    /// receive that is in flight rather than dropping it.
    async fn receive(&self, queue: &str, request: Receive) -> Result<Vec<ReceivedMessage>>;

    /// [`receive`](Self::receive), appending what it got to `into`: the listener's pollers
    /// receive into a vector each keeps, so that a receive allocates none. The default
    /// calls `receive`; the embedded broker writes into `into` directly. An implementation
    /// that fails appends nothing (what `into` held before stays as it was). Dropped while
    /// it waits, it is abandoned like `receive`.
    async fn receive_into(
        &self,
        queue: &str,
        request: Receive,
        into: &mut Vec<ReceivedMessage>,
    ) -> Result<()> {
        into.extend(self.receive(queue, request).await?);
        Ok(())
    }

    /// The longest pause a listener's pollers take under load before a receive, so that
    /// it returns a fuller batch (the builder's `receive_linger` overrides it). Zero, the
    /// default, for a broker whose receives cost nothing.
    fn receive_linger(&self) -> Duration {
        Duration::ZERO
    }

    /// Ends the long polls in flight on `queue` now: they return what they took, maybe
    /// nothing. The listener calls it at shutdown before it awaits its receive in flight,
    /// so that stopping does not wait out a whole long poll. SQS has no such call — there a
    /// long poll runs to the end of its wait, and the default does nothing.
    async fn end_receives(&self, queue: &str) {
        let _ = queue;
    }

    /// Deletes received messages by receipt. A receipt that was never issued fails with
    /// [`EntryError::InvalidReceipt`]; deleting twice, or with an earlier receipt, is
    /// accepted (and may do nothing).
    async fn delete(
        &self,
        queue: &str,
        receipts: Vec<Receipt>,
    ) -> std::result::Result<(), BatchError>;

    /// Makes received messages invisible for `timeout` from now (zero: visible at once; at
    /// most [`MAX_VISIBILITY`], more is refused). Applies to the latest receipt of a message
    /// in flight; for a message that became visible meanwhile it is accepted and changes
    /// nothing; for a deleted message, or a receipt never issued, that entry fails.
    async fn change_visibility(
        &self,
        queue: &str,
        receipts: Vec<Receipt>,
        timeout: Duration,
    ) -> std::result::Result<(), BatchError>;

    /// Moves a received message to `dead_letter_queue` with `reason` attached as the
    /// [`attr::DLQ_REASON`](crate::envelope::attr::DLQ_REASON) attribute, and removes it
    /// from `queue`. On a FIFO queue its group id is kept. With a receipt that is no
    /// longer the latest, the embedded transport moves nothing and fails; on AWS (a copy
    /// sent, then a delete) the copy may be in the dead-letter queue while the message
    /// comes back to `queue` — it is then dead-lettered again, by its broker id deduplicated
    /// on a FIFO dead-letter queue.
    async fn dead_letter(
        &self,
        queue: &str,
        dead_letter_queue: &str,
        message: &ReceivedMessage,
        reason: &str,
    ) -> Result<()>;

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

    /// Everything that differs between the broker and `topology`, changing nothing: missing
    /// resources, differing attributes of owned queues and of subscriptions, and stale
    /// subscriptions of the service's queues. The default reports what
    /// [`missing`](Self::missing) finds.
    async fn inspect(&self, topology: &Topology) -> Result<Vec<Finding>> {
        Ok(self
            .missing(topology)
            .await?
            .into_iter()
            .map(|resource| Finding::Missing { resource })
            .collect())
    }

    /// The object store that large payloads go through on this broker
    /// ([`crate::claim_check`]): S3 beside SQS/SNS, an in-process store beside the embedded
    /// broker (shared by every service on it, as S3 is). `None` (the default): messages too
    /// large for the broker are refused, and a received pointer cannot be read.
    fn object_store(&self) -> Option<Arc<dyn crate::claim_check::ObjectStore>> {
        None
    }

    /// Removes the subscription of `queue` to `topic` (`prune`).
    async fn unsubscribe(&self, topic: &str, queue: &str) -> Result<()> {
        Err(crate::error::Error::Unsupported(format!(
            "the {} transport cannot unsubscribe `{queue}` from `{topic}`",
            self.name()
        )))
    }
}

/// Keeps FIFO order through a partial failure: once an entry of a message group is not
/// done, the later entries of that group in the same call are held back (see
/// [`Transport`]'s order rule). Entries without a group are never held.
#[derive(Debug, Default)]
pub(crate) struct GroupHold(std::collections::HashSet<String>);

impl GroupHold {
    /// Why `m` must not be sent now, or `None` if it may go.
    pub(crate) fn check(&self, m: &OutgoingMessage) -> Option<EntryError> {
        let group = m.group_id.as_deref()?;
        self.0.contains(group).then(|| {
            EntryError::Transient(format!(
                "held back: an earlier message of FIFO group `{group}` in this call was not done"
            ))
        })
    }

    /// Notes that `m` was not done: the rest of its group waits.
    pub(crate) fn stop(&mut self, m: &OutgoingMessage) {
        if let Some(group) = &m.group_id {
            self.0.insert(group.clone());
        }
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
