//! # sourceflow
//!
//! Distributed command and event processing on AWS SQS and SNS, routed at compile time.
//!
//! Annotate message types with [`command`] or [`event`], write handlers as plain
//! `async fn`s marked [`handler`], and call [`run`]. The routes register themselves at
//! compile time; `run` checks them, provisions queues, topics, subscriptions and
//! dead-letter queues, and runs a listener per queue.
//!
//! ```
//! use sourceflow::{command, event, handler, Context};
//!
//! #[command(queue = "orders.fifo")]
//! #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
//! pub struct CreateOrder {
//!     #[entity_id]
//!     pub order_id: u64,
//!     #[sensitive]
//!     pub card_number: String,
//! }
//!
//! #[event(topic = "order-events")]
//! #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
//! pub struct OrderCreated {
//!     #[entity_id]
//!     pub order_id: u64,
//! }
//!
//! #[handler]
//! async fn create_order(cmd: CreateOrder, ctx: &Context) -> sourceflow::Result<()> {
//!     ctx.raise(OrderCreated { order_id: cmd.order_id }).await
//! }
//!
//! #[handler]
//! async fn project_order(evt: OrderCreated) -> sourceflow::Result<()> {
//!     println!("order {} created", evt.order_id);
//!     Ok(())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> sourceflow::Result<()> {
//! // `sourceflow::run().await` serves until SIGINT/SIGTERM; a web server uses the
//! // handle instead:
//! let app = sourceflow::builder().service("orders").start().await?;
//! app.send(CreateOrder { order_id: 1, card_number: "4111111111111111".into() }).await?;
//! app.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! A test starts the same builder with `sourceflow::testing::TestApp` (feature `testing`),
//! whose `send` returns once the handlers it woke, and everything they sent and raised,
//! have settled; see the README's "Testing your handlers".
//!
//! The `Debug` output of `CreateOrder` masks `card_number` (see [`sensitive`]).

#![warn(missing_docs)]

pub mod attribute;
pub mod claim_check;
#[cfg(feature = "cli")]
pub mod cli;
mod context;
mod dispatch;
pub mod encryption;
pub mod envelope;
mod error;
pub mod export;
mod failpoints;
pub mod filter;
pub mod headers;
pub mod health;
pub mod iam;
pub mod idempotency;
#[cfg(feature = "lambda")]
pub mod lambda;
mod listener;
mod message;
pub mod middleware;
pub mod naming;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub mod outbox;
mod outcome;
mod payload;
pub mod query;
pub mod redrive;
pub mod registry;
mod retry;
mod runtime;
pub mod schedule;
pub mod sensitive;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod topology;
pub mod transport;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub mod tx;

pub use attribute::{AttributeName, AttributeText, AttributeValue};
pub use claim_check::{ClaimCheck, Compression};
pub use context::{Context, State};
pub use error::{BoxError, Error, InvokeError, Result, TopologyProblems};
pub use listener::DrainReport;
pub use message::{Command, EntityId, Event, Message, MessageKind};
pub use outcome::{Reject, RetryAfter};
pub use query::Query;
pub use retry::RetryPolicy;
pub use runtime::{
    builder, run, Builder, Handle, ListenerSummary, SendOptions, ServicePlan, DEFAULT_CONCURRENCY,
    DEFAULT_MAX_RECEIVE_COUNT, DEFAULT_RECEIVE_WAIT, DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_VISIBILITY_TIMEOUT,
};
pub use sourceflow_macros::{command, event, handler, query};
pub use transport::memory::MemoryTransport;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub use tx::Tx;

/// The [`schemars`](https://docs.rs/schemars) crate (1.x) that sourceflow reads payload
/// schemas with: derive `sourceflow::schemars::JsonSchema` on a message type and the AsyncAPI
/// export describes its payload (see [`export`]). `#[command]` and `#[event]` point the
/// derive at this crate, so a service needs no schemars dependency of its own.
pub use schemars;

/// Support for the generated code. Not a public API: it may change in any release.
#[doc(hidden)]
pub mod __private {
    pub use crate::registry::{
        BoxFuture, HandlerRoute, MessageRoute, QueueOptions, Sse, StateRequirement, TxKind,
    };
    pub use inventory;

    pub use crate::query::support::{box_answer, query_state, take_query, IntoQueryResult};
    pub use crate::query::QueryScope;
    pub use crate::registry::{QueryInvoker, QueryRoute};

    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub use crate::tx::{give as give_tx, take as take_tx, TxDatabase};

    use crate::error::BoxError;
    pub use crate::error::InvokeError;
    use crate::{Context, State};

    /// The standalone JSON Schema (draft 7) of a message type that derives `JsonSchema`.
    pub fn schema_of<T: schemars::JsonSchema>() -> serde_json::Value {
        schemars::generate::SchemaSettings::draft07()
            .into_generator()
            .into_root_schema_for::<T>()
            .to_value()
    }

    /// Fetches `State<T>` for a handler argument.
    pub fn state<T: Clone + Send + Sync + 'static>(ctx: &Context) -> Result<State<T>, InvokeError> {
        ctx.state::<T>()
            .cloned()
            .map(State)
            .ok_or(InvokeError::MissingState(std::any::type_name::<T>()))
    }

    /// What a handler may return: `()` or `Result<(), E>` with `E` convertible into a
    /// boxed error (including `sourceflow::Error` and `anyhow::Error`).
    #[diagnostic::on_unimplemented(
        message = "a #[handler] must return `()` or `Result<(), E>`, not `{Self}`",
        label = "unsupported return type",
        note = "return `sourceflow::Result<()>`, or `Result<(), E>` where `E` converts into `Box<dyn std::error::Error + Send + Sync>`"
    )]
    pub trait IntoHandlerResult {
        /// Converts the handler's output.
        fn into_handler_result(self) -> Result<(), InvokeError>;
    }

    impl IntoHandlerResult for () {
        fn into_handler_result(self) -> Result<(), InvokeError> {
            Ok(())
        }
    }

    impl<E: Into<BoxError>> IntoHandlerResult for Result<(), E> {
        fn into_handler_result(self) -> Result<(), InvokeError> {
            self.map_err(|e| InvokeError::Failed(e.into()))
        }
    }
}
