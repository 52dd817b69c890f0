//! Turning typed messages into transport calls: destination lookup, early size checks, and
//! batching of what a handler produced.

use std::any::{Any, TypeId};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use crate::claim_check;
use crate::encryption;
use crate::envelope::{self, OutgoingMessage};
use crate::error::{BatchError, EntryError, Error, Result};
use crate::message::{Message, MessageKind};
use crate::naming::Naming;
use crate::schedule;
use crate::telemetry::{self, Metrics};
use crate::transport::{Transport, MAX_DELAY, SNS_MAX_MESSAGE_BYTES, SQS_MAX_MESSAGE_BYTES};
use tracing::Instrument;

/// A message waiting to be dispatched.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    kind: MessageKind,
    destination: Arc<str>,
    message: OutgoingMessage,
}

impl Pending {
    /// Its message id.
    #[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
    pub(crate) fn message_id(&self) -> &str {
        &self.message.message_id
    }

    /// Its kind, destination and message, for the test harness's reading of a held outbox.
    #[cfg(feature = "testing")]
    pub(crate) fn parts(&self) -> (MessageKind, &str, &OutgoingMessage) {
        (self.kind, &self.destination, &self.message)
    }
}

/// Everything needed to dispatch: the transport, resolved destinations, shared state.
pub(crate) struct Dispatcher {
    transport: Arc<dyn Transport>,
    service: String,
    naming: Naming,
    // Looked up per message sent and per `State` extracted: foldhash, cheaper than SipHash.
    destinations: foldhash::HashMap<&'static str, Arc<str>>,
    states: foldhash::HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    metrics: Arc<Metrics>,
    encryption: Option<Arc<encryption::Settings>>,
    /// Encodes every payload in clear, whatever its type declares: the test harness's
    /// dispatcher for a `TestContext`, which sends nothing and reads what it held.
    #[cfg(feature = "testing")]
    plain: bool,
    /// The query handlers this service runs (see [`crate::query`]).
    queries: crate::query::QueryTable,
    /// Which headers are propagated and which may be logged.
    headers: crate::headers::Settings,
    /// The longest delay asked of the broker; longer ones are held back by the listeners
    /// ([`crate::schedule`]).
    delay_cap: std::time::Duration,
    /// Large messages: compression and the claim check ([`crate::claim_check`]).
    claim_check: Option<Arc<claim_check::Settings>>,
}

impl Dispatcher {
    pub(crate) fn new(
        transport: Arc<dyn Transport>,
        service: String,
        naming: Naming,
        destinations: HashMap<&'static str, Arc<str>>,
        states: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
        metrics: Arc<Metrics>,
        encryption: Option<Arc<encryption::Settings>>,
    ) -> Self {
        Dispatcher {
            transport,
            service,
            naming,
            destinations: destinations.into_iter().collect(),
            states: states.into_iter().collect(),
            metrics,
            encryption,
            #[cfg(feature = "testing")]
            plain: false,
            queries: crate::query::QueryTable::new(),
            headers: crate::headers::Settings::default(),
            claim_check: None,
            delay_cap: MAX_DELAY,
        }
    }

    /// A dispatcher for a handler called directly in a test (`testing::TestContext`): it
    /// encodes in clear and is never asked to send (what the handler produced stays held by
    /// its `Context`).
    #[cfg(feature = "testing")]
    pub(crate) fn capturing(
        service: String,
        states: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    ) -> Self {
        let transport: Arc<dyn Transport> = Arc::new(crate::MemoryTransport::new());
        let meter = opentelemetry::global::meter("sourceflow");
        // A handler called directly may ask any query linked into the test binary.
        let queries: Vec<_> = crate::registry::query_routes().collect();
        Dispatcher {
            plain: true,
            queries: crate::registry::query_table(&queries),
            ..Dispatcher::new(
                transport,
                service,
                Naming::new(""),
                HashMap::new(),
                states,
                Arc::new(Metrics::new(&meter)),
                None,
            )
        }
    }

    /// With a lower cap on the delays asked of the broker (test only: see
    /// `Builder::native_delay_cap`).
    pub(crate) fn with_delay_cap(mut self, cap: std::time::Duration) -> Self {
        self.delay_cap = crate::schedule::native_cap(cap);
        self
    }

    /// The longest delay asked of the broker.
    pub(crate) fn delay_cap(&self) -> std::time::Duration {
        self.delay_cap
    }

    /// With these large-message settings (the builder's `claim_check`/`compression`).
    pub(crate) fn with_claim_check(mut self, settings: Option<Arc<claim_check::Settings>>) -> Self {
        self.claim_check = settings;
        self
    }

    /// With the query handlers the service runs.
    pub(crate) fn with_queries(mut self, queries: crate::query::QueryTable) -> Self {
        self.queries = queries;
        self
    }

    /// The handler of the query type `query`, if the service runs one.
    pub(crate) fn query_route(
        &self,
        query: TypeId,
    ) -> Option<&'static crate::registry::QueryRoute> {
        self.queries.get(&query).copied()
    }

    /// The full name of the destination of a wire name known to the binary.
    pub(crate) fn destination_of(&self, wire_name: &str) -> Option<&Arc<str>> {
        self.destinations.get(wire_name)
    }

    pub(crate) fn encryption(&self) -> Option<&encryption::Settings> {
        self.encryption.as_deref()
    }

    /// True when messages of this wire name must travel encrypted.
    pub(crate) fn must_encrypt(&self, declared: bool) -> bool {
        declared || self.encryption.as_ref().is_some_and(|e| e.all)
    }

    /// Whether messages of `M` are sealed (encrypted, which awaits the key provider) when
    /// encoded; the others are encoded without awaiting anything.
    pub(crate) fn seals<M: Message>(&self) -> bool {
        #[cfg(feature = "testing")]
        if self.plain {
            return false;
        }
        self.must_encrypt(M::ENCRYPT)
    }

    /// Serializes `msg` into its envelope, encrypting the payload when its type requires it.
    pub(crate) async fn encode<M: Message>(
        &self,
        msg: &M,
        meta: envelope::SendMeta,
    ) -> Result<OutgoingMessage> {
        if !self.seals::<M>() {
            return envelope::encode(msg, meta);
        }
        let Some(enc) = &self.encryption else {
            return Err(Error::Config(format!(
                "{} must be encrypted, but no key provider is configured: set SOURCEFLOW_KMS_KEY_ID (KMS) or SOURCEFLOW_LOCAL_KEY (development), or call `.key_provider(..)`",
                M::NAME
            )));
        };
        let plaintext = zeroize::Zeroizing::new(serde_json::to_vec(msg).map_err(|source| {
            Error::Serialize {
                wire_name: M::NAME,
                source,
            }
        })?);
        let destination = match self.destinations.get(M::NAME) {
            Some(d) => d.to_string(),
            None => self.naming.resource(M::DESTINATION),
        };
        let sealed = enc
            .encryptor
            .seal(&plaintext, &encryption::context(M::NAME, &destination))
            .await?;
        envelope::encode_payload(msg, &sealed, meta, true)
    }

    /// [`encode`](Self::encode), then the headers' attribute ([`crate::headers`]).
    pub(crate) async fn encode_with_headers<M: Message>(
        &self,
        msg: &M,
        meta: envelope::SendMeta,
        headers: &crate::headers::Headers,
    ) -> Result<OutgoingMessage> {
        let user = meta.attributes.len();
        let mut out = self.encode(msg, meta).await?;
        crate::headers::attach(&mut out, headers, user)?;
        Ok(out)
    }

    /// [`encode_with_headers`](Self::encode_with_headers) of a message that is not sealed
    /// (see [`seals`](Self::seals)), without a future.
    pub(crate) fn encode_plain_with_headers<M: Message>(
        &self,
        msg: &M,
        meta: envelope::SendMeta,
        headers: &crate::headers::Headers,
    ) -> Result<OutgoingMessage> {
        debug_assert!(!self.seals::<M>());
        let user = meta.attributes.len();
        let mut out = envelope::encode(msg, meta)?;
        crate::headers::attach(&mut out, headers, user)?;
        Ok(out)
    }

    /// With these header settings (the builder's `propagate_header`/`log_header`).
    pub(crate) fn with_headers(mut self, headers: crate::headers::Settings) -> Self {
        self.headers = headers;
        self
    }

    /// What the service does with headers.
    pub(crate) fn headers(&self) -> &crate::headers::Settings {
        &self.headers
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(crate) fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    pub(crate) fn service(&self) -> &str {
        &self.service
    }

    pub(crate) fn state<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.states.get(&TypeId::of::<T>())?.downcast_ref::<T>()
    }

    /// Resolves the destination of `M` and checks the size and delay limits before
    /// anything is sent.
    pub(crate) fn pending<M: Message>(&self, message: OutgoingMessage) -> Result<Pending> {
        let destination = match self.destinations.get(M::NAME) {
            Some(d) => d.clone(),
            None => Arc::from(self.naming.resource(M::DESTINATION)),
        };
        let message = self.shrink(message)?;
        if let Some(c) = &self.claim_check {
            c.check_delay(&message, broker_limit(M::KIND))
                .map_err(Error::Unsupported)?;
        }
        let max = self.max_bytes(M::KIND);
        pending_within(M::KIND, destination, message, max, self.delay_cap)
    }

    /// The message with its payload compressed when compression is on and it is large
    /// enough to gain.
    fn shrink(&self, mut message: OutgoingMessage) -> Result<OutgoingMessage> {
        let Some(above) = self.claim_check.as_ref().and_then(|c| c.compress_above) else {
            return Ok(message);
        };
        let shrunk = claim_check::shrink(&message.body, above)
            .map_err(|e| Error::Other(format!("{}: {e}", message.wire_name).into()))?;
        if let Some(body) = shrunk {
            message.body = body;
        }
        Ok(message)
    }

    /// The largest message of `kind` this dispatcher takes: the broker's limit, or the
    /// claim check's maximum.
    fn max_bytes(&self, kind: MessageKind) -> usize {
        let limit = broker_limit(kind);
        self.claim_check
            .as_ref()
            .map_or(limit, |c| c.max_bytes(limit))
    }

    /// The batch with the payload of every message too large for the broker stored, and a
    /// pointer in its place. Nothing is sent when a payload cannot be stored: every entry
    /// fails (the one that could not be stored with why), so a retry keeps the order.
    async fn offload(
        &self,
        kind: MessageKind,
        dest: &str,
        mut batch: Vec<OutgoingMessage>,
    ) -> std::result::Result<Vec<OutgoingMessage>, BatchError> {
        let Some((target, threshold)) = self.claim_check.as_ref().and_then(|c| {
            let threshold = c.threshold(broker_limit(kind))?;
            Some((c.target.as_ref()?, threshold))
        }) else {
            return Ok(batch);
        };
        let large: Vec<usize> = (0..batch.len())
            .filter(|&i| batch[i].size() > threshold)
            .collect();
        if large.is_empty() {
            return Ok(batch);
        }
        let stored = futures_util::future::join_all(
            large
                .iter()
                .map(|&i| claim_check::offload(target, &batch[i])),
        )
        .await;
        let mut failed = Vec::new();
        for (&i, result) in large.iter().zip(stored) {
            match result {
                Ok(m) => batch[i] = m,
                Err(e) => failed.push((i, e)),
            }
        }
        if failed.is_empty() {
            return Ok(batch);
        }
        Err(not_stored(kind, dest, batch.len(), failed))
    }

    /// Sends one message now. A destination that does not exist is named as such.
    pub(crate) async fn dispatch(&self, p: Pending) -> Result<()> {
        let (kind, dest) = (p.kind, p.destination.clone());
        self.call(kind, &dest, vec![p.message])
            .await
            .map_err(|e| match (e.failed.first(), kind) {
                (Some((_, EntryError::NoSuchDestination(_))), MessageKind::Command) => {
                    Error::QueueDoesNotExist(dest.to_string())
                }
                (Some((_, EntryError::NoSuchDestination(_))), MessageKind::Event) => {
                    Error::TopicDoesNotExist(dest.to_string())
                }
                _ => Error::from(e),
            })
    }

    /// Sends what a handler produced, in order, one call per run of messages to the same
    /// destination (the transport splits it into batches). On failure, the messages not
    /// sent — the refused or failed entries of the failing call, then everything after it —
    /// come back in their order; nothing that was accepted is among them.
    pub(crate) async fn flush(
        &self,
        pending: Vec<Pending>,
    ) -> std::result::Result<(), Undispatched> {
        let mut runs = runs(pending).into_iter();
        while let Some(run) = runs.next() {
            let (kind, dest) = (run[0].kind, run[0].destination.clone());
            let messages: Vec<OutgoingMessage> = run.iter().map(|p| p.message.clone()).collect();
            if let Err(error) = self.call(kind, &dest, messages).await {
                let failed: std::collections::HashSet<usize> = error.failed_indices().collect();
                let mut remaining: Vec<Pending> = run
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| failed.contains(i))
                    .map(|(_, p)| p)
                    .collect();
                remaining.extend(runs.flatten());
                return Err(Undispatched { remaining, error });
            }
        }
        Ok(())
    }

    async fn call(
        &self,
        kind: MessageKind,
        dest: &Arc<str>,
        batch: Vec<OutgoingMessage>,
    ) -> std::result::Result<(), BatchError> {
        let batch = self.offload(kind, dest, batch).await?;
        let wire_names = telemetry::BatchWireNames::of(batch.iter().map(|m| &m.wire_name));
        let system = telemetry::messaging_system(self.transport.name(), kind);
        let operation = match kind {
            MessageKind::Command => "send",
            MessageKind::Event => "publish",
        };
        let count = batch.len();
        let started = std::time::Instant::now();
        // Made in each branch as a temporary (a future moved from a local into another is
        // stored twice in this function's state machine).
        let work = move || match kind {
            MessageKind::Command => self.transport.send(dest, batch),
            MessageKind::Event => self.transport.publish(dest, batch),
        };
        let result = match self.metrics.spans() {
            None => {
                let span = tracing::info_span!(
                    "sourceflow.dispatch",
                    otel.kind = "producer",
                    messaging.system = system,
                    messaging.destination.name = &**dest,
                    messaging.operation.type = operation,
                    messaging.batch.message_count = count,
                    sourceflow.service = self.service(),
                    otel.status_code = tracing::field::Empty,
                );
                async {
                    let result = work().await;
                    if result.is_err() {
                        tracing::Span::current()
                            .record("otel.status_code", telemetry::STATUS_ERROR);
                    }
                    result
                }
                .instrument(span)
                .await
            }
            Some(spans) => {
                use opentelemetry::KeyValue;
                let destination = opentelemetry::StringValue::from(dest.clone());
                let attributes = [
                    KeyValue::new("messaging.system", system),
                    KeyValue::new("messaging.destination.name", destination),
                    KeyValue::new("messaging.operation.type", operation),
                    KeyValue::new("messaging.batch.message_count", count as i64),
                    spans.service(),
                ];
                let parent = opentelemetry::Context::current();
                let kind = opentelemetry::trace::SpanKind::Producer;
                let cx = spans.start("sourceflow.dispatch", kind, attributes, &parent);
                let result = work().await;
                telemetry::end(&cx, result.is_err());
                result
            }
        };
        let failed: Vec<usize> = match &result {
            Ok(()) => Vec::new(),
            Err(e) => e.failed_indices().collect(),
        };
        self.metrics
            .dispatched(kind, dest, &wire_names, started.elapsed(), &failed);
        result
    }
}

/// Splits messages into runs of consecutive messages to the same destination (one run,
/// the common case of a handler's outbox, is the vector it was given: no allocation).
fn runs(pending: Vec<Pending>) -> smallvec::SmallVec<[Vec<Pending>; 1]> {
    let same = |a: &Pending, b: &Pending| a.kind == b.kind && a.destination == b.destination;
    if pending.windows(2).all(|w| same(&w[0], &w[1])) {
        return match pending.is_empty() {
            true => smallvec::SmallVec::new(),
            false => smallvec::smallvec![pending],
        };
    }
    let mut runs = smallvec::SmallVec::<[Vec<Pending>; 1]>::new();
    for p in pending {
        match runs.last_mut() {
            Some(run) if same(&run[0], &p) => run.push(p),
            _ => runs.push(vec![p]),
        }
    }
    runs
}

/// The largest message SQS (a command) or SNS (an event) takes.
fn broker_limit(kind: MessageKind) -> usize {
    match kind {
        MessageKind::Command => SQS_MAX_MESSAGE_BYTES,
        MessageKind::Event => SNS_MAX_MESSAGE_BYTES,
    }
}

/// The batch error of an offload that failed for the entries of `failed`: every other
/// entry is held back (nothing was sent).
fn not_stored(
    kind: MessageKind,
    dest: &str,
    total: usize,
    failed: Vec<(usize, EntryError)>,
) -> BatchError {
    let operation = match kind {
        MessageKind::Command => "SendMessageBatch",
        MessageKind::Event => "PublishBatch",
    };
    let held = EntryError::Transient(
        "held back: another message of this call could not be stored (claim check)".into(),
    );
    let mut all = BatchError::all(operation, dest, total, held);
    for (i, e) in failed {
        all.failed[i].1 = e;
    }
    all
}

/// A message to `destination` (its full name), its delay prepared for the broker
/// ([`schedule::prepare`]: delays beyond `delay_cap` carried in the message), checked
/// against the broker's size limit.
#[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
pub(crate) fn pending_to(
    kind: MessageKind,
    destination: Arc<str>,
    message: OutgoingMessage,
    delay_cap: std::time::Duration,
) -> Result<Pending> {
    let max = broker_limit(kind);
    pending_within(kind, destination, message, max, delay_cap)
}

/// Like [`pending_to`], taking messages up to `max` bytes (the claim check stores what is
/// over the broker's limit).
fn pending_within(
    kind: MessageKind,
    destination: Arc<str>,
    mut message: OutgoingMessage,
    max: usize,
    delay_cap: std::time::Duration,
) -> Result<Pending> {
    schedule::prepare(kind, &destination, &mut message, delay_cap)?;
    message.check_size(&destination, max)?;
    Ok(Pending {
        kind,
        destination,
        message,
    })
}

/// Prepares the delay of a message to `destination` (a delay to a FIFO destination is
/// refused), then checks its size against what SQS or SNS accept.
#[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
pub(crate) fn check_outgoing(
    kind: MessageKind,
    destination: &str,
    message: &mut OutgoingMessage,
    delay_cap: std::time::Duration,
) -> Result<()> {
    schedule::prepare(kind, destination, message, delay_cap)?;
    message.check_size(destination, broker_limit(kind))
}

/// Messages a flush could not send, and why.
#[derive(Debug)]
pub(crate) struct Undispatched {
    /// What is still to go, in order (the failed entries first, then the rest).
    pub remaining: Vec<Pending>,
    /// The call that failed.
    pub error: BatchError,
}

impl Undispatched {
    /// True when an entry was refused: retrying cannot send it.
    pub(crate) fn refused(&self) -> bool {
        self.error
            .failed
            .iter()
            .any(|(_, e)| matches!(e, EntryError::Refused(_)))
    }
}

/// A [`Pending`] message as stored with a completed idempotency record, so that a worker
/// that dies after completing but before dispatching loses nothing.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredPending {
    event: bool,
    destination: String,
    body: String,
    /// `String` values as plain strings (as before attributes were typed), others tagged.
    attributes: Vec<(envelope::AttributeName, envelope::AttributeValue)>,
    group_id: Option<String>,
    dedup_id: Option<String>,
    delay_ms: Option<u64>,
    wire_name: String,
    message_id: String,
}

/// Serializes an outbox for the idempotency store.
pub(crate) fn encode_outbox(pending: &[Pending]) -> String {
    let stored: Vec<StoredPending> = pending
        .iter()
        .map(|p| StoredPending {
            event: p.kind == MessageKind::Event,
            destination: p.destination.to_string(),
            body: p.message.body.to_string(),
            attributes: p.message.attributes.to_vec(),
            group_id: p.message.group_id.clone(),
            dedup_id: p.message.dedup_id.clone(),
            delay_ms: p.message.delay.map(|d| d.as_millis() as u64),
            wire_name: p.message.wire_name.to_string(),
            message_id: p.message.message_id.clone(),
        })
        .collect();
    // Serializing plain strings and numbers cannot fail.
    serde_json::to_string(&stored).unwrap_or_else(|_| "[]".to_string())
}

/// Restores an outbox stored by [`encode_outbox`].
pub(crate) fn decode_outbox(json: &str) -> Result<Vec<Pending>> {
    let stored: Vec<StoredPending> = serde_json::from_str(json)
        .map_err(|e| Error::Other(format!("stored outbox is unreadable: {e}").into()))?;
    Ok(stored
        .into_iter()
        .map(|s| Pending {
            kind: if s.event {
                MessageKind::Event
            } else {
                MessageKind::Command
            },
            destination: Arc::from(s.destination.as_str()),
            message: OutgoingMessage {
                body: Arc::from(s.body),
                attributes: s.attributes.into(),
                group_id: s.group_id,
                dedup_id: s.dedup_id,
                delay: s.delay_ms.map(std::time::Duration::from_millis),
                wire_name: Cow::Owned(s.wire_name),
                message_id: s.message_id,
            },
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(kind: MessageKind, destination: &str, id: &str) -> Pending {
        Pending {
            kind,
            destination: destination.into(),
            message: OutgoingMessage {
                body: "{}".into(),
                attributes: Vec::new().into(),
                group_id: None,
                dedup_id: None,
                delay: None,
                wire_name: "t.T".into(),
                message_id: id.into(),
            },
        }
    }

    fn ids(runs: &[Vec<Pending>]) -> Vec<Vec<&str>> {
        runs.iter()
            .map(|r| r.iter().map(Pending::message_id).collect())
            .collect()
    }

    #[test]
    fn runs_keep_order_and_split_where_the_destination_or_kind_changes() {
        use MessageKind::{Command, Event};
        assert!(runs(Vec::new()).is_empty());
        let one = runs(vec![pending(Event, "t", "a"), pending(Event, "t", "b")]);
        assert_eq!(ids(&one), vec![vec!["a", "b"]]);
        let mixed = runs(vec![
            pending(Event, "t", "a"),
            pending(Command, "t", "b"),
            pending(Command, "t", "c"),
            pending(Command, "q", "d"),
            pending(Event, "t", "e"),
        ]);
        assert_eq!(
            ids(&mixed),
            vec![vec!["a"], vec!["b", "c"], vec!["d"], vec!["e"]]
        );
    }
}
