//! The embedded transport: an in-process model of SQS and SNS.
//!
//! It is not a channel shortcut. It keeps the semantics that shape how a program behaves on
//! AWS, so that bugs show up on a laptop:
//!
//! * standard queues (unordered) and FIFO queues (ordered per message group; while any
//!   message of a group is in flight, no later message of that group is delivered);
//! * visibility timeout: a received message is invisible until it is deleted, its visibility
//!   is changed, or the timeout passes, after which it is delivered again with its receive
//!   count incremented;
//! * a redrive policy: a message received `max_receive_count` times is moved to the
//!   dead-letter queue on the next receive;
//! * topics that fan a copy of each message out to every subscribed queue (raw delivery);
//! * the FIFO deduplication window (5 minutes), per-message delay on standard queues, and the
//!   size limits (SQS 1 MiB, SNS 256 KiB);
//! * long polling: `receive` waits for a message or for its wait time.
//!
//! Every message is the serialized envelope, exactly as on AWS.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{
    BatchError, EntryError, Receive, ReceivedMessage, Topology, Transport, FIFO_DEDUP_WINDOW,
    SNS_MAX_MESSAGE_BYTES, SQS_MAX_MESSAGE_BYTES,
};
use crate::envelope::{attr, OutgoingMessage};
use crate::error::{Error, Result};

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
    queues: RwLock<HashMap<String, Arc<Queue>>>,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
}

struct Subscriber {
    queue: Arc<Queue>,
    /// Filter policy on the type attribute; `None` delivers everything.
    types: Option<HashSet<String>>,
}

impl Subscriber {
    fn accepts(&self, m: &OutgoingMessage) -> bool {
        match &self.types {
            None => true,
            Some(types) => m
                .attributes
                .iter()
                .any(|(k, v)| k == attr::TYPE && types.contains(v)),
        }
    }
}

struct Topic {
    fifo: bool,
    subscribers: RwLock<Vec<Subscriber>>,
}

struct QueueConfig {
    visibility_timeout: Duration,
    dead_letter: Option<(Arc<Queue>, u32)>,
}

struct Queue {
    name: String,
    fifo: bool,
    config: RwLock<QueueConfig>,
    state: Mutex<QueueState>,
    notify: Notify,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Visibility {
    Visible,
    Delayed,
    InFlight,
}

struct Stored {
    broker_id: String,
    body: String,
    attributes: Vec<(String, String)>,
    group: Option<String>,
    receive_count: u32,
    visibility: Visibility,
    /// Bumped on every receive: receipts of earlier receives stop working.
    generation: u32,
    /// Bumped whenever the visibility deadline changes: older heap entries are stale.
    deadline_version: u32,
}

#[derive(Default)]
struct Group {
    /// Every message of the group in order; the in-flight ones are at the front.
    pending: VecDeque<u64>,
    in_flight: usize,
    queued: bool,
}

#[derive(Default)]
struct QueueState {
    next_seq: u64,
    messages: HashMap<u64, Stored>,
    /// Standard queues: visible messages.
    ready: VecDeque<u64>,
    /// Standard queues: delayed messages by due time.
    delayed: BinaryHeap<Reverse<(Instant, u64)>>,
    /// FIFO queues: groups by id, and the groups that can deliver now.
    groups: HashMap<String, Group>,
    ready_groups: VecDeque<String>,
    /// Visibility deadlines of in-flight messages: (deadline, seq, deadline version).
    deadlines: BinaryHeap<Reverse<(Instant, u64, u32)>>,
    /// FIFO deduplication ids and when they were first seen.
    dedup: HashSet<String>,
    dedup_order: VecDeque<(Instant, String)>,
}

pub use super::QueueDepth;

impl MemoryTransport {
    /// A new, empty broker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Message counts of a queue by state; `None` if the queue does not exist.
    pub fn depth(&self, queue: &str) -> Option<QueueDepth> {
        let q = self.broker.queues.read().get(queue).cloned()?;
        let mut st = q.state.lock();
        promote(&q, &mut st, Instant::now());
        let mut d = QueueDepth::default();
        for m in st.messages.values() {
            match m.visibility {
                Visibility::Visible => d.visible += 1,
                Visibility::InFlight => d.in_flight += 1,
                Visibility::Delayed => d.delayed += 1,
            }
        }
        Some(d)
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

    fn queue(&self, name: &str) -> Result<Arc<Queue>> {
        self.broker
            .queues
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::QueueDoesNotExist(name.to_string()))
    }
}

/// Returns expired in-flight messages and due delayed messages to visibility.
fn promote(q: &Queue, st: &mut QueueState, now: Instant) {
    while let Some(Reverse((due, seq))) = st.delayed.peek().copied() {
        if due > now {
            break;
        }
        st.delayed.pop();
        if let Some(m) = st.messages.get_mut(&seq) {
            if m.visibility == Visibility::Delayed {
                m.visibility = Visibility::Visible;
                st.ready.push_back(seq);
            }
        }
    }
    while let Some(Reverse((due, seq, version))) = st.deadlines.peek().copied() {
        if due > now {
            break;
        }
        st.deadlines.pop();
        let live = st
            .messages
            .get(&seq)
            .is_some_and(|m| m.visibility == Visibility::InFlight && m.deadline_version == version);
        if live {
            make_visible(q, st, seq);
        }
    }
    while let Some((at, _)) = st.dedup_order.front() {
        if now.duration_since(*at) < FIFO_DEDUP_WINDOW {
            break;
        }
        if let Some((_, id)) = st.dedup_order.pop_front() {
            st.dedup.remove(&id);
        }
    }
}

/// An in-flight message becomes visible again (timeout or visibility set to zero).
fn make_visible(q: &Queue, st: &mut QueueState, seq: u64) {
    let Some(m) = st.messages.get_mut(&seq) else {
        return;
    };
    m.visibility = Visibility::Visible;
    if q.fifo {
        let group = m.group.clone().unwrap_or_default();
        release_group_slot(st, &group);
    } else {
        st.ready.push_back(seq);
    }
}

/// One in-flight message of a FIFO group is done (deleted, returned or moved).
fn release_group_slot(st: &mut QueueState, group: &str) {
    let Some(g) = st.groups.get_mut(group) else {
        return;
    };
    g.in_flight = g.in_flight.saturating_sub(1);
    if g.pending.is_empty() && g.in_flight == 0 {
        st.groups.remove(group);
    } else if g.in_flight == 0 && !g.queued {
        g.queued = true;
        st.ready_groups.push_back(group.to_string());
    }
}

impl Queue {
    fn enqueue(&self, m: OutgoingMessage, now: Instant) -> Result<()> {
        m.check_size(&self.name, SQS_MAX_MESSAGE_BYTES)?;
        let mut st = self.state.lock();
        promote(self, &mut st, now);
        if self.fifo {
            let group = m.group_id.clone().ok_or_else(|| {
                Error::Unsupported(format!(
                    "{} sent to FIFO queue `{}` without a message group id",
                    m.wire_name, self.name
                ))
            })?;
            if m.delay.is_some() {
                return Err(Error::Unsupported(format!(
                    "FIFO queue `{}` does not support per-message delays",
                    self.name
                )));
            }
            let dedup = m.dedup_id.clone().unwrap_or_else(|| m.message_id.clone());
            if !st.dedup.insert(dedup.clone()) {
                // Within the window a duplicate is accepted and dropped, as SQS does.
                tracing::debug!(queue = %self.name, dedup_id = %dedup, "duplicate dropped by FIFO deduplication");
                return Ok(());
            }
            st.dedup_order.push_back((now, dedup));
            let seq = push(&mut st, m, Some(group.clone()), Visibility::Visible);
            let g = st.groups.entry(group.clone()).or_default();
            g.pending.push_back(seq);
            if g.in_flight == 0 && !g.queued {
                g.queued = true;
                st.ready_groups.push_back(group);
            }
        } else {
            match m.delay.filter(|d| !d.is_zero()) {
                Some(delay) => {
                    let seq = push(&mut st, m, None, Visibility::Delayed);
                    st.delayed.push(Reverse((now + delay, seq)));
                }
                None => {
                    let seq = push(&mut st, m, None, Visibility::Visible);
                    st.ready.push_back(seq);
                }
            }
        }
        drop(st);
        self.notify.notify_waiters();
        Ok(())
    }

    /// Takes up to `max` deliverable messages. Messages over the receive limit are moved to
    /// the dead-letter queue instead (returned separately so they are enqueued unlocked).
    fn take(
        &self,
        max: usize,
        visibility: Duration,
        now: Instant,
    ) -> (Vec<ReceivedMessage>, Vec<Stored>) {
        let dlq_limit = self.config.read().dead_letter.as_ref().map(|(_, n)| *n);
        let mut st = self.state.lock();
        promote(self, &mut st, now);
        let mut out = Vec::new();
        let mut moved = Vec::new();
        let deadline = now + visibility;
        if self.fifo {
            while out.len() < max {
                let Some(group) = st.ready_groups.pop_front() else {
                    break;
                };
                let seqs: Vec<u64> = {
                    let Some(g) = st.groups.get_mut(&group) else {
                        continue;
                    };
                    g.queued = false;
                    if g.in_flight > 0 {
                        continue;
                    }
                    g.pending.iter().take(max - out.len()).copied().collect()
                };
                for seq in seqs {
                    let over = dlq_limit.is_some_and(|limit| {
                        st.messages
                            .get(&seq)
                            .is_some_and(|m| m.receive_count >= limit)
                    });
                    if over {
                        // Redrive: the head of the group goes to the DLQ; the group goes on.
                        if let Some(m) = st.messages.remove(&seq) {
                            if let Some(g) = st.groups.get_mut(&group) {
                                g.pending.retain(|s| *s != seq);
                            }
                            moved.push(m);
                        }
                        continue;
                    }
                    let version = {
                        let Some(m) = st.messages.get_mut(&seq) else {
                            continue;
                        };
                        begin_flight(m);
                        out.push(received(seq, m, now));
                        m.deadline_version
                    };
                    st.deadlines.push(Reverse((deadline, seq, version)));
                    if let Some(g) = st.groups.get_mut(&group) {
                        g.in_flight += 1;
                    }
                }
                let remove = st
                    .groups
                    .get(&group)
                    .is_some_and(|g| g.pending.is_empty() && g.in_flight == 0);
                if remove {
                    st.groups.remove(&group);
                } else if let Some(g) = st.groups.get_mut(&group) {
                    if g.in_flight == 0 && !g.pending.is_empty() && !g.queued {
                        g.queued = true;
                        st.ready_groups.push_back(group.clone());
                    }
                }
            }
        } else {
            while out.len() < max {
                let Some(seq) = st.ready.pop_front() else {
                    break;
                };
                let over = {
                    let Some(m) = st.messages.get(&seq) else {
                        continue;
                    };
                    if m.visibility != Visibility::Visible {
                        continue;
                    }
                    dlq_limit.is_some_and(|limit| m.receive_count >= limit)
                };
                if over {
                    if let Some(m) = st.messages.remove(&seq) {
                        moved.push(m);
                    }
                    continue;
                }
                let Some(m) = st.messages.get_mut(&seq) else {
                    continue;
                };
                begin_flight(m);
                out.push(received(seq, m, now));
                let version = m.deadline_version;
                st.deadlines.push(Reverse((deadline, seq, version)));
            }
        }
        (out, moved)
    }

    /// When the next delayed or in-flight message becomes visible.
    fn next_due(&self) -> Option<Instant> {
        let st = self.state.lock();
        let a = st.delayed.peek().map(|Reverse((t, _))| *t);
        let b = st.deadlines.peek().map(|Reverse((t, _, _))| *t);
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Removes an in-flight message identified by its receipt.
    fn remove_in_flight(&self, receipt: &str) -> Result<Stored> {
        let (seq, generation) =
            parse_receipt(receipt).ok_or_else(|| Error::InvalidReceipt(self.name.clone()))?;
        let mut st = self.state.lock();
        let valid = st
            .messages
            .get(&seq)
            .is_some_and(|m| m.generation == generation && m.visibility == Visibility::InFlight);
        if !valid {
            return Err(Error::InvalidReceipt(self.name.clone()));
        }
        let Some(m) = st.messages.remove(&seq) else {
            return Err(Error::InvalidReceipt(self.name.clone()));
        };
        if let Some(group) = &m.group {
            if let Some(g) = st.groups.get_mut(group) {
                g.pending.retain(|s| *s != seq);
            }
            release_group_slot(&mut st, group);
        }
        drop(st);
        if self.fifo {
            self.notify.notify_waiters();
        }
        Ok(m)
    }

    /// Changes the visibility of an in-flight message identified by its receipt.
    fn set_visibility(&self, receipt: &str, timeout: Duration) -> Result<()> {
        let (seq, generation) =
            parse_receipt(receipt).ok_or_else(|| Error::InvalidReceipt(self.name.clone()))?;
        let mut st = self.state.lock();
        let valid = st
            .messages
            .get(&seq)
            .is_some_and(|m| m.generation == generation && m.visibility == Visibility::InFlight);
        if !valid {
            return Err(Error::InvalidReceipt(self.name.clone()));
        }
        if timeout.is_zero() {
            make_visible(self, &mut st, seq);
        } else {
            // A new deadline; the old heap entry no longer matches the version and is skipped.
            let version = match st.messages.get_mut(&seq) {
                Some(m) => {
                    m.deadline_version = m.deadline_version.wrapping_add(1);
                    m.deadline_version
                }
                None => return Err(Error::InvalidReceipt(self.name.clone())),
            };
            st.deadlines
                .push(Reverse((Instant::now() + timeout, seq, version)));
        }
        Ok(())
    }

    /// Appends a message moved here from another queue (dead-lettering).
    fn accept_moved(&self, m: Stored, reason: Option<&str>) {
        let mut st = self.state.lock();
        let mut attributes = m.attributes;
        if let Some(reason) = reason {
            attributes.retain(|(k, _)| k != attr::DLQ_REASON);
            attributes.push((attr::DLQ_REASON.to_string(), reason.to_string()));
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        st.messages.insert(
            seq,
            Stored {
                broker_id: m.broker_id,
                body: m.body,
                attributes,
                group: m.group.clone(),
                receive_count: 0,
                visibility: Visibility::Visible,
                generation: 0,
                deadline_version: 0,
            },
        );
        match (self.fifo, m.group) {
            (true, Some(group)) => {
                let g = st.groups.entry(group.clone()).or_default();
                g.pending.push_back(seq);
                if g.in_flight == 0 && !g.queued {
                    g.queued = true;
                    st.ready_groups.push_back(group);
                }
            }
            _ => st.ready.push_back(seq),
        }
        drop(st);
        self.notify.notify_waiters();
    }

    fn dead_letter_queue(&self) -> Option<Arc<Queue>> {
        self.config
            .read()
            .dead_letter
            .as_ref()
            .map(|(q, _)| q.clone())
    }
}

fn push(st: &mut QueueState, m: OutgoingMessage, group: Option<String>, v: Visibility) -> u64 {
    let seq = st.next_seq;
    st.next_seq += 1;
    st.messages.insert(
        seq,
        Stored {
            broker_id: m.message_id,
            body: m.body,
            attributes: m.attributes,
            group,
            receive_count: 0,
            visibility: v,
            generation: 0,
            deadline_version: 0,
        },
    );
    seq
}

fn begin_flight(m: &mut Stored) {
    m.receive_count += 1;
    m.generation = m.generation.wrapping_add(1);
    m.deadline_version = m.deadline_version.wrapping_add(1);
    m.visibility = Visibility::InFlight;
}

fn received(seq: u64, m: &Stored, now: Instant) -> ReceivedMessage {
    ReceivedMessage {
        received_at: now,
        broker_id: m.broker_id.clone(),
        receipt: format!("{seq}:{}", m.generation),
        body: m.body.clone(),
        attributes: m.attributes.clone(),
        receive_count: m.receive_count,
        group_id: m.group.clone(),
    }
}

fn parse_receipt(receipt: &str) -> Option<(u64, u32)> {
    let (a, b) = receipt.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
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
            match queues.get(&spec.name) {
                Some(q) => {
                    if q.fifo != spec.fifo {
                        return Err(Error::Config(format!(
                            "queue `{}` already exists with FifoQueue={}",
                            spec.name, q.fifo
                        )));
                    }
                    let mut c = q.config.write();
                    c.visibility_timeout = spec.visibility_timeout;
                    c.dead_letter = dead_letter;
                }
                None => {
                    queues.insert(
                        spec.name.clone(),
                        Arc::new(Queue {
                            name: spec.name.clone(),
                            fifo: spec.fifo,
                            config: RwLock::new(QueueConfig {
                                visibility_timeout: spec.visibility_timeout,
                                dead_letter,
                            }),
                            state: Mutex::new(QueueState::default()),
                            notify: Notify::new(),
                        }),
                    );
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
                    topics.insert(
                        spec.name.clone(),
                        Arc::new(Topic {
                            fifo: spec.fifo,
                            subscribers: RwLock::new(Vec::new()),
                        }),
                    );
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
            let types = (!sub.message_types.is_empty())
                .then(|| sub.message_types.iter().cloned().collect::<HashSet<_>>());
            let mut subs = topic.subscribers.write();
            match subs.iter_mut().find(|s| s.queue.name == sub.queue) {
                Some(existing) => existing.types = types,
                None => subs.push(Subscriber {
                    queue: queue.clone(),
                    types,
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
        let q = self.queue(queue).map_err(|_| {
            BatchError::all(
                "SendMessageBatch",
                queue,
                total,
                EntryError::NoSuchDestination(queue.to_string()),
            )
        })?;
        let now = Instant::now();
        let mut failed = Vec::new();
        for (i, m) in messages.into_iter().enumerate() {
            if let Err(e) = q.enqueue(m, now) {
                failed.push((i, EntryError::Refused(e.to_string())));
            }
        }
        batch_result("SendMessageBatch", queue, total, failed)
    }

    async fn publish(
        &self,
        topic: &str,
        messages: Vec<OutgoingMessage>,
    ) -> std::result::Result<(), BatchError> {
        let total = messages.len();
        let t = self
            .broker
            .topics
            .read()
            .get(topic)
            .cloned()
            .ok_or_else(|| {
                BatchError::all(
                    "PublishBatch",
                    topic,
                    total,
                    EntryError::NoSuchDestination(topic.to_string()),
                )
            })?;
        let mut failed = Vec::new();
        let mut accepted = Vec::with_capacity(total);
        for (i, m) in messages.into_iter().enumerate() {
            if let Err(e) = m.check_size(topic, SNS_MAX_MESSAGE_BYTES) {
                failed.push((i, EntryError::Refused(e.to_string())));
            } else if t.fifo && m.group_id.is_none() {
                failed.push((
                    i,
                    EntryError::Refused(format!(
                        "{} published to FIFO topic `{topic}` without a message group id",
                        m.wire_name
                    )),
                ));
            } else {
                accepted.push(m);
            }
        }
        let now = Instant::now();
        let subscribers = t.subscribers.read();
        for s in subscribers.iter() {
            for m in accepted.iter().filter(|m| s.accepts(m)) {
                if let Err(e) = s.queue.enqueue(m.clone(), now) {
                    tracing::warn!(topic, queue = %s.queue.name, error = %e, "a subscriber queue refused a published message");
                }
            }
        }
        batch_result("PublishBatch", topic, total, failed)
    }

    async fn receive(&self, queue: &str, request: Receive) -> Result<Vec<ReceivedMessage>> {
        let q = self.queue(queue)?;
        let max = request.max.clamp(1, 10);
        let until = Instant::now() + request.wait;
        loop {
            let notified = q.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = Instant::now();
            let (out, moved) = q.take(max, request.visibility, now);
            if !moved.is_empty() {
                if let Some(dlq) = q.dead_letter_queue() {
                    for m in moved {
                        tracing::warn!(
                            queue = %q.name,
                            dead_letter_queue = %dlq.name,
                            broker_id = %m.broker_id,
                            receive_count = m.receive_count,
                            "message exceeded the receive limit; moved to the dead-letter queue"
                        );
                        dlq.accept_moved(m, None);
                    }
                }
            }
            if !out.is_empty() || now >= until {
                return Ok(out);
            }
            let wake = q.next_due().map_or(until, |due| due.min(until));
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    async fn delete(
        &self,
        queue: &str,
        receipts: Vec<String>,
    ) -> std::result::Result<(), BatchError> {
        let total = receipts.len();
        let q = self.queue(queue).map_err(|_| {
            BatchError::all(
                "DeleteMessageBatch",
                queue,
                total,
                EntryError::NoSuchDestination(queue.to_string()),
            )
        })?;
        let mut failed = Vec::new();
        for (i, r) in receipts.iter().enumerate() {
            if q.remove_in_flight(r).is_err() {
                failed.push((i, EntryError::InvalidReceipt));
            }
        }
        batch_result("DeleteMessageBatch", queue, total, failed)
    }

    async fn change_visibility(
        &self,
        queue: &str,
        receipts: Vec<String>,
        timeout: Duration,
    ) -> std::result::Result<(), BatchError> {
        let total = receipts.len();
        let q = self.queue(queue).map_err(|_| {
            BatchError::all(
                "ChangeMessageVisibilityBatch",
                queue,
                total,
                EntryError::NoSuchDestination(queue.to_string()),
            )
        })?;
        let mut failed = Vec::new();
        for (i, r) in receipts.iter().enumerate() {
            if q.set_visibility(r, timeout).is_err() {
                failed.push((i, EntryError::InvalidReceipt));
            }
        }
        q.notify.notify_waiters();
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

    async fn dead_letter(
        &self,
        queue: &str,
        dead_letter_queue: &str,
        message: &ReceivedMessage,
        reason: &str,
    ) -> Result<()> {
        let q = self.queue(queue)?;
        let dlq = self.queue(dead_letter_queue)?;
        let m = q.remove_in_flight(&message.receipt)?;
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

#[cfg(test)]
mod tests {
    use super::super::{DeadLetterSpec, QueueSpec, SubscriptionSpec, TopicSpec};
    use super::*;

    fn msg(body: &str, group: Option<&str>) -> OutgoingMessage {
        OutgoingMessage {
            body: body.to_string(),
            attributes: vec![(attr::TYPE.into(), "T".into())],
            group_id: group.map(str::to_string),
            dedup_id: None,
            delay: None,
            wire_name: "T".into(),
            message_id: uuid::Uuid::new_v4().to_string(),
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
                QueueSpec {
                    name: dlq.clone(),
                    fifo,
                    visibility_timeout: Duration::from_secs(30),
                    dead_letter: None,
                },
                QueueSpec {
                    name: q.clone(),
                    fifo,
                    visibility_timeout: Duration::from_secs(30),
                    dead_letter: Some(DeadLetterSpec {
                        queue: dlq.clone(),
                        max_receive_count: max_receive,
                    }),
                },
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
        // The first receipt is stale now.
        assert!(t.delete(&q, vec![first[0].receipt.clone()]).await.is_err());
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
        assert_eq!(dead[0].body, "poison");
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
        assert_eq!(got[0].body, "a1");
        let got2 = t.receive(&q, rx(10, NO_WAIT)).await.unwrap();
        let bodies: Vec<_> = got2.iter().map(|m| m.body.as_str()).collect();
        assert_eq!(bodies, vec!["b1"], "a2 must wait while a1 is in flight");
        t.change_visibility(&q, vec![got[0].receipt.clone()], Duration::ZERO)
            .await
            .unwrap();
        let got3 = t.receive(&q, rx(10, NO_WAIT)).await.unwrap();
        let bodies: Vec<_> = got3.iter().map(|m| m.body.as_str()).collect();
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
        let spec = |n: &str| QueueSpec {
            name: n.into(),
            fifo: false,
            visibility_timeout: Duration::from_secs(30),
            dead_letter: None,
        };
        t.provision(&Topology {
            queues: vec![spec("a"), spec("b")],
            topics: vec![TopicSpec {
                name: "t".into(),
                fifo: false,
            }],
            subscriptions: vec![
                SubscriptionSpec {
                    topic: "t".into(),
                    queue: "a".into(),
                    message_types: vec![],
                },
                SubscriptionSpec {
                    topic: "t".into(),
                    queue: "b".into(),
                    message_types: vec!["T".into()],
                },
            ],
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
}
