//! Handler middleware: code that runs before and after every handler (or the handlers of
//! one message type) and may reject the message: validation, authorisation, audit logging,
//! tenant scoping.
//!
//! A middleware is a [`tower::Layer`] (re-exported as [`Layer`]) whose service takes a
//! [`Request`] and answers `Result<(), BoxError>`: the outcome of the handler, or of the
//! layers inside it. Register it on the builder:
//!
//! * [`Builder::layer`](crate::Builder::layer) wraps every handler of the service;
//! * [`Builder::layer_for::<M>`](crate::Builder::layer_for) wraps only the handlers of
//!   message type `M`, inside the layers of every handler.
//!
//! Layers run in the order they are added: the first one added is the outermost (its code
//! before the handler runs first, its code after the handler runs last), as with
//! `tower::ServiceBuilder`. (axum's `Router::layer` wraps what was added before, the other
//! way round.)
//!
//! [`from_fn`] turns an `async fn(Request, Next)` into a layer; any tower layer written for
//! a generic service (`tower::timeout::TimeoutLayer`, a `tower::ServiceBuilder` stack, one
//! of your own) fits too.
//!
//! # Outcomes
//!
//! A layer's error is judged like a handler's, by the delivery core:
//!
//! * [`Reject`](crate::Reject) (or an error type marked with
//!   [`Builder::permanent_error`](crate::Builder::permanent_error)) moves the message to the
//!   dead-letter queue at once with the reason `middleware rejected the message before
//!   <handler>: <error>`; the handler does not run.
//! * [`RetryAfter`](crate::RetryAfter) retries it after the delay asked for; any other error
//!   retries it after the backoff. Both spend a handler attempt, so a message a layer keeps
//!   refusing lands in the dead-letter queue after `max_receive_count` attempts.
//!
//! The handler's own failure reaches the layers as a [`HandlerFailed`] error; a layer that
//! passes it on unchanged (`?` or returning it) leaves its judgement as it would be without
//! middleware. Transactional handlers run inside the layers as any other.
//!
//! # Example
//!
//! ```
//! use sourceflow::middleware::{self, Next, Request};
//! use sourceflow::{command, handler, BoxError, Reject};
//!
//! #[command(queue = "doc-mw-orders")]
//! #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
//! pub struct CreateOrder {
//!     pub order_id: u64,
//!     pub quantity: u32,
//! }
//!
//! #[handler]
//! async fn create_order(cmd: CreateOrder) -> sourceflow::Result<()> {
//!     println!("order {} for {}", cmd.order_id, cmd.quantity);
//!     Ok(())
//! }
//!
//! /// Refuses orders of nothing: to the dead-letter queue, the handler never sees them.
//! async fn validate(req: Request, next: Next) -> Result<(), BoxError> {
//!     if let Some(cmd) = req.message::<CreateOrder>() {
//!         if cmd.quantity == 0 {
//!             return Err(Reject::new("quantity must be at least 1").into());
//!         }
//!     }
//!     next.run(req).await
//! }
//!
//! /// Needs an `authorization` header on every message.
//! async fn authorise(req: Request, next: Next) -> Result<(), BoxError> {
//!     match req.header("authorization") {
//!         Some("Bearer let-me-in") => next.run(req).await,
//!         _ => Err(Reject::new("not authorised").into()),
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> sourceflow::Result<()> {
//! let app = sourceflow::builder()
//!     .service("doc-middleware")
//!     .handlers_in(module_path!())
//!     .layer(middleware::from_fn(authorise))
//!     .layer_for::<CreateOrder>(middleware::from_fn(validate))
//!     .start()
//!     .await?;
//! let options = sourceflow::SendOptions::new().header("authorization", "Bearer let-me-in");
//! app.send_with(CreateOrder { order_id: 1, quantity: 2 }, options).await?;
//! # tokio::time::sleep(std::time::Duration::from_millis(50)).await;
//! app.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Cost
//!
//! A service without layers runs its handlers exactly as before: no context is shared, no
//! future boxed. With layers, each message's context is put in an `Arc` (one allocation)
//! and each layer's service and future are boxed, as in axum.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use futures_util::future::BoxFuture;
use tower::util::BoxCloneSyncService;
use tower::ServiceExt;

use crate::context::Context;
use crate::envelope::AttributeValue;
use crate::error::{BoxError, InvokeError};
use crate::message::Message;
use crate::registry::HandlerRoute;

pub use tower::{Layer, Service};

/// What a middleware service is given: read access to the message about to be handled and
/// to the [`Context`] its handler gets. Cheap to clone.
#[derive(Clone)]
pub struct Request {
    ctx: Arc<Context>,
    handler: &'static HandlerRoute,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("handler", &self.handler.qualified_name())
            .field("context", &self.ctx)
            .finish()
    }
}

impl Request {
    /// The context the handler gets (its `send`/`raise` hold messages back like the
    /// handler's own: they go out only if the handler succeeds).
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// The message's wire name.
    pub fn wire_name(&self) -> &str {
        self.ctx.wire_name()
    }

    /// True when the message is an `M`.
    pub fn is<M: Message>(&self) -> bool {
        self.ctx.wire_name() == M::NAME
    }

    /// The message as an `M`, decoded from its payload; `None` when it is of another type,
    /// or its payload does not decode as `M` (the handler then dead-letters it with the
    /// decode error).
    pub fn message<M: Message>(&self) -> Option<M> {
        if !self.is::<M>() {
            return None;
        }
        self.ctx.__decode::<M>().ok()
    }

    /// The envelope's message id.
    pub fn message_id(&self) -> &str {
        self.ctx.message_id()
    }

    /// How many times the message has been received, this time included.
    pub fn receive_count(&self) -> u32 {
        self.ctx.receive_count()
    }

    /// A header the message arrived with (see [`Context::header`]).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.ctx.header(name)
    }

    /// A message attribute the message arrived with (see [`Context::attribute`]).
    pub fn attribute(&self, name: &str) -> Option<&AttributeValue> {
        self.ctx.attribute(name)
    }

    /// The name of the handler function about to run.
    pub fn handler(&self) -> &'static str {
        self.handler.name
    }

    /// The handler's module and name (`my_app::orders::create_order`).
    pub fn handler_path(&self) -> String {
        self.handler.qualified_name()
    }
}

/// The service at the heart of every stack, type-erased: the rest of the stack (the layers
/// inside this one, then the handler). Every layer is given one.
pub type HandlerService = BoxCloneSyncService<Request, (), BoxError>;

/// The error the handler's own failure reaches the layers as: its decode failure, its
/// error (the [`source`](std::error::Error::source)), or a missing state or transaction.
/// Passed on unchanged, it is judged as without middleware.
#[derive(Debug)]
pub struct HandlerFailed(InvokeError);

impl HandlerFailed {
    /// What the handler reported.
    pub fn error(&self) -> &InvokeError {
        &self.0
    }
}

impl fmt::Display for HandlerFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for HandlerFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.0 {
            InvokeError::Failed(e) => Some(e.as_ref()),
            _ => None,
        }
    }
}

/// The innermost service: runs the handler.
#[derive(Clone, Copy)]
struct Invoke;

impl Service<Request> for Invoke {
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<(), BoxError>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        Box::pin(async move {
            (req.handler.invoke)(&req.ctx)
                .await
                .map_err(|e| Box::new(HandlerFailed(e)) as BoxError)
        })
    }
}

/// The rest of the stack, as [`from_fn`] hands it to its function.
#[derive(Clone)]
pub struct Next(HandlerService);

impl fmt::Debug for Next {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Next")
    }
}

impl Next {
    /// Runs the rest of the stack (the inner layers, then the handler) and returns its
    /// outcome.
    pub async fn run(self, req: Request) -> Result<(), BoxError> {
        self.0.oneshot(req).await
    }
}

/// A layer from an async function `f(request, next)`: code before `next.run(request)`
/// runs before the handler, code after it after; an error returned without calling it
/// rejects the message (see the [module docs](self)).
pub fn from_fn<F, Fut>(f: F) -> FromFnLayer<F>
where
    F: Fn(Request, Next) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    FromFnLayer { f }
}

/// The layer [`from_fn`] makes.
#[derive(Clone)]
pub struct FromFnLayer<F> {
    f: F,
}

impl<F> fmt::Debug for FromFnLayer<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FromFnLayer")
    }
}

impl<S, F, Fut> Layer<S> for FromFnLayer<F>
where
    S: Service<Request, Response = (), Error = BoxError> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    F: Fn(Request, Next) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    type Service = FromFn<F>;

    fn layer(&self, inner: S) -> FromFn<F> {
        FromFn {
            f: self.f.clone(),
            next: BoxCloneSyncService::new(inner),
        }
    }
}

/// The service of a [`FromFnLayer`].
#[derive(Clone)]
pub struct FromFn<F> {
    f: F,
    next: HandlerService,
}

impl<F> fmt::Debug for FromFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FromFn")
    }
}

impl<F, Fut> Service<Request> for FromFn<F>
where
    F: Fn(Request, Next) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<(), BoxError>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        Box::pin((self.f)(req, Next(self.next.clone())))
    }
}

/// A layer [`Builder::layer`](crate::Builder::layer) and
/// [`Builder::layer_for`](crate::Builder::layer_for) take: any [`tower::Layer`] over
/// [`HandlerService`] whose service takes a [`Request`], answers `()` and fails with an
/// error that converts into [`BoxError`]. Implemented for every such layer; not to be
/// implemented by hand.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a handler middleware layer",
    label = "not a `tower::Layer<HandlerService>` whose service handles a `middleware::Request`",
    note = "a handler layer is a `tower::Layer<sourceflow::middleware::HandlerService>` whose service is `Service<sourceflow::middleware::Request, Response = ()>` + Clone + Send + Sync, with an error that converts into `sourceflow::BoxError`",
    note = "`sourceflow::middleware::from_fn(f)` makes one from `async fn f(req: Request, next: Next) -> Result<(), BoxError>`"
)]
pub trait HandlerLayer: Send + Sync + 'static {
    /// Wraps `inner` (the rest of the stack) in this layer.
    fn wrap(&self, inner: HandlerService) -> HandlerService;
}

impl<L> HandlerLayer for L
where
    L: Layer<HandlerService> + Send + Sync + 'static,
    L::Service: Service<Request, Response = ()> + Clone + Send + Sync + 'static,
    <L::Service as Service<Request>>::Error: Into<BoxError> + 'static,
    <L::Service as Service<Request>>::Future: Send + 'static,
{
    fn wrap(&self, inner: HandlerService) -> HandlerService {
        BoxCloneSyncService::new(self.layer(inner).map_err(Into::into))
    }
}

/// Wraps a stack in one more layer.
type Wrap = Arc<dyn HandlerLayer>;

/// The layers a builder was given, in order.
#[derive(Clone, Default)]
pub(crate) struct Layers {
    /// For every handler.
    all: Vec<Wrap>,
    /// For the handlers of one wire name.
    by_type: Vec<(&'static str, Wrap)>,
}

impl fmt::Debug for Layers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Layers")
            .field("all", &self.all.len())
            .field("by_type", &self.by_type.len())
            .finish()
    }
}

impl Layers {
    /// Adds `layer` for every handler (`None`) or those of one wire name.
    pub(crate) fn push(&mut self, wire_name: Option<&'static str>, layer: impl HandlerLayer) {
        let wrap: Wrap = Arc::new(layer);
        match wire_name {
            None => self.all.push(wrap),
            Some(w) => self.by_type.push((w, wrap)),
        }
    }

    /// The stacks, built once per service; `None` without layers.
    pub(crate) fn build(&self) -> Option<Arc<Middleware>> {
        if self.all.is_empty() && self.by_type.is_empty() {
            return None;
        }
        // The first layer added is the outermost: wrap from the last one out.
        let stack = |own: &[&Wrap]| {
            let inner = own
                .iter()
                .rev()
                .fold(HandlerService::new(Invoke), |s, w| w.wrap(s));
            self.all.iter().rev().fold(inner, |s, w| w.wrap(s))
        };
        let mut by_type = HashMap::new();
        for (wire, _) in &self.by_type {
            by_type.entry(*wire).or_insert_with(|| {
                let own: Vec<&Wrap> = self
                    .by_type
                    .iter()
                    .filter(|(w, _)| w == wire)
                    .map(|(_, l)| l)
                    .collect();
                stack(&own)
            });
        }
        let all = (!self.all.is_empty()).then(|| stack(&[]));
        Some(Arc::new(Middleware { all, by_type }))
    }
}

/// The stacks of a service: one for every handler, one per type with layers of its own.
pub(crate) struct Middleware {
    all: Option<HandlerService>,
    by_type: HashMap<&'static str, HandlerService>,
}

impl Middleware {
    fn stack_for(&self, wire_name: &str) -> Option<&HandlerService> {
        self.by_type.get(wire_name).or(self.all.as_ref())
    }
}

/// The context of one message as the listener holds it: shared (in an `Arc`) only when
/// the service has layers, which keep the request past the call.
// The plain context stays where it was before middleware existed (in the stage's
// future); boxing it to even the variants out would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Invocation {
    Plain(Context),
    Shared(Arc<Context>),
}

impl Invocation {
    pub(crate) fn new(ctx: Context, middleware: Option<&Middleware>) -> Self {
        match middleware {
            None => Invocation::Plain(ctx),
            Some(_) => Invocation::Shared(Arc::new(ctx)),
        }
    }
}

impl Deref for Invocation {
    type Target = Context;

    fn deref(&self) -> &Context {
        match self {
            Invocation::Plain(c) => c,
            Invocation::Shared(c) => c,
        }
    }
}

/// Why a run through the stack did not succeed.
pub(crate) enum Failed {
    /// The handler failed (and the layers passed it on).
    Handler(InvokeError),
    /// A layer returned an error of its own.
    Layer(BoxError),
}

/// Runs handler `h` on the message, through its stack when it has one.
pub(crate) async fn call(
    middleware: Option<&Middleware>,
    h: &'static HandlerRoute,
    ctx: &Invocation,
) -> Result<(), Failed> {
    let (Some(stack), Invocation::Shared(shared)) =
        (middleware.and_then(|m| m.stack_for(h.message)), ctx)
    else {
        return (h.invoke)(ctx).await.map_err(Failed::Handler);
    };
    let req = Request {
        ctx: shared.clone(),
        handler: h,
    };
    match stack.clone().oneshot(req).await {
        Ok(()) => Ok(()),
        Err(e) => Err(match e.downcast::<HandlerFailed>() {
            Ok(f) => Failed::Handler(f.0),
            Err(e) => Failed::Layer(e),
        }),
    }
}
