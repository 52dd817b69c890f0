//! One queue: the SQS message state machine (delayed, visible, in flight), FIFO groups,
//! receipts, the deduplication window and the redrive policy.
//!
//! Every operation first brings the queue up to the clock ([`promote`]): what a receipt
//! may do, and what a receive sees, depends only on the time and on the calls made on this
//! queue, never on whether some unrelated call happened to look at it in between.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

// Maps keyed by sequence numbers, group ids and deduplication ids: foldhash (hashbrown's
// default hasher, already in the tree), several times cheaper than SipHash on short keys.
use foldhash::{HashMap, HashSet};
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::envelope::{attr, AttributeValue, OutgoingMessage};
use crate::transport::{
    Attributes, EntryError, GroupHold, QueueDepth, Receipt, ReceivedMessage, FIFO_DEDUP_WINDOW,
    MAX_BATCH_ENTRIES, MAX_DELAY, MAX_VISIBILITY, SQS_MAX_MESSAGE_BYTES,
};

/// Process-wide queue numbers, written into receipts: a receipt only works on the queue
/// (of the broker) that issued it, as on SQS.
static NEXT_QUEUE_ID: AtomicU64 = AtomicU64::new(1);

/// The group a message without one gets when it is moved to a FIFO dead-letter queue (the
/// AWS transport does the same).
const DEAD_LETTER_GROUP: &str = "dead-letter";

/// A queue of the embedded broker.
pub(super) struct Queue {
    /// What this queue's receipts start with (its process-wide number and `:`).
    receipt_prefix: String,
    /// The placeholder receipt of a message taken under the lock (see [`Taken`]).
    no_receipt: Receipt,
    /// Full name.
    pub(super) name: String,
    /// FIFO queue.
    pub(super) fifo: bool,
    /// The redrive policy: the dead-letter queue and `maxReceiveCount`.
    dead_letter: RwLock<Option<(Arc<Queue>, u32)>>,
    state: Mutex<QueueState>,
    /// Wakes waiting receives when something may have become deliverable, or when a
    /// visibility deadline moved.
    notify: Notify,
    /// Bumped by [`Queue::end_polls`]: a long poll that started before returns at once.
    polls_ended: AtomicU64,
    /// The queue's `DelaySeconds`, in milliseconds: the delay of a message sent without
    /// one of its own (standard queues).
    default_delay_ms: AtomicU64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Visibility {
    Visible,
    Delayed,
    InFlight,
}

/// A message in a queue.
pub(super) struct Stored {
    broker_id: Arc<str>,
    /// Shared with every receive of it: a receive does not copy the body or attributes.
    body: Arc<str>,
    attributes: Attributes,
    group: Option<Arc<str>>,
    receive_count: u32,
    visibility: Visibility,
    /// Bumped on every receive: it is the receipt's generation, so a receipt knows whether
    /// it is the latest one.
    generation: u32,
    /// Bumped whenever the visibility deadline changes: older heap entries are stale.
    deadline_version: u32,
    /// When the latest receive took it: the 12-hour visibility limit counts from here.
    received_at: Instant,
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
    groups: HashMap<Arc<str>, Group>,
    ready_groups: VecDeque<Arc<str>>,
    /// Visibility deadlines of in-flight messages: (deadline, seq, deadline version).
    deadlines: BinaryHeap<Reverse<(Instant, u64, u32)>>,
    /// FIFO deduplication ids and when they were first seen.
    /// (Shared by the set and the order: one allocation per id, made outside the lock.)
    dedup: HashSet<Arc<str>>,
    dedup_order: VecDeque<(Instant, Arc<str>)>,
}

/// Whose receipt a receipt handle is, judged against the queue as it is now.
enum Holder {
    /// The latest receipt of a message the queue still has.
    Latest(u64),
    /// An earlier receipt of a message that has been received again since.
    Stale,
    /// A receipt this queue issued for a message that is no longer in it (deleted, or
    /// moved to a dead-letter queue).
    Gone,
}

impl Queue {
    /// A new, empty queue.
    pub(super) fn new(name: &str, fifo: bool, dead_letter: Option<(Arc<Queue>, u32)>) -> Self {
        Queue {
            receipt_prefix: format!("{}:", NEXT_QUEUE_ID.fetch_add(1, Ordering::Relaxed)),
            no_receipt: Receipt::from(""),
            name: name.to_string(),
            fifo,
            dead_letter: RwLock::new(dead_letter),
            state: Mutex::new(QueueState::default()),
            notify: Notify::new(),
            polls_ended: AtomicU64::new(0),
            default_delay_ms: AtomicU64::new(0),
        }
    }

    /// Sets the queue's `DelaySeconds` (standard queues).
    pub(super) fn set_default_delay(&self, delay: std::time::Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.default_delay_ms.store(ms, Ordering::Relaxed);
    }

    /// Ends the long polls waiting now: they return what they have (nothing).
    pub(super) fn end_polls(&self) {
        self.polls_ended.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Replaces the redrive policy (provisioning an existing queue again).
    pub(super) fn set_dead_letter(&self, dead_letter: Option<(Arc<Queue>, u32)>) {
        *self.dead_letter.write() = dead_letter;
    }

    /// Why SQS would refuse `m` on this queue, if it would.
    fn refusal(&self, m: &OutgoingMessage) -> Option<String> {
        if let Err(e) = m.check_size(&self.name, SQS_MAX_MESSAGE_BYTES) {
            return Some(e.to_string());
        }
        if let Err(e) = m.check_attributes() {
            return Some(e);
        }
        let delay = m.delay.filter(|d| !d.is_zero());
        if self.fifo {
            if m.group_id.is_none() {
                return Some(format!(
                    "{} sent to FIFO queue `{}` without a message group id",
                    m.wire_name, self.name
                ));
            }
            if delay.is_some() {
                return Some(format!(
                    "FIFO queue `{}` takes no per-message delay (DelaySeconds is for standard queues)",
                    self.name
                ));
            }
        } else if let Some(d) = delay.filter(|d| *d > MAX_DELAY) {
            return Some(format!(
                "delay of {} s exceeds SQS's 15-minute maximum (DelaySeconds 900)",
                secs_ceil(d)
            ));
        }
        None
    }

    /// Sends messages: each is stored, dropped as a FIFO duplicate, or refused (returned
    /// with its index). One lock for the whole call; the checks, and the allocations the
    /// stored form needs, are made before it (both workers of a service take this lock:
    /// an allocation inside it makes the other one spin).
    pub(super) fn send(
        &self,
        messages: impl IntoIterator<Item = OutgoingMessage>,
        now: Instant,
    ) -> Vec<(usize, EntryError)> {
        let mut failed = Vec::new();
        let mut ready = smallvec::SmallVec::<[Ready; 1]>::new();
        let mut hold = GroupHold::default();
        for (i, m) in messages.into_iter().enumerate() {
            if let Some(held) = hold.check(&m) {
                failed.push((i, held));
            } else if let Some(reason) = self.refusal(&m) {
                hold.stop(&m);
                failed.push((i, EntryError::Refused(reason)));
            } else {
                ready.push(Ready::of(m, self.fifo));
            }
        }
        if ready.is_empty() {
            return failed;
        }
        let mut st = self.state.lock();
        promote(self, &mut st, now);
        for r in ready {
            self.store(&mut st, r, now);
        }
        drop(st);
        self.notify.notify_waiters();
        failed
    }

    /// Stores a message that passed [`Queue::refusal`].
    fn store(&self, st: &mut QueueState, mut r: Ready, now: Instant) {
        if self.fifo {
            let (Some(group), Some(dedup)) = (r.group.clone(), r.dedup.take()) else {
                return;
            };
            if !st.dedup.insert(dedup.clone()) {
                // Within the window a duplicate is accepted and dropped, as SQS does.
                tracing::debug!(queue = %self.name, dedup_id = %dedup, "duplicate dropped by FIFO deduplication");
                return;
            }
            st.dedup_order.push_back((now, dedup));
            let seq = push(st, r, Visibility::Visible, now);
            // The key shares the message's group id: no allocation, new group or not.
            let g = st.groups.entry(group.clone()).or_default();
            g.pending.push_back(seq);
            if g.in_flight == 0 && !g.queued {
                g.queued = true;
                st.ready_groups.push_back(group);
            }
        } else {
            let default = self.default_delay_ms.load(Ordering::Relaxed);
            let queue_delay = (default > 0).then(|| std::time::Duration::from_millis(default));
            match r.delay.filter(|d| !d.is_zero()).or(queue_delay) {
                Some(delay) => {
                    let seq = push(st, r, Visibility::Delayed, now);
                    st.delayed.push(Reverse((now + delay, seq)));
                }
                None => {
                    let seq = push(st, r, Visibility::Visible, now);
                    st.ready.push_back(seq);
                }
            }
        }
    }

    /// Takes up to `max` deliverable messages, invisible for `visibility` from `now`, and
    /// appends them to `into`; messages over the receive limit go to the dead-letter queue
    /// instead. Returns when the next delayed or in-flight message becomes visible, for a
    /// waiting receive.
    pub(super) fn receive_now(
        &self,
        max: usize,
        visibility: Duration,
        now: Instant,
        into: &mut Vec<ReceivedMessage>,
    ) -> Option<Instant> {
        let dead_letter = self.dead_letter.read().clone();
        let limit = dead_letter.as_ref().map(|(_, n)| *n);
        // Room made before the lock: no allocation inside it (see [`Taken`]).
        into.reserve(max);
        let first = into.len();
        let mut out = Taken {
            messages: into,
            first,
            ids: smallvec::SmallVec::new(),
        };
        let mut moved = Vec::new();
        let mut st = self.state.lock();
        promote(self, &mut st, now);
        let deadline = now + visibility;
        if self.fifo {
            self.take_fifo(&mut st, max, deadline, limit, now, &mut out, &mut moved);
        } else {
            self.take_standard(&mut st, max, deadline, limit, now, &mut out, &mut moved);
        }
        let next_due = next_due(&st);
        drop(st);
        out.write_receipts(self);
        if !moved.is_empty() {
            // `moved` is only ever filled when there is a dead-letter queue.
            if let Some((dlq, _)) = dead_letter {
                for m in moved {
                    tracing::warn!(
                        queue = %self.name,
                        dead_letter_queue = %dlq.name,
                        broker_id = %m.broker_id,
                        receive_count = m.receive_count,
                        "message exceeded the receive limit; moved to the dead-letter queue"
                    );
                    dlq.accept_moved(m, None);
                }
            }
        }
        next_due
    }

    #[allow(clippy::too_many_arguments)]
    fn take_standard(
        &self,
        st: &mut QueueState,
        max: usize,
        deadline: Instant,
        limit: Option<u32>,
        now: Instant,
        out: &mut Taken<'_>,
        moved: &mut Vec<Stored>,
    ) {
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
                limit.is_some_and(|limit| m.receive_count >= limit)
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
            begin_flight(m, now);
            out.push(self, seq, m, now);
            let version = m.deadline_version;
            st.deadlines.push(Reverse((deadline, seq, version)));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn take_fifo(
        &self,
        st: &mut QueueState,
        max: usize,
        deadline: Instant,
        limit: Option<u32>,
        now: Instant,
        out: &mut Taken<'_>,
        moved: &mut Vec<Stored>,
    ) {
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
                let over = limit.is_some_and(|limit| {
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
                    begin_flight(m, now);
                    out.push(self, seq, m, now);
                    m.deadline_version
                };
                st.deadlines.push(Reverse((deadline, seq, version)));
                if let Some(g) = st.groups.get_mut(&group) {
                    g.in_flight += 1;
                }
            }
            settle_group(st, &group);
        }
    }

    /// Receives into `into`, waiting until `until` for a first message. This is the
    /// broker's side of a long poll: it runs to its end whether or not anyone still waits
    /// for its answer.
    pub(super) async fn long_poll(
        &self,
        max: usize,
        visibility: Duration,
        until: Instant,
        into: &mut Vec<ReceivedMessage>,
    ) {
        let epoch = self.polls_ended.load(Ordering::SeqCst);
        let had = into.len();
        loop {
            // Registered before looking, so a send between the look and the wait wakes us.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = Instant::now();
            let next_due = self.receive_now(max, visibility, now, into);
            let ended = self.polls_ended.load(Ordering::SeqCst) != epoch;
            if into.len() > had || now >= until || ended {
                return;
            }
            let wake = next_due.map_or(until, |due| due.min(until));
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Deletes by receipt; returns the receipts that are not valid, with their index.
    ///
    /// The latest receipt deletes the message, in flight or back to visible (as long as no
    /// one received it again). An earlier receipt, or one of a message already gone, is
    /// accepted and does nothing: SQS says "the request succeeds, but the message might not
    /// be deleted".
    pub(super) fn delete(&self, receipts: &[Receipt], now: Instant) -> Vec<(usize, EntryError)> {
        let mut failed = Vec::new();
        let mut released = false;
        let mut st = self.state.lock();
        promote(self, &mut st, now);
        for (i, receipt) in receipts.iter().enumerate() {
            match self.holder(&st, receipt) {
                None => failed.push((i, EntryError::InvalidReceipt)),
                Some(Holder::Latest(seq)) => {
                    released |= self.remove(&mut st, seq).is_some() && self.fifo;
                }
                Some(Holder::Stale | Holder::Gone) => {}
            }
        }
        drop(st);
        if released {
            self.notify.notify_waiters();
        }
        failed
    }

    /// Changes the visibility of in-flight messages by receipt, to `timeout` from `now`.
    ///
    /// The latest receipt of an in-flight message applies (zero: visible at once, which
    /// frees its FIFO group); one of a message that is visible again is accepted and does
    /// nothing; an earlier receipt is accepted and does nothing; one of a message that is
    /// gone is not valid. A timeout past [`MAX_VISIBILITY`], or one that would keep the
    /// message invisible longer than that from its receive, is refused.
    pub(super) fn change_visibility(
        &self,
        receipts: &[Receipt],
        timeout: Duration,
        now: Instant,
    ) -> Vec<(usize, EntryError)> {
        if timeout > MAX_VISIBILITY {
            let reason = format!(
                "visibility timeout of {} s exceeds SQS's 12-hour maximum (VisibilityTimeout 43200)",
                secs_ceil(timeout)
            );
            return (0..receipts.len())
                .map(|i| (i, EntryError::Refused(reason.clone())))
                .collect();
        }
        let mut failed = Vec::new();
        let mut changed = false;
        let mut st = self.state.lock();
        promote(self, &mut st, now);
        for (i, receipt) in receipts.iter().enumerate() {
            let seq = match self.holder(&st, receipt) {
                None | Some(Holder::Gone) => {
                    failed.push((i, EntryError::InvalidReceipt));
                    continue;
                }
                Some(Holder::Stale) => continue,
                Some(Holder::Latest(seq)) => seq,
            };
            let Some(m) = st.messages.get_mut(&seq) else {
                continue;
            };
            if m.visibility != Visibility::InFlight {
                // Its visibility ended and no one received it again: nothing to change.
                continue;
            }
            if now + timeout > m.received_at + MAX_VISIBILITY {
                failed.push((
                    i,
                    EntryError::Refused(format!(
                        "a visibility timeout of {} s would keep the message invisible more than 12 hours after its receive",
                        secs_ceil(timeout)
                    )),
                ));
                continue;
            }
            changed = true;
            if timeout.is_zero() {
                make_visible(self, &mut st, seq);
            } else {
                // A new deadline; the old heap entry no longer matches the version.
                m.deadline_version = m.deadline_version.wrapping_add(1);
                let version = m.deadline_version;
                st.deadlines.push(Reverse((now + timeout, seq, version)));
            }
        }
        drop(st);
        if changed {
            // Something became visible, or a deadline moved: waiting receives look again.
            self.notify.notify_waiters();
        }
        failed
    }

    /// Removes the message of the latest receipt `receipt`, to move it elsewhere; `None`
    /// when the receipt is not the latest of a message this queue has.
    pub(super) fn take_for_move(&self, receipt: &str, now: Instant) -> Option<Stored> {
        let mut st = self.state.lock();
        promote(self, &mut st, now);
        let Some(Holder::Latest(seq)) = self.holder(&st, receipt) else {
            return None;
        };
        let m = self.remove(&mut st, seq);
        drop(st);
        if self.fifo {
            self.notify.notify_waiters();
        }
        m
    }

    /// Appends a message moved here from another queue (dead-lettering), with `reason` as
    /// its dead-letter reason attribute when given.
    pub(super) fn accept_moved(&self, m: Stored, reason: Option<&str>) {
        let attributes = match reason {
            Some(reason) => with_reason(&m.attributes, reason),
            None => m.attributes,
        };
        let group = match (self.fifo, m.group) {
            (true, None) => Some(Arc::from(DEAD_LETTER_GROUP)),
            (_, group) => group,
        };
        let mut st = self.state.lock();
        let now = Instant::now();
        promote(self, &mut st, now);
        let seq = st.next_seq;
        st.next_seq += 1;
        st.messages.insert(
            seq,
            Stored {
                broker_id: m.broker_id,
                body: m.body,
                attributes,
                group: group.clone(),
                receive_count: 0,
                visibility: Visibility::Visible,
                generation: 0,
                deadline_version: 0,
                received_at: now,
            },
        );
        match (self.fifo, group) {
            (true, Some(group)) => {
                st.groups
                    .entry(group.clone())
                    .or_default()
                    .pending
                    .push_back(seq);
                settle_group(&mut st, &group);
            }
            _ => st.ready.push_back(seq),
        }
        drop(st);
        self.notify.notify_waiters();
    }

    /// Message counts by state, as of `now`.
    pub(super) fn depth(&self, now: Instant) -> QueueDepth {
        let mut st = self.state.lock();
        promote(self, &mut st, now);
        let mut d = QueueDepth::default();
        for m in st.messages.values() {
            match m.visibility {
                Visibility::Visible => d.visible += 1,
                Visibility::InFlight => d.in_flight += 1,
                Visibility::Delayed => d.delayed += 1,
            }
        }
        d
    }

    /// What `receipt` refers to; `None` when this queue never issued it.
    fn holder(&self, st: &QueueState, receipt: &str) -> Option<Holder> {
        let (seq, generation) = parse_receipt(receipt.strip_prefix(&self.receipt_prefix)?)?;
        if generation == 0 || seq >= st.next_seq {
            return None;
        }
        Some(match st.messages.get(&seq) {
            None => Holder::Gone,
            Some(m) if m.generation == generation => Holder::Latest(seq),
            Some(m) if generation < m.generation => Holder::Stale,
            Some(_) => return None,
        })
    }

    /// Removes a message, whatever its state, keeping its FIFO group consistent.
    fn remove(&self, st: &mut QueueState, seq: u64) -> Option<Stored> {
        let m = st.messages.remove(&seq)?;
        if self.fifo {
            if let Some(group) = &m.group {
                if let Some(g) = st.groups.get_mut(group) {
                    if g.pending.front() == Some(&seq) {
                        g.pending.pop_front();
                    } else {
                        g.pending.retain(|s| *s != seq);
                    }
                    if m.visibility == Visibility::InFlight {
                        g.in_flight = g.in_flight.saturating_sub(1);
                    }
                }
                settle_group(st, group);
            }
        }
        // Standard queues: a visible message may still be listed in `ready`; receives skip
        // sequence numbers that are gone.
        Some(m)
    }

    /// The receipt of receive `generation` of message `seq`: `queue:seq:generation`
    /// (written by hand on the stack, then shared: this is on every receive).
    fn receipt(&self, seq: u64, generation: u32) -> Receipt {
        // The prefix is at most 21 bytes (`u64` and `:`), each number at most 20.
        let (seq, generation) = (decimal(seq), decimal(u64::from(generation)));
        let mut buf = [0u8; 64];
        let mut len = 0;
        for part in [
            self.receipt_prefix.as_bytes(),
            seq.digits(),
            b":",
            generation.digits(),
        ] {
            buf[len..len + part.len()].copy_from_slice(part);
            len += part.len();
        }
        Receipt::from(std::str::from_utf8(&buf[..len]).unwrap_or_default())
    }

    /// A received message whose receipt is still to be written (see [`Taken`]).
    fn received(&self, m: &Stored, now: Instant) -> ReceivedMessage {
        ReceivedMessage {
            received_at: now,
            broker_id: m.broker_id.clone(),
            receipt: self.no_receipt.clone(),
            body: m.body.clone(),
            attributes: m.attributes.clone(),
            receive_count: m.receive_count,
            group_id: m.group.clone(),
        }
    }
}

/// What one receive took under the lock. Each receipt is an allocation, so it is written
/// after the lock is released (both workers of a service take this lock: an allocation
/// inside it makes the other one spin); until then a message holds a placeholder. The
/// messages go straight into the caller's vector, which has room for them before the lock
/// is taken: the listener keeps one such vector per poller, because a fresh one with room
/// for a whole batch (10 × 104 bytes) is an allocation glibc serves from its large bins,
/// after consolidating its heap under the arena lock.
struct Taken<'a> {
    messages: &'a mut Vec<ReceivedMessage>,
    /// Where this receive's messages start in `messages`.
    first: usize,
    /// The sequence number and receive generation of each message, in order.
    ids: smallvec::SmallVec<[(u64, u32); MAX_BATCH_ENTRIES]>,
}

impl Taken<'_> {
    fn push(&mut self, q: &Queue, seq: u64, m: &Stored, now: Instant) {
        self.messages.push(q.received(m, now));
        self.ids.push((seq, m.generation));
    }

    /// How many this receive took.
    fn len(&self) -> usize {
        self.messages.len() - self.first
    }

    fn write_receipts(self, q: &Queue) {
        for (m, (seq, generation)) in self.messages[self.first..].iter_mut().zip(self.ids) {
            m.receipt = q.receipt(seq, generation);
        }
    }
}

/// Brings the queue up to `now`: due delayed messages and in-flight messages whose
/// visibility ended become visible, and expired deduplication ids are forgotten.
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
            st.dedup.remove(&*id);
        }
    }
}

/// When the next delayed or in-flight message becomes visible (heap entries may be stale:
/// waking early only means looking again).
fn next_due(st: &QueueState) -> Option<Instant> {
    let a = st.delayed.peek().map(|Reverse((t, _))| *t);
    let b = st.deadlines.peek().map(|Reverse((t, _, _))| *t);
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// An in-flight message becomes visible again (timeout or visibility set to zero).
fn make_visible(q: &Queue, st: &mut QueueState, seq: u64) {
    let Some(m) = st.messages.get_mut(&seq) else {
        return;
    };
    m.visibility = Visibility::Visible;
    if q.fifo {
        let Some(group) = m.group.clone() else {
            return;
        };
        if let Some(g) = st.groups.get_mut(&group) {
            g.in_flight = g.in_flight.saturating_sub(1);
        }
        settle_group(st, &group);
    } else {
        st.ready.push_back(seq);
    }
}

/// After a change to a FIFO group: forget it when it is empty, or list it as ready when
/// nothing of it is in flight.
fn settle_group(st: &mut QueueState, group: &Arc<str>) {
    let Some(g) = st.groups.get_mut(&**group) else {
        return;
    };
    if g.pending.is_empty() && g.in_flight == 0 {
        st.groups.remove(&**group);
    } else if g.in_flight == 0 && !g.queued {
        g.queued = true;
        st.ready_groups.push_back(group.clone());
    }
}

/// A message checked and made ready to store: what its stored form shares, allocated
/// before the queue's lock is taken.
struct Ready {
    broker_id: Arc<str>,
    body: Arc<str>,
    attributes: Attributes,
    delay: Option<std::time::Duration>,
    /// FIFO: the group and the deduplication id (the message id when none is given).
    group: Option<Arc<str>>,
    dedup: Option<Arc<str>>,
}

impl Ready {
    fn of(m: OutgoingMessage, fifo: bool) -> Self {
        let dedup = match (fifo, m.dedup_id) {
            (true, Some(id)) => Some(Arc::from(id)),
            (true, None) => Some(Arc::from(m.message_id.as_str())),
            (false, _) => None,
        };
        Ready {
            broker_id: m.message_id.into(),
            body: m.body,
            attributes: m.attributes,
            delay: m.delay,
            group: m.group_id.map(Arc::from),
            dedup,
        }
    }
}

fn push(st: &mut QueueState, r: Ready, visibility: Visibility, now: Instant) -> u64 {
    let seq = st.next_seq;
    st.next_seq += 1;
    // The body and attributes are shared, exactly their length: kept as they came, and
    // handed out by every receive without a copy.
    st.messages.insert(
        seq,
        Stored {
            broker_id: r.broker_id,
            body: r.body,
            attributes: r.attributes,
            group: r.group,
            receive_count: 0,
            visibility,
            generation: 0,
            deadline_version: 0,
            received_at: now,
        },
    );
    seq
}

fn begin_flight(m: &mut Stored, now: Instant) {
    m.receive_count += 1;
    m.generation = m.generation.wrapping_add(1);
    m.deadline_version = m.deadline_version.wrapping_add(1);
    m.visibility = Visibility::InFlight;
    m.received_at = now;
}

/// The `seq:generation` of a receipt, after its queue prefix.
fn parse_receipt(rest: &str) -> Option<(u64, u32)> {
    let (seq, generation) = rest.split_once(':')?;
    Some((seq.parse().ok()?, generation.parse().ok()?))
}

/// A `u64` in decimal, written on the stack: its digits end the array.
struct Decimal {
    digits: [u8; 20],
    start: usize,
}

impl Decimal {
    fn digits(&self) -> &[u8] {
        &self.digits[self.start..]
    }
}

fn decimal(mut n: u64) -> Decimal {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    Decimal { digits, start }
}

/// `attributes` with `reason` as the dead-letter reason (replacing an earlier one).
fn with_reason(attributes: &[(crate::AttributeName, AttributeValue)], reason: &str) -> Attributes {
    let kept = attributes.iter().filter(|(k, _)| k != attr::DLQ_REASON);
    let reason = (attr::DLQ_REASON.into(), AttributeValue::from(reason));
    kept.cloned().chain(std::iter::once(reason)).collect()
}

/// Whole seconds, rounded up, as SQS counts them.
fn secs_ceil(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_message_keeps_no_spare_capacity_and_a_receive_shares_it() {
        let q = Queue::new("q", false, None);
        let mut attributes = Vec::with_capacity(10);
        attributes.push((attr::TYPE.into(), AttributeValue::from("t")));
        let body: Arc<str> = Arc::from("{\"v\":1}");
        let m = OutgoingMessage {
            body: body.clone(),
            attributes: attributes.into(),
            group_id: None,
            dedup_id: None,
            delay: None,
            wire_name: "t".into(),
            message_id: "m".into(),
        };
        assert!(q.send([m], Instant::now()).is_empty());
        let stored_attributes = {
            let st = q.state.lock();
            let stored = st.messages.values().next().expect("stored");
            assert!(
                Arc::ptr_eq(&stored.body, &body),
                "the queue keeps the sender's body"
            );
            assert_eq!(
                stored.attributes.len(),
                1,
                "a slice of exactly the attributes"
            );
            stored.attributes.clone()
        };
        let mut got = Vec::new();
        q.receive_now(1, Duration::from_secs(30), Instant::now(), &mut got);
        let [got] = got.as_slice() else {
            panic!("one message, got {}", got.len())
        };
        assert!(Arc::ptr_eq(&got.body, &body), "a receive copies no body");
        assert!(
            Arc::ptr_eq(&got.attributes, &stored_attributes),
            "nor attributes"
        );
    }
}
