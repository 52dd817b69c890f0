//! What a handler is given: the incoming message's metadata, `send`/`raise` for follow-up
//! messages, and shared state.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::dispatch::{Dispatcher, Pending};
use crate::envelope::{AttributeValue, Incoming, SendMeta};
use crate::error::{InvokeError, Result};
use crate::message::{Command, Event, Message};

/// Shared state handed to handlers that take a `State<T>` argument.
///
/// Register the value with [`Builder::state`](crate::Builder::state); every handler
/// invocation gets a clone, so put cheaply clonable things here (a pool, an `Arc`).
///
/// ```ignore
/// #[handler]
/// async fn create_order(cmd: CreateOrder, State(db): State<Db>) -> sourceflow::Result<()> { .. }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct State<T>(pub T);

/// The context of one handler invocation.
///
/// Messages sent with [`send`](Context::send) or raised with [`raise`](Context::raise) are
/// held back and dispatched only after the handler returns `Ok`; if it fails, none go out.
/// They carry this message's correlation id, and its message id as their causation id.
pub struct Context {
    dispatcher: Arc<Dispatcher>,
    envelope: Incoming,
    receive_count: u32,
    queue: Arc<str>,
    outbox: Mutex<Vec<Pending>>,
    produced: std::sync::atomic::AtomicU32,
    /// The incoming `traceparent`/`tracestate`, passed on when no OpenTelemetry context
    /// is active.
    trace: Option<(String, Option<String>)>,
    /// The message attributes it arrived with (sourceflow's and the producer's).
    attributes: crate::transport::Attributes,
    /// Its headers, read from their attribute when first asked for.
    headers: std::sync::OnceLock<crate::headers::Headers>,
    /// The transaction of a transactional handler, between its runs.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    tx: Mutex<Option<crate::tx::TxSlot>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("message_id", &self.envelope.id())
            .field("wire_name", &self.envelope.wire_name())
            .field("correlation_id", &self.correlation_id())
            .field("receive_count", &self.receive_count)
            .field("queue", &self.queue)
            .finish()
    }
}

impl Context {
    pub(crate) fn new(
        dispatcher: Arc<Dispatcher>,
        envelope: Incoming,
        receive_count: u32,
        queue: Arc<str>,
        trace: Option<(String, Option<String>)>,
        attributes: crate::transport::Attributes,
    ) -> Self {
        Context {
            dispatcher,
            envelope,
            receive_count,
            queue,
            outbox: Mutex::new(Vec::new()),
            produced: std::sync::atomic::AtomicU32::new(0),
            trace,
            attributes,
            headers: std::sync::OnceLock::new(),
            #[cfg(any(feature = "postgres", feature = "sqlite"))]
            tx: Mutex::new(None),
        }
    }

    /// With these headers in place of those read from the attributes (a context built
    /// outside a listener, e.g. by a test harness).
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub(crate) fn with_headers(self, headers: crate::headers::Headers) -> Self {
        let _ = self.headers.set(headers);
        self
    }

    /// A message attribute the message arrived with: one its producer set with
    /// [`SendOptions::attribute`](crate::SendOptions::attribute), or one of sourceflow's own
    /// (`sourceflow.*`).
    pub fn attribute(&self, name: &str) -> Option<&AttributeValue> {
        crate::envelope::attribute_value(&self.attributes, name)
    }

    /// Every message attribute the message arrived with.
    pub fn attributes(&self) -> &[(crate::AttributeName, AttributeValue)] {
        &self.attributes
    }

    /// A header the message arrived with (case-insensitive name): set by its producer with
    /// [`SendOptions::header`](crate::SendOptions::header) or propagated from the message
    /// that caused it. See [`headers`](crate::headers).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers().get(name)
    }

    /// Every header the message arrived with.
    pub fn headers(&self) -> &crate::headers::Headers {
        self.headers
            .get_or_init(|| crate::headers::Headers::from_attributes(&self.attributes))
    }

    /// The headers marked safe to log, as `name=value` pairs; `None` (and no work) when
    /// the service marks none.
    pub(crate) fn safe_headers(&self) -> Option<String> {
        let safe = &self.dispatcher.headers().safe;
        if safe.is_empty() {
            return None;
        }
        self.headers().shown(safe)
    }

    /// The envelope's message id: stable across redeliveries and retried sends.
    pub fn message_id(&self) -> &str {
        self.envelope.id()
    }

    /// The conversation this message belongs to.
    pub fn correlation_id(&self) -> &str {
        self.envelope.correlation_id().unwrap_or(self.envelope.id())
    }

    /// The message whose handler sent this one, if any.
    pub fn causation_id(&self) -> Option<&str> {
        self.envelope.causation_id()
    }

    /// The entity id (FIFO group id), if the message type has one.
    pub fn entity_id(&self) -> Option<&str> {
        self.envelope.entity_id()
    }

    /// How many times this message has been received, this time included (1 on the first
    /// delivery).
    pub fn receive_count(&self) -> u32 {
        self.receive_count
    }

    /// The wire name of the message.
    pub fn wire_name(&self) -> &str {
        self.envelope.wire_name()
    }

    /// The queue it was received from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The sender's sequence number.
    pub fn sequence(&self) -> u64 {
        self.envelope.seq
    }

    /// When it was sent, in milliseconds since the Unix epoch.
    pub fn sent_at_millis(&self) -> u64 {
        self.envelope.ts
    }

    /// The name of the service running this handler.
    pub fn service(&self) -> &str {
        self.dispatcher.service()
    }

    /// Shared state of type `T`, if the runtime was given one.
    pub fn state<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.dispatcher.state::<T>()
    }

    /// Sends a command once this handler has returned `Ok`.
    pub async fn send<C: Command>(&self, command: C) -> Result<()> {
        self.hold(&command).await
    }

    /// Publishes an event once this handler has returned `Ok`.
    pub async fn raise<E: Event>(&self, event: E) -> Result<()> {
        self.hold(&event).await
    }

    /// Sends a command with options (message attributes, a delay) once this handler has
    /// returned `Ok`. Its correlation and message ids come from the message being handled:
    /// options that set them are refused.
    pub async fn send_with<C: Command>(
        &self,
        command: C,
        mut options: crate::SendOptions,
    ) -> Result<()> {
        let headers = options.take_headers();
        self.hold_with(&command, options.for_handler()?, headers)
            .await
    }

    /// Publishes an event with options (message attributes) once this handler has returned
    /// `Ok`; see [`send_with`](Self::send_with).
    pub async fn raise_with<E: Event>(
        &self,
        event: E,
        mut options: crate::SendOptions,
    ) -> Result<()> {
        let headers = options.take_headers();
        self.hold_with(&event, options.for_handler()?, headers)
            .await
    }

    /// Answers a query now, in process, with the handler this service runs for it (see
    /// [`query`](mod@crate::query)). Unlike `send` and `raise`, it is not held back: the
    /// answer is there to use in this handler.
    pub async fn query<Q: crate::Query>(&self, query: Q) -> Result<Q::Response> {
        crate::query::ask(&self.dispatcher, query).await
    }

    async fn hold<M: Message>(&self, msg: &M) -> Result<()> {
        self.hold_with(msg, SendMeta::default(), Default::default())
            .await
    }

    /// The headers of a message this handler produces: those propagated from this
    /// message, overridden by those set.
    fn outgoing_headers(&self, set: &crate::headers::Outgoing) -> Result<crate::headers::Headers> {
        let settings = self.dispatcher.headers();
        if settings.propagate.is_empty() && !set.propagate_all {
            return set.resolve(crate::headers::Headers::default());
        }
        set.resolve(settings.inherited(self.headers(), set.propagate_all))
    }

    async fn hold_with<M: Message>(
        &self,
        msg: &M,
        options: SendMeta,
        headers: crate::headers::Outgoing,
    ) -> Result<()> {
        let headers = self.outgoing_headers(&headers)?;
        // Ids derived from this message's id and the position make a re-run of the handler
        // (after a failed flush or a crash) produce the same ids, so FIFO deduplication and
        // idempotent receivers recognise the repeats.
        let position = self
            .produced
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = crate::envelope::derived_id(self.envelope.id(), position);
        let (traceparent, tracestate) = match crate::telemetry::current_trace_context() {
            Some((tp, ts)) => (Some(tp), ts),
            None => match &self.trace {
                Some((tp, ts)) => (Some(tp.clone()), ts.clone()),
                None => (None, None),
            },
        };
        let meta = SendMeta {
            correlation_id: Some(self.correlation_id().to_string()),
            causation_id: Some(self.envelope.id().to_string()),
            message_id: Some(id),
            traceparent,
            tracestate,
            ..options
        };
        // Only a sealed message awaits (its key provider), in a future of its own: this
        // future is part of every handler's, which is allocated per message, and glibc
        // serves an allocation over 1 KB from its large bins after consolidating its heap
        // under the arena lock (see the throughput bench's doc comment).
        let out = if self.dispatcher.seals::<M>() {
            Box::pin(self.dispatcher.encode_with_headers(msg, meta, &headers)).await?
        } else {
            self.dispatcher
                .encode_plain_with_headers(msg, meta, &headers)?
        };
        let pending = self.dispatcher.pending::<M>(out)?;
        self.outbox.lock().push(pending);
        Ok(())
    }

    /// Takes the transaction out (to hand it to a handler, or to commit it).
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub(crate) fn take_tx(&self) -> Option<crate::tx::TxSlot> {
        self.tx.lock().take()
    }

    /// Puts the transaction (back) in.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub(crate) fn give_tx(&self, tx: crate::tx::TxSlot) {
        *self.tx.lock() = Some(tx);
    }

    /// A copy of what the handler has sent and raised so far (the test harness reads it).
    #[cfg(feature = "testing")]
    pub(crate) fn held(&self) -> Vec<Pending> {
        self.outbox.lock().clone()
    }

    pub(crate) fn take_outbox(&self) -> Vec<Pending> {
        std::mem::take(&mut *self.outbox.lock())
    }

    #[doc(hidden)]
    pub fn __decode<M: Message>(&self) -> Result<M, InvokeError> {
        crate::payload::decode(self.envelope.payload()).map_err(|reason| InvokeError::Decode {
            wire_name: self.envelope.wire_name().to_string(),
            reason,
        })
    }
}
