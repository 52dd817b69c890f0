//! The embedded transport: an in-process model of SQS and SNS.
//!
//! It is not a channel shortcut. It keeps the semantics that shape how a program behaves on
//! AWS, so that bugs show up on a laptop:
//!
//! * standard queues (unordered) and FIFO queues (ordered per message group; while any
//!   message of a group is in flight, no later message of that group is delivered);
//! * visibility timeout: a received message is invisible for the receive's own visibility
//!   timeout, until it is deleted or its visibility is changed, after which it is delivered
//!   again with its receive count incremented;
//! * receipts as SQS treats them: the latest receipt deletes its message (even after its
//!   visibility ended, as long as no one received it again); an earlier receipt, or one of
//!   a message already deleted, is accepted and does nothing; a receipt this queue never
//!   issued is invalid (see [`Transport::delete`] and [`Transport::change_visibility`]);
//! * a redrive policy: a message received `max_receive_count` times is moved to the
//!   dead-letter queue on the next receive;
//! * topics that fan a copy of each message out to every subscribed queue whose filter
//!   policy accepts it (raw delivery);
//! * the FIFO deduplication window (5 minutes), per-message delay on standard queues (at
//!   most 15 minutes), the size limits (SQS 1 MiB, SNS 256 KiB), each checked per entry;
//! * long polling: `receive` waits for a message or for its wait time, and like an SQS long
//!   poll it goes on on the broker's side when its caller stops waiting: what it takes then
//!   stays invisible for the visibility timeout.
//!
//! Every message is the serialized envelope, exactly as on AWS. Every operation judges by
//! the clock (tokio's, so paused-time tests work), never by which calls happened before.

mod objects;
mod queue;
mod topic;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::RwLock;
use tokio::time::Instant;

use self::queue::Queue;
use self::topic::{Subscriber, Topic};
use super::{
    BatchError, EntryError, Receipt, Receive, ReceivedMessage, Topology, Transport,
    MAX_BATCH_ENTRIES, MAX_VISIBILITY,
};
use crate::envelope::OutgoingMessage;
use crate::error::{Error, Result};
use crate::filter::FilterPolicy;
use crate::topology::{Finding, Ownership};

pub use self::objects::MemoryObjects;
pub use super::QueueDepth;

/// Longest an SQS receive waits for a first message (`WaitTimeSeconds` 20).
const MAX_WAIT: Duration = Duration::from_secs(20);

/// The embedded SQS/SNS model. Cheap to clone; clones share the same broker, so several
/// runtimes (services) in one process can talk through one `MemoryTransport`.
#[derive(Clone, Default)]
pub struct MemoryTransport {
    broker: Arc<Broker>,
}

impl std::fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTransport")
            .field("queues", &self.broker.queues.read().len())
            .field("topics", &self.broker.topics.read().len())
            .finish()
    }
}

#[derive(Default)]
struct Broker {
    // Looked up on every call: foldhash, cheaper than SipHash on queue names.
    queues: RwLock<foldhash::HashMap<String, Arc<Queue>>>,
    topics: RwLock<foldhash::HashMap<String, Arc<Topic>>>,
    /// The claim check's objects (S3's part), shared by every service on this broker.
    objects: RwLock<MemoryObjects>,
}

impl MemoryTransport {
    /// A new, empty broker.
    pub fn new() -> Self {
        Self::default()
    }

    /// The in-process object store large payloads go through ([`crate::claim_check`]).
    pub fn objects(&self) -> MemoryObjects {
        self.broker.objects.read().clone()
    }

    /// With stored payloads expiring after `expiry` (default 15 days), as a bucket's
    /// lifecycle rule would expire them.
    pub fn with_object_expiry(self, expiry: Duration) -> Self {
        *self.broker.objects.write() = MemoryObjects::with_expiry(expiry);
        self
    }

    /// Message counts of a queue by state; `None` if the queue does not exist.
    pub fn depth(&self, queue: &str) -> Option<QueueDepth> {
        let q = self.broker.queues.read().get(queue).cloned()?;
        Some(q.depth(Instant::now()))
    }

    /// Names of all queues, sorted.
    pub fn queue_names(&self) -> Vec<String> {
        let mut v: Vec<_> = self.broker.queues.read().keys().cloned().collect();
        v.sort();
        v
    }

    /// Names of all topics, sorted.
    pub fn topic_names(&self) -> Vec<String> {
        let mut v: Vec<_> = self.broker.topics.read().keys().cloned().collect();
        v.sort();
        v
    }

    /// Names of the queues subscribed to a topic, sorted.
    pub fn subscribers(&self, topic: &str) -> Vec<String> {
        let Some(t) = self.broker.topics.read().get(topic).cloned() else {
            return Vec::new();
        };
        let mut v: Vec<_> = t
            .subscribers
            .read()
            .iter()
            .map(|s| s.queue.name.clone())
            .collect();
        v.sort();
        v
    }

    fn find_queue(&self, name: &str) -> Option<Arc<Queue>> {
        self.broker.queues.read().get(name).cloned()
    }

    fn queue(&self, name: &str) -> Result<Arc<Queue>> {
        self.find_queue(name)
            .ok_or_else(|| Error::QueueDoesNotExist(name.to_string()))
    }

    /// The queue of a batch call, or every entry failed with `NoSuchDestination`.
    fn batch_queue(
        &self,
        operation: &'static str,
        name: &str,
        total: usize,
    ) -> std::result::Result<Arc<Queue>, BatchError> {
        self.find_queue(name).ok_or_else(|| {
            BatchError::all(
                operation,
                name,
                total,
                EntryError::NoSuchDestination(name.to_string()),
            )
        })
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn provision(&self, topology: &Topology) -> Result<()> {
        let mut queues = self.broker.queues.write();
        for spec in &topology.queues {
            let dead_letter = match &spec.dead_letter {
                Some(d) => {
                    let dlq = queues.get(&d.queue).cloned().ok_or_else(|| {
                        Error::Config(format!(
                            "dead-letter queue `{}` of `{}` must be provisioned first",
                            d.queue, spec.name
                        ))
                    })?;
                    if dlq.fifo != spec.fifo {
                        return Err(Error::Config(format!(
                            "queue `{}` and its dead-letter queue `{}` must both be FIFO or both standard",
                            spec.name, d.queue
                        )));
                    }
                    Some((dlq, d.max_receive_count))
                }
                None => None,
            };
            // The queue's default visibility timeout is not modelled: every receive of the
            // trait carries its own, which is what SQS then applies.
            match queues.get(&spec.name) {
                Some(q) => {
                    if q.fifo != spec.fifo {
                        return Err(Error::Config(format!(
                            "queue `{}` already exists with FifoQueue={}",
                            spec.name, q.fifo
                        )));
                    }
                    // Only its consumer corrects a queue; a sender leaves it as it is.
                    if spec.ownership == Ownership::Consumed {
                        q.set_dead_letter(dead_letter);
                        q.set_default_delay(spec.settings.delay);
                    }
                }
                None => {
                    let q = Queue::new(&spec.name, spec.fifo, dead_letter);
                    q.set_default_delay(spec.settings.delay);
                    queues.insert(spec.name.clone(), Arc::new(q));
                }
            }
        }
        let mut topics = self.broker.topics.write();
        for spec in &topology.topics {
            match topics.get(&spec.name) {
                Some(t) if t.fifo != spec.fifo => {
                    return Err(Error::Config(format!(
                        "topic `{}` already exists with FifoTopic={}",
                        spec.name, t.fifo
                    )))
                }
                Some(_) => {}
                None => {
                    topics.insert(spec.name.clone(), Arc::new(Topic::new(spec.fifo)));
                }
            }
        }
        for sub in &topology.subscriptions {
            let topic = topics
                .get(&sub.topic)
                .ok_or_else(|| Error::TopicDoesNotExist(sub.topic.clone()))?;
            let queue = queues
                .get(&sub.queue)
                .ok_or_else(|| Error::QueueDoesNotExist(sub.queue.clone()))?;
            if topic.fifo != queue.fifo {
                return Err(Error::Config(format!(
                    "cannot subscribe {} queue `{}` to {} topic `{}`: SNS delivers FIFO topics only to FIFO queues and standard topics only to standard queues",
                    if queue.fifo { "FIFO" } else { "standard" },
                    sub.queue,
                    if topic.fifo { "FIFO" } else { "standard" },
                    sub.topic
                )));
            }
            let filter = match &sub.filter {
                Some(f) => Some(FilterPolicy::parse(f).map_err(|e| {
                    Error::Config(format!(
                        "the filter policy of `{}` on `{}` is not valid: {e}",
                        sub.queue, sub.topic
                    ))
                })?),
                None => None,
            };
            // An existing subscription is corrected in place, as SetSubscriptionAttributes
            // does on SNS.
            let mut subs = topic.subscribers.write();
            match subs.iter_mut().find(|s| s.queue.name == sub.queue) {
                Some(existing) => existing.filter = filter,
                None => subs.push(Subscriber {
                    queue: queue.clone(),
                    filter,
                }),
            }
        }
        Ok(())
    }

    async fn send(
        &self,
        queue: &str,
        messages: Vec<OutgoingMessage>,
    ) -> std::result::Result<(), BatchError> {
        let total = messages.len();
        let q = self.batch_queue("SendMessageBatch", queue, total)?;
        let failed = q.send(messages, Instant::now());
        batch_result("SendMessageBatch", queue, total, failed)
    }

    async fn publish(
        &self,
        topic: &str,
        messages: Vec<OutgoingMessage>,
    ) -> std::result::Result<(), BatchError> {
        let total = messages.len();
        let t = self.broker.topics.read().get(topic).cloned();
        let Some(t) = t else {
            return Err(BatchError::all(
                "PublishBatch",
                topic,
                total,
                EntryError::NoSuchDestination(topic.to_string()),
            ));
        };
        let failed = t.publish(topic, messages, Instant::now());
        batch_result("PublishBatch", topic, total, failed)
    }

    async fn end_receives(&self, queue: &str) {
        if let Ok(q) = self.queue(queue) {
            q.end_polls();
        }
    }

    async fn receive(&self, queue: &str, request: Receive) -> Result<Vec<ReceivedMessage>> {
        let mut out = Vec::new();
        self.receive_into(queue, request, &mut out).await?;
        Ok(out)
    }

    async fn receive_into(
        &self,
        queue: &str,
        request: Receive,
        into: &mut Vec<ReceivedMessage>,
    ) -> Result<()> {
        let q = self.queue(queue)?;
        // What the AWS transport sends: SQS takes 1 to 10 messages, waits at most 20 s, and
        // keeps a message invisible at most 12 hours.
        let max = request.max.clamp(1, MAX_BATCH_ENTRIES);
        let visibility = request.visibility.min(MAX_VISIBILITY);
        let wait = request.wait.min(MAX_WAIT);
        let now = Instant::now();
        let had = into.len();
        q.receive_now(max, visibility, now, into);
        if into.len() > had || wait.is_zero() {
            return Ok(());
        }
        // A long poll belongs to the broker: it runs to the end of its wait even if this
        // future is dropped, and what it takes then stays in flight, unseen by anyone, for
        // the visibility timeout (SQS does exactly that to abandoned polls). It runs here,
        // in the caller's task; only a dropped one goes on in a task of its own (a task per
        // waiting receive was an allocation of its whole state for every one).
        let poll = LongPoll {
            queue: q,
            max,
            visibility,
            until: now + wait,
            answered: false,
        };
        poll.run(into).await;
        Ok(())
    }

    async fn delete(
        &self,
        queue: &str,
        receipts: Vec<Receipt>,
    ) -> std::result::Result<(), BatchError> {
        let total = receipts.len();
        let q = self.batch_queue("DeleteMessageBatch", queue, total)?;
        let failed = q.delete(&receipts, Instant::now());
        batch_result("DeleteMessageBatch", queue, total, failed)
    }

    async fn change_visibility(
        &self,
        queue: &str,
        receipts: Vec<Receipt>,
        timeout: Duration,
    ) -> std::result::Result<(), BatchError> {
        let total = receipts.len();
        let q = self.batch_queue("ChangeMessageVisibilityBatch", queue, total)?;
        let failed = q.change_visibility(&receipts, timeout, Instant::now());
        batch_result("ChangeMessageVisibilityBatch", queue, total, failed)
    }

    async fn queue_depth(&self, queue: &str) -> Result<Option<QueueDepth>> {
        Ok(self.depth(queue))
    }

    async fn missing(&self, topology: &Topology) -> Result<Vec<String>> {
        let queues = self.broker.queues.read();
        let topics = self.broker.topics.read();
        let mut missing: Vec<String> = topology
            .queues
            .iter()
            .filter(|q| !queues.contains_key(&q.name))
            .map(|q| format!("queue {}", q.name))
            .collect();
        missing.extend(
            topology
                .topics
                .iter()
                .filter(|t| !topics.contains_key(&t.name))
                .map(|t| format!("topic {}", t.name)),
        );
        for sub in &topology.subscriptions {
            let subscribed = topics.get(&sub.topic).is_some_and(|t| {
                t.subscribers
                    .read()
                    .iter()
                    .any(|s| s.queue.name == sub.queue)
            });
            if !subscribed {
                missing.push(format!("subscription {} -> {}", sub.topic, sub.queue));
            }
        }
        Ok(missing)
    }

    async fn inspect(&self, topology: &Topology) -> Result<Vec<Finding>> {
        let mut findings: Vec<Finding> = self
            .missing(topology)
            .await?
            .into_iter()
            .map(|resource| Finding::Missing { resource })
            .collect();
        let topics = self.broker.topics.read();
        for sub in &topology.subscriptions {
            let Some(t) = topics.get(&sub.topic) else {
                continue;
            };
            let subs = t.subscribers.read();
            if let Some(existing) = subs.iter().find(|s| s.queue.name == sub.queue) {
                let current = existing.filter.as_ref().map(|f| f.as_json().clone());
                if current != sub.filter {
                    findings.push(Finding::Differs {
                        resource: format!("subscription {} -> {}", sub.topic, sub.queue),
                        attribute: "FilterPolicy".into(),
                        current: current.map_or("(unset)".into(), |f| f.to_string()),
                        wanted: sub
                            .filter
                            .as_ref()
                            .map_or("(unset)".into(), |f| f.to_string()),
                    });
                }
            }
        }
        let wanted: HashSet<(&str, &str)> = topology
            .subscriptions
            .iter()
            .map(|s| (s.topic.as_str(), s.queue.as_str()))
            .collect();
        let ours: HashSet<&str> = topology.consumed().map(|q| q.name.as_str()).collect();
        let mut names: Vec<&String> = topics.keys().collect();
        names.sort();
        for name in names {
            for s in topics[name].subscribers.read().iter() {
                let q = s.queue.name.as_str();
                let mine = ours.contains(q)
                    || topology
                        .subscriber_prefix
                        .as_deref()
                        .is_some_and(|p| q.starts_with(p));
                if mine && !wanted.contains(&(name.as_str(), q)) {
                    findings.push(Finding::Stale {
                        topic: name.clone(),
                        queue: q.to_string(),
                    });
                }
            }
        }
        Ok(findings)
    }

    fn object_store(&self) -> Option<Arc<dyn crate::claim_check::ObjectStore>> {
        Some(Arc::new(self.objects()))
    }

    async fn unsubscribe(&self, topic: &str, queue: &str) -> Result<()> {
        if let Some(t) = self.broker.topics.read().get(topic) {
            t.subscribers.write().retain(|s| s.queue.name != queue);
        }
        Ok(())
    }

    /// Moves the message to `dead_letter_queue` (body, attributes, broker id and FIFO
    /// group kept; a message without a group gets the group `dead-letter` on a FIFO
    /// dead-letter queue). Only the latest receipt can move a message: an earlier one, or
    /// one of a message that is gone, is [`Error::InvalidReceipt`] and nothing moves.
    async fn dead_letter(
        &self,
        queue: &str,
        dead_letter_queue: &str,
        message: &ReceivedMessage,
        reason: &str,
    ) -> Result<()> {
        let q = self.queue(queue)?;
        let dlq = self.queue(dead_letter_queue)?;
        let m = q
            .take_for_move(&message.receipt, Instant::now())
            .ok_or_else(|| Error::InvalidReceipt(queue.to_string()))?;
        tracing::debug!(
            queue,
            dead_letter_queue,
            reason,
            "moved to dead-letter queue"
        );
        dlq.accept_moved(m, Some(reason));
        Ok(())
    }
}

/// `Ok` when nothing failed, else the failures.
fn batch_result(
    operation: &'static str,
    destination: &str,
    total: usize,
    failed: Vec<(usize, EntryError)>,
) -> std::result::Result<(), BatchError> {
    if failed.is_empty() {
        return Ok(());
    }
    Err(BatchError {
        operation,
        destination: destination.to_string(),
        total,
        failed,
    })
}

/// A long poll in progress on the embedded broker: if the receive that runs it is dropped
/// before it answers, it goes on to the end of its wait in a task of its own.
struct LongPoll {
    queue: Arc<Queue>,
    max: usize,
    visibility: std::time::Duration,
    until: Instant,
    answered: bool,
}

impl LongPoll {
    async fn run(mut self, into: &mut Vec<ReceivedMessage>) {
        self.queue
            .long_poll(self.max, self.visibility, self.until, into)
            .await;
        self.answered = true;
    }
}

impl Drop for LongPoll {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let (q, max, visibility, until) =
            (self.queue.clone(), self.max, self.visibility, self.until);
        // Outside a runtime (it is shutting down) nothing can take messages any more.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut out = Vec::new();
                q.long_poll(max, visibility, until, &mut out).await;
                if !out.is_empty() {
                    tracing::debug!(
                        queue = %q.name,
                        count = out.len(),
                        "an abandoned receive took messages; they stay in flight for their visibility timeout"
                    );
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{
        QueueSpec, SubscriptionSpec, TopicSpec, FIFO_DEDUP_WINDOW, SNS_MAX_MESSAGE_BYTES,
        SQS_MAX_MESSAGE_BYTES,
    };
    use super::*;
    use crate::envelope::attr;

    fn msg(body: &str, group: Option<&str>) -> OutgoingMessage {
        OutgoingMessage {
            body: body.into(),
            attributes: vec![(attr::TYPE.into(), "T".into())].into(),
            group_id: group.map(str::to_string),
            dedup_id: None,
            delay: None,
            wire_name: "T".into(),
            message_id: crate::envelope::uuid_text(uuid::Uuid::new_v4()),
        }
    }

    async fn setup(fifo: bool, max_receive: u32) -> (MemoryTransport, String, String) {
        let t = MemoryTransport::new();
        let (q, dlq) = if fifo {
            ("q.fifo".to_string(), "q-dlq.fifo".to_string())
        } else {
            ("q".to_string(), "q-dlq".to_string())
        };
        let topo = Topology {
            queues: vec![
                QueueSpec::new(dlq.clone()),
                QueueSpec::new(q.clone()).with_dead_letter(dlq.clone(), max_receive),
            ],
            ..Default::default()
        };
        t.provision(&topo).await.unwrap();
        (t, q, dlq)
    }

    const NO_WAIT: Duration = Duration::ZERO;

    fn rx(max: usize, wait: Duration) -> Receive {
        Receive {
            max,
            wait,
            visibility: Duration::from_secs(30),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn visibility_timeout_redelivers_with_receive_count() {
        let (t, q, _) = setup(false, 5).await;
        t.send(&q, vec![msg("a", None)]).await.unwrap();
        let first = t.receive(&q, rx(10, NO_WAIT)).await.unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].receive_count, 1);
        assert!(t.receive(&q, rx(10, NO_WAIT)).await.unwrap().is_empty());
        tokio::time::advance(Duration::from_secs(31)).await;
        let again = t.receive(&q, rx(10, NO_WAIT)).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].receive_count, 2);
        // The first receipt is stale now: accepted, and the message stays.
        t.delete(&q, vec![first[0].receipt.clone()]).await.unwrap();
        assert_eq!(t.depth(&q).unwrap().in_flight, 1);
        t.delete(&q, vec![again[0].receipt.clone()]).await.unwrap();
        assert_eq!(t.depth(&q).unwrap().total(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn redrive_after_max_receive_count() {
        let (t, q, dlq) = setup(false, 2).await;
        t.send(&q, vec![msg("poison", None)]).await.unwrap();
        for _ in 0..2 {
            let got = t.receive(&q, rx(10, NO_WAIT)).await.unwrap();
            assert_eq!(got.len(), 1);
            t.change_visibility(&q, vec![got[0].receipt.clone()], Duration::ZERO)
                .await
                .unwrap();
        }
        assert!(t.receive(&q, rx(10, NO_WAIT)).await.unwrap().is_empty());
        let dead = t.receive(&dlq, rx(10, NO_WAIT)).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(&*dead[0].body, "poison");
    }

    #[tokio::test(start_paused = true)]
    async fn fifo_blocks_group_while_in_flight() {
        let (t, q, _) = setup(true, 5).await;
        t.send(
            &q,
            vec![
                msg("a1", Some("a")),
                msg("a2", Some("a")),
                msg("b1", Some("b")),
            ],
        )
        .await
        .unwrap();
        let got = t.receive(&q, rx(1, NO_WAIT)).await.unwrap();
        assert_eq!(&*got[0].body, "a1");
        let got2 = t.receive(&q, rx(10, NO_WAIT)).await.unwrap();
        let bodies: Vec<_> = got2.iter().map(|m| &*m.body).collect();
        assert_eq!(bodies, vec!["b1"], "a2 must wait while a1 is in flight");
        t.change_visibility(&q, vec![got[0].receipt.clone()], Duration::ZERO)
            .await
            .unwrap();
        let got3 = t.receive(&q, rx(10, NO_WAIT)).await.unwrap();
        let bodies: Vec<_> = got3.iter().map(|m| &*m.body).collect();
        assert_eq!(bodies, vec!["a1", "a2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn fifo_dedup_window() {
        let (t, q, _) = setup(true, 5).await;
        let mut m = msg("x", Some("g"));
        m.dedup_id = Some("same".into());
        t.send(&q, vec![m.clone(), m.clone()]).await.unwrap();
        assert_eq!(t.depth(&q).unwrap().total(), 1);
        tokio::time::advance(FIFO_DEDUP_WINDOW + Duration::from_secs(1)).await;
        t.send(&q, vec![m]).await.unwrap();
        assert_eq!(t.depth(&q).unwrap().total(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn delay_and_long_poll() {
        let (t, q, _) = setup(false, 5).await;
        let mut m = msg("later", None);
        m.delay = Some(Duration::from_secs(5));
        t.send(&q, vec![m]).await.unwrap();
        assert!(t.receive(&q, rx(10, NO_WAIT)).await.unwrap().is_empty());
        let got = t
            .receive(&q, rx(10, Duration::from_secs(20)))
            .await
            .unwrap();
        assert_eq!(got.len(), 1);
    }

    #[tokio::test]
    async fn size_limits_and_fan_out() {
        let t = MemoryTransport::new();
        let spec = QueueSpec::new;
        t.provision(&Topology {
            queues: vec![spec("a"), spec("b")],
            topics: vec![TopicSpec::new("t")],
            subscriptions: vec![
                SubscriptionSpec::new("t", "a"),
                SubscriptionSpec::new("t", "b").types(["T"]),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
        t.publish("t", vec![msg("e", None)]).await.unwrap();
        assert_eq!(t.depth("a").unwrap().visible, 1);
        assert_eq!(t.depth("b").unwrap().visible, 1);
        let big = msg(&"x".repeat(SNS_MAX_MESSAGE_BYTES), None);
        assert!(matches!(
            t.publish("t", vec![big.clone()]).await,
            Err(BatchError { failed, .. }) if matches!(failed[..], [(0, EntryError::Refused(_))])
        ));
        t.send("a", vec![big]).await.unwrap();
        let huge = msg(&"x".repeat(SQS_MAX_MESSAGE_BYTES), None);
        assert!(matches!(
            t.send("a", vec![huge]).await,
            Err(BatchError { failed, .. }) if matches!(failed[..], [(0, EntryError::Refused(_))])
        ));
        assert!(matches!(
            t.send("missing", vec![msg("x", None)]).await,
            Err(BatchError { failed, .. }) if matches!(failed[..], [(0, EntryError::NoSuchDestination(_))])
        ));
    }

    fn failed(r: std::result::Result<(), BatchError>) -> Vec<(usize, EntryError)> {
        match r {
            Ok(()) => Vec::new(),
            Err(e) => e.failed,
        }
    }

    fn rxv(visibility: Duration) -> Receive {
        Receive {
            max: 10,
            wait: NO_WAIT,
            visibility,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stale_receipt_is_accepted_and_does_nothing() {
        let (t, q, _) = setup(false, 10).await;
        t.send(&q, vec![msg("a", None)]).await.unwrap();
        let first = t.receive(&q, rxv(Duration::from_secs(5))).await.unwrap();
        tokio::time::advance(Duration::from_secs(6)).await;
        let second = t.receive(&q, rxv(Duration::from_secs(5))).await.unwrap();
        assert_eq!(second[0].receive_count, 2);
        let stale = first[0].receipt.clone();
        t.delete(&q, vec![stale.clone()]).await.unwrap();
        t.change_visibility(&q, vec![stale], Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(
            t.depth(&q).unwrap().in_flight,
            1,
            "a stale receipt changes nothing"
        );
        assert!(t
            .receive(&q, rxv(Duration::from_secs(5)))
            .await
            .unwrap()
            .is_empty());
        let latest = second[0].receipt.clone();
        t.delete(&q, vec![latest.clone()]).await.unwrap();
        assert_eq!(t.depth(&q).unwrap().total(), 0);
        // Deleting again is accepted; changing the visibility of a deleted message is not.
        t.delete(&q, vec![latest.clone()]).await.unwrap();
        assert!(matches!(
            failed(t.change_visibility(&q, vec![latest], Duration::ZERO).await)[..],
            [(0, EntryError::InvalidReceipt)]
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_receipt_is_judged_by_the_clock_alone() {
        let (t, q, _) = setup(false, 10).await;
        t.send(&q, vec![msg("a", None)]).await.unwrap();
        let got = t.receive(&q, rxv(Duration::from_secs(5))).await.unwrap();
        // Nothing else touches the queue while the visibility runs out.
        tokio::time::advance(Duration::from_secs(6)).await;
        t.change_visibility(&q, vec![got[0].receipt.clone()], Duration::from_secs(60))
            .await
            .unwrap();
        let again = t.receive(&q, rxv(Duration::from_secs(5))).await.unwrap();
        assert_eq!(
            again.len(),
            1,
            "a visibility change after expiry has no effect"
        );
        assert_eq!(again[0].receive_count, 2);

        t.send(&q, vec![msg("b", None)]).await.unwrap();
        tokio::time::advance(Duration::from_secs(6)).await;
        let b = t.receive(&q, rxv(Duration::from_secs(5))).await.unwrap();
        assert_eq!(b.len(), 2);
        let b = b.into_iter().find(|m| &*m.body == "b").unwrap();
        tokio::time::advance(Duration::from_secs(6)).await;
        t.delete(&q, vec![b.receipt]).await.unwrap();
        assert_eq!(
            t.depth(&q).unwrap().total(),
            1,
            "the latest receipt deletes after expiry"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn receipts_not_issued_by_the_queue_are_invalid() {
        let (t, q, dlq) = setup(false, 10).await;
        t.send(&q, vec![msg("a", None)]).await.unwrap();
        t.send(&dlq, vec![msg("d", None)]).await.unwrap();
        let got = t.receive(&q, rxv(Duration::from_secs(30))).await.unwrap();
        let other = t.receive(&dlq, rxv(Duration::from_secs(30))).await.unwrap();
        let r = got[0].receipt.clone();
        let (id, rest) = r.split_once(':').unwrap();
        let (seq, _) = rest.split_once(':').unwrap();
        let receipts = vec![
            Receipt::from("garbage"),
            Receipt::from(""),
            format!("{seq}:1").into(),
            format!("{id}:{seq}:0").into(),
            format!("{id}:{seq}:7").into(),
            format!("{id}:999:1").into(),
            other[0].receipt.clone(),
        ];
        let n = receipts.len();
        let d = failed(t.delete(&q, receipts.clone()).await);
        assert_eq!(d.len(), n, "{d:?}");
        assert!(d.iter().all(|(_, e)| *e == EntryError::InvalidReceipt));
        let c = failed(t.change_visibility(&q, receipts, Duration::ZERO).await);
        assert_eq!(c.len(), n, "{c:?}");
        assert_eq!(t.depth(&q).unwrap().in_flight, 1);
        assert_eq!(t.depth(&dlq).unwrap().in_flight, 1);
        t.delete(&q, vec![r]).await.unwrap();
        assert_eq!(t.depth(&q).unwrap().total(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn visibility_ends_at_most_twelve_hours_after_the_receive() {
        let (t, q, _) = setup(false, 10).await;
        t.send(&q, vec![msg("a", None)]).await.unwrap();
        let got = t.receive(&q, rxv(Duration::from_secs(3600))).await.unwrap();
        let r = vec![got[0].receipt.clone()];
        assert!(matches!(
            failed(
                t.change_visibility(&q, r.clone(), MAX_VISIBILITY + Duration::from_secs(1))
                    .await
            )[..],
            [(0, EntryError::Refused(_))]
        ));
        tokio::time::advance(Duration::from_secs(1800)).await;
        assert!(matches!(
            failed(
                t.change_visibility(&q, r.clone(), MAX_VISIBILITY - Duration::from_secs(1700))
                    .await
            )[..],
            [(0, EntryError::Refused(_))]
        ));
        t.change_visibility(&q, r, MAX_VISIBILITY - Duration::from_secs(1800))
            .await
            .unwrap();
        tokio::time::advance(MAX_VISIBILITY - Duration::from_secs(1801)).await;
        assert!(t
            .receive(&q, rxv(Duration::from_secs(5)))
            .await
            .unwrap()
            .is_empty());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            t.receive(&q, rxv(Duration::from_secs(5)))
                .await
                .unwrap()
                .len(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_long_poll_keeps_polling_until_its_wait_ends() {
        let (t, q, _) = setup(false, 10).await;
        let poll = t.receive(
            &q,
            Receive {
                max: 10,
                wait: Duration::from_secs(10),
                visibility: Duration::from_secs(30),
            },
        );
        assert!(tokio::time::timeout(Duration::from_secs(1), poll)
            .await
            .is_err());
        t.send(&q, vec![msg("taken", None)]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(t
            .receive(&q, rxv(Duration::from_secs(30)))
            .await
            .unwrap()
            .is_empty());
        assert_eq!(t.depth(&q).unwrap().in_flight, 1);
        tokio::time::advance(Duration::from_secs(31)).await;
        let got = t.receive(&q, rxv(Duration::from_secs(30))).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].receive_count, 2);

        // Once its wait is over, an abandoned poll takes nothing more.
        let poll = t.receive(
            &q,
            Receive {
                max: 10,
                wait: Duration::from_secs(2),
                visibility: Duration::from_secs(30),
            },
        );
        assert!(tokio::time::timeout(Duration::from_millis(500), poll)
            .await
            .is_err());
        tokio::time::sleep(Duration::from_secs(3)).await;
        t.send(&q, vec![msg("later", None)]).await.unwrap();
        let got = t.receive(&q, rxv(Duration::from_secs(30))).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].receive_count, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn receive_takes_sqs_limits() {
        let (t, q, _) = setup(false, 10).await;
        let many: Vec<_> = (0..15).map(|i| msg(&i.to_string(), None)).collect();
        for chunk in many.chunks(10) {
            t.send(&q, chunk.to_vec()).await.unwrap();
        }
        let got = t
            .receive(
                &q,
                Receive {
                    max: 50,
                    wait: NO_WAIT,
                    visibility: Duration::from_secs(30),
                },
            )
            .await
            .unwrap();
        assert_eq!(got.len(), 10);
        let (t, q, _) = setup(false, 10).await;
        let start = Instant::now();
        let got = t
            .receive(&q, rx(10, Duration::from_secs(60)))
            .await
            .unwrap();
        assert!(got.is_empty());
        assert_eq!(start.elapsed(), Duration::from_secs(20));
    }

    #[tokio::test(start_paused = true)]
    async fn dead_letter_moves_with_its_reason_and_group() {
        let (t, q, dlq) = setup(true, 10).await;
        t.send(&q, vec![msg("a1", Some("a")), msg("a2", Some("a"))])
            .await
            .unwrap();
        let got = t.receive(&q, rx(1, NO_WAIT)).await.unwrap();
        t.dead_letter(&q, &dlq, &got[0], "broken").await.unwrap();
        let dead = t.receive(&dlq, rx(10, NO_WAIT)).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(&*dead[0].body, "a1");
        assert_eq!(dead[0].group_id.as_deref(), Some("a"));
        assert_eq!(
            crate::envelope::attribute(&dead[0].attributes, attr::DLQ_REASON),
            Some("broken")
        );
        // The group goes on in the source queue.
        let next = t.receive(&q, rx(10, NO_WAIT)).await.unwrap();
        assert_eq!(&*next[0].body, "a2");
        // A receipt that is not the latest moves nothing.
        assert!(matches!(
            t.dead_letter(&q, &dlq, &got[0], "again").await,
            Err(Error::InvalidReceipt(_))
        ));
        t.change_visibility(&q, vec![next[0].receipt.clone()], Duration::ZERO)
            .await
            .unwrap();
        let again = t.receive(&q, rx(10, NO_WAIT)).await.unwrap();
        assert!(matches!(
            t.dead_letter(&q, &dlq, &next[0], "stale").await,
            Err(Error::InvalidReceipt(_))
        ));
        assert_eq!(t.depth(&dlq).unwrap().total(), 1);
        t.dead_letter(&q, &dlq, &again[0], "latest").await.unwrap();
        assert_eq!(t.depth(&q).unwrap().total(), 0);
        assert_eq!(t.depth(&dlq).unwrap().total(), 2);
    }

    #[tokio::test]
    async fn send_and_publish_refuse_bad_entries_one_by_one() {
        let (t, q, _) = setup(false, 10).await;
        let (tf, qf, _) = setup(true, 10).await;
        let delayed = |d: u64| {
            let mut m = msg("late", None);
            m.delay = Some(Duration::from_secs(d));
            m
        };
        let r = failed(
            t.send(&q, vec![msg("a", None), delayed(901), delayed(900)])
                .await,
        );
        assert!(
            matches!(&r[..], [(1, EntryError::Refused(why))] if why.contains("DelaySeconds 900")),
            "{r:?}"
        );
        assert_eq!(t.depth(&q).unwrap().total(), 2);
        let mut fifo_delayed = msg("late", Some("g"));
        fifo_delayed.delay = Some(Duration::from_secs(1));
        // Of another group: a later message of `g` is held back behind the refused one.
        let mut zero_delay = msg("zero", Some("h"));
        zero_delay.delay = Some(Duration::ZERO);
        let r = failed(
            tf.send(
                &qf,
                vec![
                    msg("a", Some("g")),
                    fifo_delayed,
                    msg("no group", None),
                    zero_delay,
                ],
            )
            .await,
        );
        assert!(
            matches!(
                &r[..],
                [(1, EntryError::Refused(_)), (2, EntryError::Refused(_))]
            ),
            "{r:?}"
        );
        assert_eq!(tf.depth(&qf).unwrap().total(), 2);
    }

    #[tokio::test]
    async fn fan_out_goes_on_past_a_subscriber_that_refuses() {
        let t = MemoryTransport::new();
        let spec = QueueSpec::new;
        let sub = |q: &str| SubscriptionSpec::new("t", q);
        t.provision(&Topology {
            queues: vec![spec("a"), spec("b")],
            topics: vec![TopicSpec::new("t")],
            subscriptions: vec![sub("a"), sub("b")],
            ..Default::default()
        })
        .await
        .unwrap();
        // Queues that refuse every copy (FIFO, and the message has no group): first, in the
        // middle and last. Provisioning would not allow this; a broken subscription might.
        let refusing = || Subscriber {
            queue: Arc::new(Queue::new("refusing.fifo", true, None)),
            filter: None,
        };
        {
            let topics = t.broker.topics.read();
            let mut subs = topics["t"].subscribers.write();
            subs.insert(0, refusing());
            subs.insert(2, refusing());
            subs.push(refusing());
        }
        t.publish("t", vec![msg("e1", None), msg("e2", None)])
            .await
            .unwrap();
        assert_eq!(t.depth("a").unwrap().visible, 2);
        assert_eq!(t.depth("b").unwrap().visible, 2);
        let mut delayed = msg("late", None);
        delayed.delay = Some(Duration::from_secs(1));
        let r = failed(t.publish("t", vec![msg("ok", None), delayed]).await);
        assert!(
            matches!(&r[..], [(1, EntryError::Refused(why))] if why.contains("no per-message delay")),
            "{r:?}"
        );
        assert_eq!(t.depth("a").unwrap().visible, 3);
    }
}
