//! [`TestContext`]: a [`Context`] for calling one handler directly, as a plain async
//! function, without a running service.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use super::messages::Messages;
use crate::context::Context;
use crate::dispatch::Dispatcher;
use crate::envelope::{AttributeValue, Envelope};
use crate::message::{Command, Event, Message, MessageKind};

/// A [`Context`] for calling a `#[handler]` directly, with the metadata the test sets, that
/// keeps what the handler sends and raises instead of sending it.
///
/// It dereferences to `&Context`, so `create_order(cmd, &ctx)` calls a handler that takes
/// `ctx: &Context`; [`sent`](Self::sent) and [`raised`](Self::raised) then read what it
/// produced (in a running service, that would go out only after it returned `Ok`).
///
/// ```
/// use sourceflow::testing::TestContext;
/// use sourceflow::{command, event, handler, Context};
///
/// #[command(queue = "doc-tc-orders")]
/// #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
/// pub struct PlaceOrder { pub order_id: u64 }
///
/// #[event(topic = "doc-tc-order-events")]
/// #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
/// pub struct OrderPlaced { pub order_id: u64, pub tenant: String }
///
/// #[handler]
/// async fn place_order(cmd: PlaceOrder, ctx: &Context) -> sourceflow::Result<()> {
///     let tenant = ctx.attribute("tenant").map(|t| t.as_str().to_string()).unwrap_or_default();
///     ctx.raise(OrderPlaced { order_id: cmd.order_id, tenant }).await
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> sourceflow::Result<()> {
/// let ctx = TestContext::new().message_id("m-1").receive_count(2).attribute("tenant", "t1");
/// place_order(PlaceOrder { order_id: 7 }, &ctx).await?;
///
/// let placed = ctx.raised::<OrderPlaced>().assert_one();
/// assert_eq!((placed.order_id, placed.tenant.as_str()), (7, "t1"));
/// ctx.sent::<PlaceOrder>().assert_none();
/// // The setters share their names with `Context`'s getters: read through `context()`.
/// assert_eq!(ctx.context().message_id(), "m-1");
/// # Ok(())
/// # }
/// ```
pub struct TestContext {
    settings: Settings,
    /// Shared state, moved into the dispatcher when the context is built.
    states: Mutex<HashMap<TypeId, Box<dyn Any + Send + Sync>>>,
    ctx: OnceLock<Context>,
}

/// The metadata the context is built with.
#[derive(Debug, Clone)]
struct Settings {
    message_id: String,
    wire_name: String,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    entity_id: Option<String>,
    receive_count: u32,
    queue: String,
    service: String,
    attributes: Vec<(crate::AttributeName, AttributeValue)>,
    headers: Vec<(String, String)>,
}

impl Default for TestContext {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for TestContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestContext")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl TestContext {
    /// A context for a first delivery (receive count 1) with a fresh message id, of a
    /// message on queue `test` of service `test`, with no attributes and no state.
    pub fn new() -> Self {
        TestContext {
            settings: Settings {
                message_id: uuid::Uuid::new_v4().to_string(),
                wire_name: "test.Message".into(),
                correlation_id: None,
                causation_id: None,
                entity_id: None,
                receive_count: 1,
                queue: "test".into(),
                service: "test".into(),
                attributes: Vec::new(),
                headers: Vec::new(),
            },
            states: Mutex::new(HashMap::new()),
            ctx: OnceLock::new(),
        }
    }

    /// A context for a delivery of a message of type `M` (its wire name, on its declared
    /// queue or topic name).
    pub fn for_message<M: Message>() -> Self {
        let mut c = Self::new();
        c.settings.wire_name = M::NAME.to_string();
        c.settings.queue = M::DESTINATION.to_string();
        c
    }

    /// The message id ([`Context::message_id`]).
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.settings.message_id = id.into();
        self
    }

    /// Which delivery this is ([`Context::receive_count`]; 1 is the first).
    pub fn receive_count(mut self, n: u32) -> Self {
        self.settings.receive_count = n;
        self
    }

    /// A message attribute the message arrived with ([`Context::attribute`]): what a
    /// producer sets with [`SendOptions::attribute`](crate::SendOptions::attribute).
    pub fn attribute(mut self, name: impl Into<String>, value: impl Into<AttributeValue>) -> Self {
        self.settings
            .attributes
            .push((name.into().into(), value.into()));
        self
    }

    /// A header the message arrived with ([`Context::header`]): what a producer sets with
    /// [`SendOptions::header`](crate::SendOptions::header), or what was propagated to it.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.headers.push((name.into(), value.into()));
        self
    }

    /// The conversation ([`Context::correlation_id`]; default: the message id).
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.settings.correlation_id = Some(id.into());
        self
    }

    /// The message whose handler sent this one ([`Context::causation_id`]).
    pub fn causation_id(mut self, id: impl Into<String>) -> Self {
        self.settings.causation_id = Some(id.into());
        self
    }

    /// The entity id ([`Context::entity_id`]).
    pub fn entity_id(mut self, id: impl Into<String>) -> Self {
        self.settings.entity_id = Some(id.into());
        self
    }

    /// The queue it was received from ([`Context::queue`]).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.settings.queue = queue.into();
        self
    }

    /// The service name ([`Context::service`]).
    pub fn service(mut self, service: impl Into<String>) -> Self {
        self.settings.service = service.into();
        self
    }

    /// Shared state for [`Context::state`] (a handler that takes `State<T>` is given it
    /// by the test as an argument instead).
    pub fn state<T: Clone + Send + Sync + 'static>(self, value: T) -> Self {
        self.states
            .lock()
            .insert(TypeId::of::<T>(), Box::new(value));
        self
    }

    /// The [`Context`] to pass to the handler (also reached by dereferencing).
    pub fn context(&self) -> &Context {
        self.ctx.get_or_init(|| self.build())
    }

    fn build(&self) -> Context {
        let s = &self.settings;
        let states = std::mem::take(&mut *self.states.lock());
        let dispatcher = Arc::new(Dispatcher::capturing(s.service.clone(), states));
        let envelope = Envelope {
            v: crate::envelope::VERSION,
            wire_name: s.wire_name.clone(),
            id: s.message_id.clone(),
            entity_id: s.entity_id.clone(),
            correlation_id: s.correlation_id.clone(),
            causation_id: s.causation_id.clone(),
            seq: 0,
            ts: 0,
            payload: empty_payload(),
            payload_encoding: None,
            claim_check: None,
        };
        let queue: Arc<str> = Arc::from(s.queue.as_str());
        let attributes = s.attributes.clone().into();
        Context::new(
            dispatcher,
            envelope.into(),
            s.receive_count,
            queue,
            None,
            attributes,
        )
        .with_headers(s.headers.iter().cloned().collect())
    }

    /// The commands of type `C` the handler sent, in order.
    ///
    /// # Panics
    /// When a held `C` does not decode as one.
    pub fn sent<C: Command>(&self) -> Messages<C> {
        self.held::<C>(MessageKind::Command, "sent")
    }

    /// The events of type `E` the handler raised, in order.
    ///
    /// # Panics
    /// When a held `E` does not decode as one.
    pub fn raised<E: Event>(&self) -> Messages<E> {
        self.held::<E>(MessageKind::Event, "raised")
    }

    fn held<M: Message>(&self, kind: MessageKind, verb: &str) -> Messages<M> {
        let items = match self.ctx.get() {
            None => Vec::new(),
            Some(ctx) => ctx
                .held()
                .iter()
                .map(|p| p.parts())
                .filter(|(k, _, m)| *k == kind && m.wire_name == M::NAME)
                .map(|(_, _, m)| decode::<M>(&m.body))
                .collect(),
        };
        Messages::new(items, format!("`{}` {verb} by the handler", M::NAME))
    }
}

impl std::ops::Deref for TestContext {
    type Target = Context;
    fn deref(&self) -> &Context {
        self.context()
    }
}

fn empty_payload() -> Box<serde_json::value::RawValue> {
    // `null` is valid JSON: this cannot fail.
    serde_json::value::RawValue::from_string("null".into())
        .unwrap_or_else(|_| unreachable!("`null` is JSON"))
}

fn decode<M: Message>(body: &str) -> M {
    let payload = serde_json::from_str::<Envelope>(body)
        .map_err(|e| e.to_string())
        .and_then(|env| crate::payload::decode::<M>(env.payload.get()));
    match payload {
        Ok(m) => m,
        Err(e) => panic!(
            "a held `{}` does not decode as `{}`: {e}",
            M::NAME,
            std::any::type_name::<M>()
        ),
    }
}
