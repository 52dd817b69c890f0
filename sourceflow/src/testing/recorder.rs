//! The recording transport: a [`Transport`] that passes every call to the real one and
//! notes, at the broker boundary, what went out (sent, raised, dead-lettered) and what each
//! watched message is doing (waiting, being handled, waiting out a retry), so that the
//! harness can tell when everything has settled and name what has not.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::dispatch::Dispatcher;
use crate::envelope::{self, AttributeValue, OutgoingMessage};
use crate::error::{BatchError, Result};
use crate::filter::FilterPolicy;
use crate::message::MessageKind;
use crate::transport::{QueueDepth, Receipt, Receive, ReceivedMessage, Topology, Transport};

use super::messages::{DeadLetter, Recorded};

/// What a watched message is doing, as far as the broker calls tell.
#[derive(Debug, Clone)]
pub(crate) enum Tracked {
    /// Sent or published, not received yet; `due` when it was sent with a delay.
    Waiting {
        wire_name: String,
        due: Option<Instant>,
    },
    /// Received: a handler has it.
    Handling {
        wire_name: String,
        since: Instant,
        receive_count: u32,
    },
    /// Handed back with a visibility timeout: it comes back at `due`.
    RetryDue { wire_name: String, due: Instant },
}

/// Everything recorded so far.
#[derive(Default)]
struct Book {
    /// What the broker accepted, in the order it accepted it.
    history: Vec<Recorded>,
    dead: Vec<DeadLetter>,
    /// Watched messages by (queue, message id).
    tracked: HashMap<(String, String), Tracked>,
    /// The message each receipt stands for.
    receipts: HashMap<Receipt, (String, String)>,
}

/// The transport a [`TestApp`](super::TestApp) runs on.
pub(crate) struct Recorder {
    inner: Arc<dyn Transport>,
    book: Mutex<Book>,
    /// Calls that change what a queue holds (send, publish, delete, visibility, dead
    /// letter) in progress.
    busy: AtomicUsize,
    /// Bumped when such a call starts or ends and when a receive returns: a check that
    /// saw the same value before and after it read the queues saw one moment.
    generation: AtomicU64,
    /// Woken after every bump.
    activity: Notify,
    /// When the last bump was (the live harness's quiet period counts from it).
    last_activity: Mutex<Instant>,
    /// Sends to one destination are recorded in the order the broker took them.
    order: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The service's dispatcher, once it runs: decrypts recorded payloads.
    dispatcher: OnceLock<Arc<Dispatcher>>,
    /// Topic → the service's queues subscribed to it, with their filters.
    fan_out: OnceLock<HashMap<String, Vec<Subscriber>>>,
}

/// A queue subscribed to a topic, and the filter of its subscription.
struct Subscriber {
    queue: String,
    filter: Option<FilterPolicy>,
}

/// A change in progress: counted as busy until dropped.
struct Busy<'a>(&'a Recorder);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
        self.0.bump();
    }
}

impl Recorder {
    pub(crate) fn new(inner: Arc<dyn Transport>) -> Self {
        Recorder {
            inner,
            book: Mutex::new(Book::default()),
            busy: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            activity: Notify::new(),
            last_activity: Mutex::new(Instant::now()),
            order: Mutex::new(HashMap::new()),
            dispatcher: OnceLock::new(),
            fan_out: OnceLock::new(),
        }
    }

    /// Once the service runs: its dispatcher, and which of its queues each topic feeds.
    pub(crate) fn attach(&self, dispatcher: Arc<Dispatcher>, topology: &Topology) {
        let mut fan_out: HashMap<String, Vec<Subscriber>> = HashMap::new();
        for s in &topology.subscriptions {
            let filter = s.filter.as_ref().and_then(|f| FilterPolicy::parse(f).ok());
            fan_out
                .entry(s.topic.clone())
                .or_default()
                .push(Subscriber {
                    queue: s.queue.clone(),
                    filter,
                });
        }
        let _ = self.fan_out.set(fan_out);
        let _ = self.dispatcher.set(dispatcher);
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        *self.last_activity.lock() = Instant::now();
        self.activity.notify_waiters();
    }

    fn begin(&self) -> Busy<'_> {
        self.busy.fetch_add(1, Ordering::SeqCst);
        self.bump();
        Busy(self)
    }

    /// The notification of the next change (enable it before checking, then await it).
    pub(crate) fn activity(&self) -> tokio::sync::futures::Notified<'_> {
        self.activity.notified()
    }

    /// A snapshot marker: `Some(generation)` when no change is in progress.
    pub(crate) fn idle_generation(&self) -> Option<u64> {
        let g = self.generation.load(Ordering::SeqCst);
        (self.busy.load(Ordering::SeqCst) == 0).then_some(g)
    }

    /// How long since the last change.
    pub(crate) fn quiet_for(&self) -> Duration {
        self.last_activity.lock().elapsed()
    }

    pub(crate) fn history(&self) -> Vec<Recorded> {
        self.book.lock().history.clone()
    }

    pub(crate) fn dead_letters(&self) -> Vec<DeadLetter> {
        self.book.lock().dead.clone()
    }

    /// The watched messages on `queues`, by queue.
    pub(crate) fn tracked_on(&self, queues: &HashSet<String>) -> Vec<(String, String, Tracked)> {
        let book = self.book.lock();
        let mut v: Vec<_> = book
            .tracked
            .iter()
            .filter(|((q, _), _)| queues.contains(q))
            .map(|((q, id), t)| (q.clone(), id.clone(), t.clone()))
            .collect();
        v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        v
    }

    async fn order_lock(&self, destination: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .order
            .lock()
            .entry(destination.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// Records the accepted entries of a send or publish.
    async fn accepted(
        &self,
        kind: MessageKind,
        destination: &str,
        messages: Vec<OutgoingMessage>,
        result: &std::result::Result<(), BatchError>,
    ) {
        let failed: HashSet<usize> = match result {
            Ok(()) => HashSet::new(),
            Err(e) => e.failed_indices().collect(),
        };
        let now = Instant::now();
        for (i, m) in messages.into_iter().enumerate() {
            if failed.contains(&i) {
                continue;
            }
            if kind == MessageKind::Command && self.held_back(destination, &m, now) {
                continue;
            }
            let payload = self.plaintext(&m.body, &m.attributes).await;
            let record = Recorded::new(kind, destination, &m, payload);
            let queues = match kind {
                MessageKind::Command => vec![destination.to_string()],
                MessageKind::Event => self.subscribers(destination, &m.attributes),
            };
            let mut book = self.book.lock();
            for q in queues {
                let waiting = Tracked::Waiting {
                    wire_name: m.wire_name.to_string(),
                    due: m.delay.map(|d| now + d),
                };
                book.tracked.insert((q, m.message_id.clone()), waiting);
            }
            book.history.push(record);
        }
    }

    /// A message a listener sent again to its queue because it was not due yet
    /// ([`crate::schedule`]): not a new send, but the same message waiting on. It waits
    /// again, and the delete of the copy received (whose receipt is forgotten here) does not
    /// settle it.
    fn held_back(&self, queue: &str, m: &OutgoingMessage, now: Instant) -> bool {
        if crate::schedule::due_at(&m.attributes).is_none() {
            return false;
        }
        let key = (queue.to_string(), m.message_id.clone());
        let mut book = self.book.lock();
        if !matches!(book.tracked.get(&key), Some(Tracked::Handling { .. })) {
            return false;
        }
        book.receipts.retain(|_, k| *k != key);
        let waiting = Tracked::Waiting {
            wire_name: m.wire_name.to_string(),
            due: m.delay.map(|d| now + d),
        };
        book.tracked.insert(key, waiting);
        true
    }

    /// The service's queues a message published to `topic` with `attributes` reaches.
    fn subscribers(
        &self,
        topic: &str,
        attributes: &[(crate::AttributeName, AttributeValue)],
    ) -> Vec<String> {
        let Some(subscribers) = self.fan_out.get().and_then(|f| f.get(topic)) else {
            return Vec::new();
        };
        subscribers
            .iter()
            .filter(|s| s.filter.as_ref().is_none_or(|f| f.matches(attributes)))
            .map(|s| s.queue.clone())
            .collect()
    }

    /// The payload of a body as JSON, decrypted when it travelled encrypted; an error
    /// text when it cannot be read.
    async fn plaintext(
        &self,
        body: &str,
        attributes: &[(crate::AttributeName, AttributeValue)],
    ) -> std::result::Result<String, String> {
        let mut env = envelope::decode(body, attributes).map_err(|e| e.to_string())?;
        // A payload the claim check stored, or compressed: read back as a receiver would.
        let store = self.inner.object_store();
        crate::claim_check::restore(store.as_deref(), &mut env)
            .await
            .map_err(|e| e.to_string())?;
        if envelope::attribute(attributes, crate::encryption::ATTRIBUTE).is_none() {
            return Ok(env.payload.get().to_string());
        }
        let dispatcher = self.dispatcher.get().ok_or("the service is not running")?;
        let settings = dispatcher.encryption().ok_or("no key provider")?;
        let sealed: crate::encryption::Sealed =
            serde_json::from_str(env.payload.get()).map_err(|e| e.to_string())?;
        let destination = dispatcher
            .destination_of(&env.wire_name)
            .ok_or_else(|| format!("unknown type `{}`", env.wire_name))?;
        let context = crate::encryption::context(&env.wire_name, destination);
        let plain = settings
            .encryptor
            .open(&sealed, &context)
            .await
            .map_err(|e| e.to_string())?;
        String::from_utf8(plain.to_vec()).map_err(|_| "plaintext is not UTF-8".to_string())
    }

    fn received(&self, queue: &str, messages: &[ReceivedMessage]) {
        let now = Instant::now();
        let mut book = self.book.lock();
        for m in messages {
            let Ok(env) = envelope::decode(&m.body, &m.attributes) else {
                continue;
            };
            let key = (queue.to_string(), env.id);
            let handling = Tracked::Handling {
                wire_name: env.wire_name,
                since: now,
                receive_count: m.receive_count,
            };
            book.tracked.insert(key.clone(), handling);
            book.receipts.insert(m.receipt.clone(), key);
        }
    }

    /// Applies `f` to the watched message of each receipt that the call did.
    fn settled_receipts(
        &self,
        receipts: &[Receipt],
        result: &std::result::Result<(), BatchError>,
        f: impl Fn(&mut Book, (String, String)),
    ) {
        let failed: HashSet<usize> = match result {
            Ok(()) => HashSet::new(),
            Err(e) => e.failed_indices().collect(),
        };
        let mut book = self.book.lock();
        for (i, r) in receipts.iter().enumerate() {
            if failed.contains(&i) {
                continue;
            }
            if let Some(key) = book.receipts.get(r).cloned() {
                f(&mut book, key);
            }
        }
    }
}

#[async_trait]
impl Transport for Recorder {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn provision(&self, topology: &Topology) -> Result<()> {
        self.inner.provision(topology).await
    }

    async fn send(
        &self,
        queue: &str,
        messages: Vec<OutgoingMessage>,
    ) -> std::result::Result<(), BatchError> {
        let _busy = self.begin();
        let _order = self.order_lock(queue).await;
        let copy = messages.clone();
        let result = self.inner.send(queue, messages).await;
        self.accepted(MessageKind::Command, queue, copy, &result)
            .await;
        result
    }

    async fn publish(
        &self,
        topic: &str,
        messages: Vec<OutgoingMessage>,
    ) -> std::result::Result<(), BatchError> {
        let _busy = self.begin();
        let _order = self.order_lock(topic).await;
        let copy = messages.clone();
        let result = self.inner.publish(topic, messages).await;
        self.accepted(MessageKind::Event, topic, copy, &result)
            .await;
        result
    }

    async fn receive(&self, queue: &str, request: Receive) -> Result<Vec<ReceivedMessage>> {
        let got = self.inner.receive(queue, request).await?;
        if !got.is_empty() {
            self.received(queue, &got);
            self.bump();
        }
        Ok(got)
    }

    fn receive_linger(&self) -> Duration {
        self.inner.receive_linger()
    }

    async fn end_receives(&self, queue: &str) {
        self.inner.end_receives(queue).await
    }

    async fn delete(
        &self,
        queue: &str,
        receipts: Vec<Receipt>,
    ) -> std::result::Result<(), BatchError> {
        let _busy = self.begin();
        let result = self.inner.delete(queue, receipts.clone()).await;
        self.settled_receipts(&receipts, &result, |book, key| {
            book.tracked.remove(&key);
        });
        result
    }

    async fn change_visibility(
        &self,
        queue: &str,
        receipts: Vec<Receipt>,
        timeout: Duration,
    ) -> std::result::Result<(), BatchError> {
        let _busy = self.begin();
        let result = self
            .inner
            .change_visibility(queue, receipts.clone(), timeout)
            .await;
        if super::LEASE_EXTENSION.try_with(|_| ()).is_ok() {
            return result;
        }
        let due = Instant::now() + timeout;
        self.settled_receipts(&receipts, &result, |book, key| {
            let Some(t) = book.tracked.get_mut(&key) else {
                return;
            };
            let wire_name = match t {
                Tracked::Waiting { wire_name, .. }
                | Tracked::Handling { wire_name, .. }
                | Tracked::RetryDue { wire_name, .. } => std::mem::take(wire_name),
            };
            *t = match timeout.is_zero() {
                true => Tracked::Waiting {
                    wire_name,
                    due: None,
                },
                false => Tracked::RetryDue { wire_name, due },
            };
        });
        result
    }

    async fn dead_letter(
        &self,
        queue: &str,
        dead_letter_queue: &str,
        message: &ReceivedMessage,
        reason: &str,
    ) -> Result<()> {
        let _busy = self.begin();
        self.inner
            .dead_letter(queue, dead_letter_queue, message, reason)
            .await?;
        let payload = self.plaintext(&message.body, &message.attributes).await;
        let env = envelope::decode(&message.body, &message.attributes).ok();
        let dead = DeadLetter::new(queue, env.as_ref(), message, reason, payload);
        let mut book = self.book.lock();
        if let Some(key) = book.receipts.remove(&message.receipt) {
            book.tracked.remove(&key);
        }
        book.dead.push(dead);
        Ok(())
    }

    async fn queue_depth(&self, queue: &str) -> Result<Option<QueueDepth>> {
        self.inner.queue_depth(queue).await
    }

    fn object_store(&self) -> Option<Arc<dyn crate::claim_check::ObjectStore>> {
        self.inner.object_store()
    }

    async fn missing(&self, topology: &Topology) -> Result<Vec<String>> {
        self.inner.missing(topology).await
    }

    async fn inspect(&self, topology: &Topology) -> Result<Vec<crate::topology::Finding>> {
        self.inner.inspect(topology).await
    }

    async fn unsubscribe(&self, topic: &str, queue: &str) -> Result<()> {
        self.inner.unsubscribe(topic, queue).await
    }
}
