//! The routes that `#[command]`, `#[event]` and `#[handler]` register at compile time, and
//! the checks that can only run once every crate is linked. Query handlers register a
//! [`QueryRoute`]: queries are answered in process, so they have no queue and no topology.

use std::any::TypeId;
use std::collections::{BTreeMap, HashMap, HashSet};

use crate::context::Context;
use crate::error::InvokeError;
use crate::message::{Message, MessageKind};

/// A boxed, sendable future, as returned by handler invokers.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// The type-erased entry point of a handler: decodes the payload from the context and runs
/// the user's function.
pub type Invoker = for<'a> fn(&'a Context) -> BoxFuture<'a, Result<(), InvokeError>>;

/// Queue settings as a route declares them: on `#[command(..)]` for its queue, on an
/// event `#[handler(..)]` for its subscriber queue. What is unset comes from the builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueOptions {
    /// `visibility_timeout`, in seconds.
    pub visibility_timeout_secs: Option<u32>,
    /// `retention`, in seconds.
    pub retention_secs: Option<u32>,
    /// `max_receive_count`: handler attempts before the dead-letter queue.
    pub max_receive_count: Option<u32>,
    /// `delay`, in seconds (the queue's `DelaySeconds`).
    pub delay_secs: Option<u32>,
    /// `high_throughput` (FIFO only).
    pub high_throughput: bool,
    /// `sse`: server-side encryption.
    pub sse: Option<Sse>,
    /// `tags(..)`.
    pub tags: &'static [(&'static str, &'static str)],
}

impl QueueOptions {
    /// Nothing declared.
    pub const NONE: QueueOptions = QueueOptions {
        visibility_timeout_secs: None,
        retention_secs: None,
        max_receive_count: None,
        delay_secs: None,
        high_throughput: false,
        sse: None,
        tags: &[],
    };

    /// True when nothing is declared.
    pub fn is_none(&self) -> bool {
        *self == Self::NONE
    }
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self::NONE
    }
}

/// Server-side encryption as a route declares it (`sse = ".."`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sse {
    /// `sse = "sqs"`: SQS-managed keys.
    Sqs,
    /// `sse = "kms:<key>"`.
    Kms(&'static str),
    /// `sse = "none"`.
    Disabled,
}

/// A message type as registered by `#[command]` or `#[event]`.
#[derive(Debug, Clone, Copy)]
pub struct MessageRoute {
    /// The wire name.
    pub name: &'static str,
    /// Command or event.
    pub kind: MessageKind,
    /// Queue (command) or topic (event) as declared.
    pub destination: &'static str,
    /// FIFO destination.
    pub fifo: bool,
    /// Has an `#[entity_id]` field.
    pub has_entity_id: bool,
    /// Declared with `encrypt`.
    pub encrypt: bool,
    /// Module that declared the type.
    pub module_path: &'static str,
    /// The type's name.
    pub type_name: &'static str,
    /// Settings of its queue (commands).
    pub queue_options: QueueOptions,
    /// The payload's JSON Schema (draft 7, standalone: subschemas under `definitions`),
    /// registered when the type derives `JsonSchema` (see [`export`](crate::export));
    /// `None` otherwise.
    pub schema: Option<fn() -> serde_json::Value>,
}

impl MessageRoute {
    /// The route of `M`; used by the generated code.
    pub const fn of<M: Message>(module_path: &'static str, type_name: &'static str) -> Self {
        MessageRoute {
            name: M::NAME,
            kind: M::KIND,
            destination: M::DESTINATION,
            fifo: M::FIFO,
            has_entity_id: M::HAS_ENTITY_ID,
            encrypt: M::ENCRYPT,
            module_path,
            type_name,
            queue_options: M::QUEUE_OPTIONS,
            schema: None,
        }
    }

    /// With the payload schema `schema`; used by the generated code when the type derives
    /// `JsonSchema`.
    pub const fn with_schema(mut self, schema: fn() -> serde_json::Value) -> Self {
        self.schema = Some(schema);
        self
    }

    /// `module::Type`, for messages.
    pub fn rust_path(&self) -> String {
        format!("{}::{}", self.module_path, self.type_name)
    }
}

/// A `State<T>` a handler asks for.
#[derive(Debug, Clone, Copy)]
pub struct StateRequirement {
    /// `TypeId::of::<T>`.
    pub type_id: fn() -> TypeId,
    /// `type_name::<T>`.
    pub type_name: fn() -> &'static str,
}

impl StateRequirement {
    /// The requirement for `State<T>`; used by the generated code.
    pub const fn of<T: 'static>() -> Self {
        StateRequirement {
            type_id: TypeId::of::<T>,
            type_name: std::any::type_name::<T>,
        }
    }
}

/// The database of a transactional handler's `&mut Tx<DB>` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TxKind {
    /// `Tx<Postgres>`: needs the PostgreSQL idempotency store.
    Postgres,
    /// `Tx<Sqlite>`: needs the SQLite idempotency store.
    Sqlite,
}

impl TxKind {
    /// The argument type as a user writes it.
    pub fn type_name(self) -> &'static str {
        match self {
            TxKind::Postgres => "Tx<Postgres>",
            TxKind::Sqlite => "Tx<Sqlite>",
        }
    }

    /// The idempotency store it needs, as a log or an error names it.
    pub fn store(self) -> &'static str {
        match self {
            TxKind::Postgres => "postgres",
            TxKind::Sqlite => "sqlite",
        }
    }
}

/// A handler as registered by `#[handler]`.
#[derive(Clone, Copy)]
pub struct HandlerRoute {
    /// Wire name of the message it handles.
    pub message: &'static str,
    /// Command or event.
    pub kind: MessageKind,
    /// The message's queue or topic as declared.
    pub destination: &'static str,
    /// FIFO destination.
    pub fifo: bool,
    /// The function's name.
    pub name: &'static str,
    /// The module it is in.
    pub module_path: &'static str,
    /// Source file.
    pub file: &'static str,
    /// Source line.
    pub line: u32,
    /// `#[handler(queue = "...")]`: subscriber queue override (events only).
    pub queue: Option<&'static str>,
    /// `State<T>` arguments.
    pub states: &'static [StateRequirement],
    /// Settings of the subscriber queue (event handlers).
    pub queue_options: QueueOptions,
    /// `#[handler(filter = "..")]`: an SNS filter policy on message attributes (events).
    pub filter: Option<&'static str>,
    /// The database of its `&mut Tx<DB>` argument: a transactional handler.
    pub tx: Option<TxKind>,
    /// Runs the handler.
    pub invoke: Invoker,
}

impl std::fmt::Debug for HandlerRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerRoute")
            .field("message", &self.message)
            .field("kind", &self.kind)
            .field("handler", &self.qualified_name())
            .finish()
    }
}

impl HandlerRoute {
    /// Builds the route for a handler of `M`; used by the generated code.
    #[allow(clippy::too_many_arguments)]
    pub const fn new<M: Message>(
        name: &'static str,
        module_path: &'static str,
        file: &'static str,
        line: u32,
        queue: Option<&'static str>,
        states: &'static [StateRequirement],
        queue_options: QueueOptions,
        filter: Option<&'static str>,
        invoke: Invoker,
    ) -> Self {
        HandlerRoute {
            message: M::NAME,
            kind: M::KIND,
            destination: M::DESTINATION,
            fifo: M::FIFO,
            name,
            module_path,
            file,
            line,
            queue,
            states,
            queue_options,
            filter,
            tx: None,
            invoke,
        }
    }

    /// The route of a handler that takes a transaction of `kind` (`None`: none); used by
    /// the generated code.
    pub const fn with_tx(mut self, kind: Option<TxKind>) -> Self {
        self.tx = kind;
        self
    }

    /// `module::function`.
    pub fn qualified_name(&self) -> String {
        format!("{}::{}", self.module_path, self.name)
    }

    fn location(&self) -> String {
        format!("{} ({}:{})", self.qualified_name(), self.file, self.line)
    }
}

/// The type-erased entry point of a query handler: takes the boxed query, answers with the
/// boxed response.
pub type QueryInvoker =
    fn(
        crate::query::QueryScope,
        Box<dyn std::any::Any + Send>,
    ) -> BoxFuture<'static, Result<Box<dyn std::any::Any + Send>, InvokeError>>;

/// A query handler as registered by `#[handler]` on a function that answers a `#[query]`.
#[derive(Clone, Copy)]
pub struct QueryRoute {
    /// The query's name ([`Query::NAME`](crate::Query::NAME)).
    pub query: &'static str,
    /// `TypeId::of` the query type.
    pub query_type: fn() -> TypeId,
    /// The response type's name, as `std::any::type_name` gives it.
    pub response: fn() -> &'static str,
    /// The function's name.
    pub name: &'static str,
    /// The module it is in.
    pub module_path: &'static str,
    /// Source file.
    pub file: &'static str,
    /// Source line.
    pub line: u32,
    /// `State<T>` arguments.
    pub states: &'static [StateRequirement],
    /// Runs the handler.
    pub invoke: QueryInvoker,
}

impl std::fmt::Debug for QueryRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryRoute")
            .field("query", &self.query)
            .field("response", &(self.response)())
            .field("handler", &self.qualified_name())
            .finish()
    }
}

impl QueryRoute {
    /// Builds the route for a handler of `Q`; used by the generated code.
    pub const fn new<Q: crate::Query>(
        name: &'static str,
        module_path: &'static str,
        file: &'static str,
        line: u32,
        states: &'static [StateRequirement],
        invoke: QueryInvoker,
    ) -> Self {
        QueryRoute {
            query: Q::NAME,
            query_type: TypeId::of::<Q>,
            response: std::any::type_name::<Q::Response>,
            name,
            module_path,
            file,
            line,
            states,
            invoke,
        }
    }

    /// `module::function`.
    pub fn qualified_name(&self) -> String {
        format!("{}::{}", self.module_path, self.name)
    }

    fn location(&self) -> String {
        format!("{} ({}:{})", self.qualified_name(), self.file, self.line)
    }
}

inventory::collect!(MessageRoute);
inventory::collect!(HandlerRoute);
inventory::collect!(QueryRoute);

/// Every query handler linked into this binary.
pub fn query_routes() -> impl Iterator<Item = &'static QueryRoute> {
    inventory::iter::<QueryRoute>.into_iter()
}

/// Problems among the query handlers a service runs: two for one query type, and `State<T>`
/// nobody gave.
pub(crate) fn check_queries(
    queries: &[&'static QueryRoute],
    states: &HashSet<TypeId>,
    problems: &mut Vec<String>,
) {
    let mut by_type: HashMap<TypeId, Vec<&QueryRoute>> = HashMap::new();
    for q in queries {
        by_type.entry((q.query_type)()).or_default().push(q);
        for s in q.states {
            if !states.contains(&(s.type_id)()) {
                problems.push(format!(
                    "query handler {} takes `State<{}>`, but the runtime was not given one: add `.state(value)` to the builder",
                    q.location(),
                    (s.type_name)()
                ));
            }
        }
    }
    for hs in by_type.values().filter(|hs| hs.len() > 1) {
        let mut locs: Vec<_> = hs.iter().map(|h| h.location()).collect();
        locs.sort();
        problems.push(format!(
            "query `{}` has {} handlers: {}; a query is answered by exactly one handler, so keep one",
            hs[0].query,
            hs.len(),
            locs.join(", ")
        ));
    }
}

/// The query handlers by query type; call after [`check_queries`] found no duplicate.
pub(crate) fn query_table(queries: &[&'static QueryRoute]) -> crate::query::QueryTable {
    queries.iter().map(|q| ((q.query_type)(), *q)).collect()
}

/// Every message type linked into this binary.
pub fn message_routes() -> impl Iterator<Item = &'static MessageRoute> {
    inventory::iter::<MessageRoute>.into_iter()
}

/// Every handler linked into this binary.
pub fn handler_routes() -> impl Iterator<Item = &'static HandlerRoute> {
    inventory::iter::<HandlerRoute>.into_iter()
}

/// Problems that involve message types only: two types claiming one wire name.
pub(crate) fn check_messages(routes: &[&'static MessageRoute], problems: &mut Vec<String>) {
    let mut by_name: BTreeMap<&str, Vec<&MessageRoute>> = BTreeMap::new();
    for r in routes {
        by_name.entry(r.name).or_default().push(r);
    }
    for (name, rs) in by_name {
        let distinct: HashSet<String> = rs.iter().map(|r| r.rust_path()).collect();
        if distinct.len() > 1 {
            let mut types: Vec<_> = distinct.into_iter().collect();
            types.sort();
            problems.push(format!(
                "wire name `{name}` is claimed by {}: a receiver could not tell them apart; pin distinct names with `name = \"...\"`",
                types.join(" and ")
            ));
        }
    }
}

/// Problems among the handlers a service runs.
pub(crate) fn check_handlers(
    handlers: &[&'static HandlerRoute],
    states: &HashSet<TypeId>,
    problems: &mut Vec<String>,
) {
    let mut commands: HashMap<&str, Vec<&HandlerRoute>> = HashMap::new();
    for h in handlers {
        if h.kind == MessageKind::Command {
            commands.entry(h.message).or_default().push(h);
            if let Some(q) = h.queue {
                problems.push(format!(
                    "handler {} sets `queue = \"{q}\"`, but it handles the command {}, whose queue is fixed by its #[command] (`{}`); remove the argument",
                    h.location(), h.message, h.destination
                ));
            }
        }
        if let (MessageKind::Event, Some(q)) = (h.kind, h.queue) {
            let queue_fifo = q.ends_with(".fifo");
            if h.fifo && !queue_fifo {
                problems.push(format!(
                    "handler {} subscribes standard queue `{q}` to FIFO topic `{}`; SNS delivers a FIFO topic only to FIFO queues: name the queue `{q}.fifo`",
                    h.location(), h.destination
                ));
            } else if !h.fifo && queue_fifo {
                problems.push(format!(
                    "handler {} subscribes FIFO queue `{q}` to standard topic `{}`; SNS delivers a standard topic only to standard queues: drop the `.fifo` suffix",
                    h.location(), h.destination
                ));
            }
        }
        for s in h.states {
            if !states.contains(&(s.type_id)()) {
                problems.push(format!(
                    "handler {} takes `State<{}>`, but the runtime was not given one: add `.state(value)` to the builder",
                    h.location(),
                    (s.type_name)()
                ));
            }
        }
    }
    let mut dupes: Vec<_> = commands
        .into_iter()
        .filter(|(_, hs)| hs.len() > 1)
        .collect();
    dupes.sort_by_key(|(name, _)| *name);
    for (name, hs) in dupes {
        let mut locs: Vec<_> = hs.iter().map(|h| h.location()).collect();
        locs.sort();
        problems.push(format!(
            "command `{name}` has {} handlers: {}; a command is handled exactly once, so keep one (use an event for fan-out)",
            hs.len(),
            locs.join(", ")
        ));
    }
}
