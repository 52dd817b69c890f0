//! Queries: the read side of CQRS, answered in process.
//!
//! A query is a request for data, declared with [`#[query(response = ..)]`](macro@crate::query)
//! and answered by exactly one `#[handler]` that returns the response. Code outside handlers
//! asks with [`Handle::query`](crate::Handle::query), a handler with
//! [`Context::query`](crate::Context::query); both return `sourceflow::Result<Response>`.
//!
//! Queries are reads, so they never travel: no queue, topic or subscription is provisioned
//! for them, they appear in no topology, export, IAM policy or listener, and a query is not
//! retried, deduplicated or dead-lettered. The handler runs on the caller's task, with the
//! same `State<T>` values the message handlers get.
//!
//! ```
//! use sourceflow::{handler, query, State};
//! use std::collections::HashMap;
//! use std::sync::{Arc, Mutex};
//!
//! #[derive(Debug, Clone, PartialEq)]
//! pub struct OrderView {
//!     pub order_id: u64,
//!     pub status: String,
//! }
//!
//! /// The read model, filled by event handlers (not shown).
//! #[derive(Clone, Default)]
//! struct Orders(Arc<Mutex<HashMap<u64, OrderView>>>);
//!
//! #[query(response = Option<OrderView>)]
//! pub struct GetOrder {
//!     pub order_id: u64,
//! }
//!
//! #[handler]
//! async fn get_order(q: GetOrder, State(orders): State<Orders>) -> sourceflow::Result<Option<OrderView>> {
//!     Ok(orders.0.lock().unwrap().get(&q.order_id).cloned())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> sourceflow::Result<()> {
//! let orders = Orders::default();
//! orders.0.lock().unwrap().insert(7, OrderView { order_id: 7, status: "paid".into() });
//! let app = sourceflow::builder().service("doc-queries").state(orders).start().await?;
//!
//! let view = app.query(GetOrder { order_id: 7 }).await?;
//! assert_eq!(view.map(|v| v.status).as_deref(), Some("paid"));
//! assert_eq!(app.query(GetOrder { order_id: 8 }).await?, None);
//! app.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! **Rules**, checked where they can be:
//!
//! * A handler's response type is the query's: anything else does not compile, nor does a
//!   query handler that takes `&Context` or a transaction.
//! * One handler per query type among the handlers a service runs: two fail
//!   [`Builder::start`](crate::Builder::start) and [`Builder::plan`](crate::Builder::plan)
//!   with an [`Error::Topology`] naming both, as do `State<T>` arguments nobody gave.
//! * Which queries a program asks is not known to the builder, so a query that no handler
//!   of the service answers fails at the call with [`Error::NoQueryHandler`].
//! * By default a service answers with every query handler linked into the binary.
//!   [`Builder::handlers_in`](crate::Builder::handlers_in) selects query handlers by the
//!   same module prefix as message handlers, and
//!   [`Builder::query_handlers`](crate::Builder::query_handlers) by a predicate. A
//!   [`Builder::handlers`](crate::Builder::handlers) predicate sees message handlers only,
//!   so the subset it selects has no query handler unless `query_handlers` adds some: a
//!   send-only service (`handlers(|_| false)`) needs no query handler's state.
//! * An error the handler returns is the error of the call: a `sourceflow::Error` as it
//!   was, any other error as [`Error::Other`] (its message unchanged; downcast the source to
//!   get it back). A panic in the handler is [`Error::QueryPanicked`].
//!
//! Every query runs in a `sourceflow.query` span and is counted (see
//! [`telemetry`](crate::telemetry)).

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt;
use tracing::Instrument;

use crate::dispatch::Dispatcher;
use crate::error::{BoxError, Error, InvokeError, Result};
use crate::registry::QueryRoute;

/// A request answered in process by exactly one handler, with a [`Response`](Query::Response).
/// Implemented by `#[query(response = ..)]`; do not implement it by hand.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a sourceflow query",
    label = "not a #[query]",
    note = "declare it with `#[sourceflow::query(response = ..)]`; a #[handler] that returns a value answers a query, while command and event handlers return `()` or `Result<(), E>`"
)]
pub trait Query: Send + 'static {
    /// What the query's handler answers with.
    type Response: Send + 'static;
    /// The name spans, metrics and errors use (`name = ".."`, or the type's name).
    const NAME: &'static str;
}

/// The query handlers a service runs, by query type.
pub(crate) type QueryTable = HashMap<TypeId, &'static QueryRoute>;

/// What a query handler gets besides the query: the service's shared state.
#[doc(hidden)]
pub struct QueryScope {
    dispatcher: Arc<Dispatcher>,
}

impl QueryScope {
    /// Shared state of type `T`, if the runtime was given one.
    pub(crate) fn state<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.dispatcher.state::<T>()
    }
}

/// Answers `query` with the handler the service runs for it: in a `sourceflow.query` span,
/// counted and timed.
pub(crate) async fn ask<Q: crate::Query>(
    dispatcher: &Arc<Dispatcher>,
    query: Q,
) -> Result<Q::Response> {
    let Some(route) = dispatcher.query_route(TypeId::of::<Q>()) else {
        return Err(Error::NoQueryHandler(Q::NAME));
    };
    // Made with the OpenTelemetry API when the service gave a tracer provider, else as a
    // `tracing` span (see `crate::telemetry`).
    let direct = dispatcher.metrics().spans().map(|spans| {
        let attributes = [
            opentelemetry::KeyValue::new("sourceflow.query", Q::NAME),
            opentelemetry::KeyValue::new("sourceflow.handler", route.name),
        ];
        let kind = opentelemetry::trace::SpanKind::Internal;
        let parent = opentelemetry::Context::current();
        spans.start("sourceflow.query", kind, attributes, &parent)
    });
    let span = match direct {
        Some(_) => tracing::Span::none(),
        None => tracing::info_span!(
            "sourceflow.query",
            sourceflow.query = Q::NAME,
            sourceflow.handler = route.name,
            otel.status_code = tracing::field::Empty,
        ),
    };
    let scope = QueryScope {
        dispatcher: dispatcher.clone(),
    };
    let started = Instant::now();
    // Made in each branch as a temporary (a future moved from a local into another is
    // stored twice in this function's state machine).
    let instrumented = span.clone();
    let work = move || {
        AssertUnwindSafe((route.invoke)(scope, Box::new(query)))
            .catch_unwind()
            .instrument(instrumented)
    };
    let run = match &direct {
        Some(cx) => crate::telemetry::within(cx, work()).await,
        None => work().await,
    };
    let answer = match run {
        Ok(Ok(answer)) => answer.downcast::<Q::Response>().map(|a| *a).map_err(|_| {
            Error::Other(
                format!(
                    "the handler {} of query `{}` answered with another type than its response",
                    route.qualified_name(),
                    Q::NAME
                )
                .into(),
            )
        }),
        Ok(Err(e)) => Err(failure(e)),
        Err(panic) => Err(Error::QueryPanicked {
            query: Q::NAME,
            handler: route.qualified_name(),
            message: panic_message(&panic),
        }),
    };
    if answer.is_err() {
        span.record("otel.status_code", crate::telemetry::STATUS_ERROR);
    }
    if let Some(cx) = &direct {
        crate::telemetry::end(cx, answer.is_err());
    }
    dispatcher
        .metrics()
        .queried(Q::NAME, answer.is_ok(), started.elapsed());
    answer
}

fn panic_message(p: &Box<dyn Any + Send>) -> String {
    match (p.downcast_ref::<&str>(), p.downcast_ref::<String>()) {
        (Some(s), _) => (*s).to_string(),
        (_, Some(s)) => s.clone(),
        _ => "non-string panic payload".to_string(),
    }
}

/// The error of a failed query call: the handler's own, unwrapped when it is sourceflow's.
fn failure(e: InvokeError) -> Error {
    match e {
        InvokeError::Failed(e) => match e.downcast::<Error>() {
            Ok(e) => *e,
            Err(e) => Error::Other(e),
        },
        InvokeError::MissingState(ty) => Error::Config(format!(
            "a query handler takes `State<{ty}>`, but the runtime was not given one: add `.state(value)` to the builder"
        )),
        other => Error::Other(Box::new(other)),
    }
}

/// Support for the generated code of query handlers.
#[doc(hidden)]
pub mod support {
    use super::*;

    /// Fetches `State<T>` for a query handler argument.
    pub fn query_state<T: Clone + Send + Sync + 'static>(
        scope: &QueryScope,
    ) -> std::result::Result<crate::State<T>, InvokeError> {
        scope
            .state::<T>()
            .cloned()
            .map(crate::State)
            .ok_or(InvokeError::MissingState(std::any::type_name::<T>()))
    }

    /// The query a handler was asked, out of its box.
    pub fn take_query<Q: crate::Query>(
        query: Box<dyn Any + Send>,
    ) -> std::result::Result<Q, InvokeError> {
        query.downcast::<Q>().map(|q| *q).map_err(|_| {
            InvokeError::Failed(
                format!("a query handler of `{}` was given another type", Q::NAME).into(),
            )
        })
    }

    /// The answer of a query handler, boxed for the type-erased route.
    pub fn box_answer<R: Send + 'static>(answer: R) -> Box<dyn Any + Send> {
        Box::new(answer)
    }

    /// What a query handler may return: `Result<R, E>` with `R` the query's response and
    /// `E` convertible into a boxed error (including `sourceflow::Error` and `anyhow::Error`).
    #[diagnostic::on_unimplemented(
        message = "this query handler must return `Result<{R}, E>`, with the query's response type, not `{Self}`",
        label = "not the query's response",
        note = "`#[query(response = ..)]` names the type its handler answers with: return `sourceflow::Result<{R}>`, or `Result<{R}, E>` where `E` converts into `Box<dyn std::error::Error + Send + Sync>`; command and event handlers return `()` or `Result<(), E>`"
    )]
    pub trait IntoQueryResult<R> {
        /// Converts the handler's output.
        fn into_query_result(self) -> std::result::Result<R, InvokeError>;
    }

    impl<R, E: Into<BoxError>> IntoQueryResult<R> for std::result::Result<R, E> {
        fn into_query_result(self) -> std::result::Result<R, InvokeError> {
            self.map_err(|e| InvokeError::Failed(e.into()))
        }
    }
}
