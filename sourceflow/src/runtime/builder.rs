//! The builder: what a service is configured with, and starting it.

use std::any::{Any, TypeId};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::dispatch::Dispatcher;
use crate::encryption::{CacheLimits, KeyProvider};
use crate::error::Result;
use crate::idempotency::{self, IdempotencyStore};
use crate::listener::{Listener, ListenerConfig};
use crate::message::Message;
use crate::naming::Naming;
use crate::registry::{self, HandlerRoute, MessageRoute};
use crate::retry::RetryPolicy;
use crate::transport::Transport;

use super::handle::{sample_depths, HandleInner, ListenerInfo};
use super::plan::plan;
use super::*;

pub(super) type HandlerFilter = Box<dyn Fn(&HandlerRoute) -> bool + Send + Sync>;
pub(super) type QueryFilter = Box<dyn Fn(&registry::QueryRoute) -> bool + Send + Sync>;

/// Configures and starts a sourceflow service. Anything not set here is read from the
/// environment (see the README's configuration table), then defaulted.
///
/// ```no_run
/// # async fn demo() -> sourceflow::Result<()> {
/// #[derive(Clone)]
/// struct Db;
/// sourceflow::builder()
///     .service("orders")
///     .state(Db)
///     .concurrency(20)
///     .run()
///     .await
/// # }
/// ```
#[must_use]
#[derive(Default)]
pub struct Builder {
    pub(super) service: Option<String>,
    pub(super) transport: Option<Arc<dyn Transport>>,
    pub(super) prefix: Option<String>,
    pub(super) concurrency: Option<usize>,
    pub(super) max_receive_count: Option<u32>,
    pub(super) visibility_timeout: Option<Duration>,
    pub(super) shutdown_timeout: Option<Duration>,
    pub(super) receive_wait: Option<Duration>,
    pub(super) receive_linger: Option<Duration>,
    pub(super) retry: Option<RetryPolicy>,
    pub(super) infrastructure_retry: Option<RetryPolicy>,
    pub(super) redrive_limit: Option<u32>,
    pub(super) liveness_slack: Option<Duration>,
    pub(super) permanent: crate::outcome::PermanentErrors,
    pub(super) states: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    pub(super) filter: Option<HandlerFilter>,
    pub(super) query_filter: Option<QueryFilter>,
    pub(super) idempotency: Option<IdempotencyChoice>,
    pub(super) idempotency_ttl: Option<Duration>,
    pub(super) idempotency_ttl_by_type: HashMap<&'static str, Duration>,
    pub(super) idempotency_key_by_type: HashMap<&'static str, idempotency::KeyFn>,
    pub(super) meter: Option<opentelemetry::metrics::Meter>,
    pub(super) tracer: Option<opentelemetry::global::BoxedTracer>,
    pub(super) depth_sample: Option<Duration>,
    pub(super) key_provider: Option<Arc<dyn KeyProvider>>,
    pub(super) encrypt_all: Option<bool>,
    pub(super) key_cache: Option<CacheLimits>,
    /// Handler middleware ([`crate::middleware`]), in the order added.
    pub(super) middleware: crate::middleware::Layers,
    /// Header propagation and logging ([`crate::headers`]).
    pub(super) headers: crate::headers::Settings,
    /// The longest delay asked of the broker (test only; default SQS's 15 minutes).
    pub(super) native_delay_cap: Option<Duration>,
    /// The outbox relay: `None` the default settings, `Some(None)` off.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub(super) relay: Option<Option<crate::outbox::RelaySettings>>,
    /// Large messages through an object store ([`crate::claim_check`]).
    pub(super) claim_check: Option<crate::claim_check::ClaimCheck>,
    /// Inline compression without a bucket.
    pub(super) compression: Option<crate::claim_check::Compression>,
}

/// A service's parts, built and not started (see [`Builder::assemble`]).
pub(crate) struct Assembled {
    pub(super) r: super::config::Resolved,
    pub(crate) topology: crate::topology::Topology,
    pub(crate) dispatcher: Arc<Dispatcher>,
    /// One per consumed queue.
    pub(crate) listeners: Vec<Arc<Listener>>,
    /// Stops the listeners (and what waits inside their stages).
    pub(crate) stop: CancellationToken,
}

impl Assembled {
    /// Handler runs in flight per listener.
    #[cfg_attr(not(feature = "lambda"), allow(dead_code))]
    pub(crate) fn concurrency(&self) -> usize {
        self.r.concurrency
    }
}

pub(super) enum IdempotencyChoice {
    Off,
    Store(Arc<dyn IdempotencyStore>),
    /// A SQL store on the application's pool, opened (migrated) at start.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    Pool(crate::tx::SqlPool),
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("service", &self.service)
            .field("prefix", &self.prefix)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

/// A new [`Builder`].
pub fn builder() -> Builder {
    Builder::default()
}

/// Runs a service configured from the environment until SIGINT or SIGTERM, then drains.
///
/// ```no_run
/// #[tokio::main]
/// async fn main() -> sourceflow::Result<()> {
///     sourceflow::run().await
/// }
/// ```
pub async fn run() -> Result<()> {
    builder().run().await
}

impl Builder {
    /// The service name (default: `SOURCEFLOW_SERVICE`, else the binary's name). Instances
    /// with one name compete for messages; each name gets every event once.
    pub fn service(mut self, name: impl Into<String>) -> Self {
        self.service = Some(name.into());
        self
    }

    /// The transport (default: `SOURCEFLOW_TRANSPORT`, else the embedded memory transport).
    pub fn transport(mut self, transport: impl Transport) -> Self {
        self.transport = Some(Arc::new(transport));
        self
    }

    /// The transport, already shared.
    pub fn transport_arc(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// Resource name prefix for an environment: `dev` turns `orders.fifo` into
    /// `dev-orders.fifo` (default: `SOURCEFLOW_PREFIX`, else none).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// Handler runs in flight per listener (default: `SOURCEFLOW_CONCURRENCY`, else 10).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = Some(n);
        self
    }

    /// Handler attempts after which a message moves to the dead-letter queue, with the
    /// last error as the reason (default: `SOURCEFLOW_MAX_RECEIVE_COUNT`, else 5). Only
    /// attempts that reached a handler count: receives handed back after an
    /// infrastructure fault, or that never reached one, do not.
    pub fn max_receive_count(mut self, n: u32) -> Self {
        self.max_receive_count = Some(n);
        self
    }

    /// Visibility timeout of provisioned queues (default:
    /// `SOURCEFLOW_VISIBILITY_TIMEOUT_SECS`, else 30 s).
    pub fn visibility_timeout(mut self, d: Duration) -> Self {
        self.visibility_timeout = Some(d);
        self
    }

    /// Time in-flight handlers get to finish on shutdown (default:
    /// `SOURCEFLOW_SHUTDOWN_TIMEOUT_SECS`, else 30 s).
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.shutdown_timeout = Some(d);
        self
    }

    /// Long-poll wait of each receive (default 20 s).
    pub fn receive_wait(mut self, d: Duration) -> Self {
        self.receive_wait = Some(d);
        self
    }

    /// Longest pause the pollers take under load before a receive, so that it returns a
    /// fuller batch (default: the transport's — 50 ms on AWS, where each receive is a
    /// billed request; none on the embedded broker). Only a receive that found a partial
    /// batch waiting causes a pause; an idle or lightly loaded service sees none.
    /// `Duration::ZERO` turns pacing off.
    pub fn receive_linger(mut self, d: Duration) -> Self {
        self.receive_linger = Some(d);
        self
    }

    /// **Test only.** The longest delay sourceflow asks the broker for (default, and at
    /// most, SQS's 15 minutes; at least 1 s). A message due later is sent with this delay
    /// and held back again by the listener until due ([`crate::schedule`]): lowering it
    /// lets a test see that loop in seconds instead of hours. A production service has no
    /// reason to set it — every hold-back costs a send and a delete.
    pub fn native_delay_cap(mut self, cap: Duration) -> Self {
        self.native_delay_cap = Some(cap);
        self
    }

    /// Backoff between attempts of a failing handler (default: 1 s doubling to 5 min;
    /// `SOURCEFLOW_RETRY_BASE_MS`, `SOURCEFLOW_RETRY_MAX_MS`).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Backoff of a message handed back after an infrastructure fault (the idempotency
    /// store, the broker or a dispatch failed), paced by how often it came back so
    /// (default: 500 ms doubling to 30 s; `SOURCEFLOW_INFRA_RETRY_BASE_MS`,
    /// `SOURCEFLOW_INFRA_RETRY_MAX_MS`). Such returns spend none of the handler's attempts.
    pub fn infrastructure_retry(mut self, policy: RetryPolicy) -> Self {
        self.infrastructure_retry = Some(policy);
        self
    }

    /// The `maxReceiveCount` of the queues' redrive policy: the broker's own safety net,
    /// which moves a message to the dead-letter queue without a reason (default:
    /// `SOURCEFLOW_REDRIVE_LIMIT`, else ten times the handler attempts, at least 100). It
    /// must be above [`max_receive_count`](Self::max_receive_count), so that sourceflow
    /// always dead-letters first, with the reason.
    pub fn redrive_limit(mut self, receives: u32) -> Self {
        self.redrive_limit = Some(receives);
        self
    }

    /// How long past one long poll a listener may go without a poll — or, while all its
    /// handler slots are taken, without a heartbeat — before health calls it stuck
    /// (default 30 s).
    pub fn liveness_slack(mut self, slack: Duration) -> Self {
        self.liveness_slack = Some(slack);
        self
    }

    /// Treats handler errors of type `E` (anywhere in the error's source chain) as
    /// permanent: the message goes to the dead-letter queue at once, like
    /// [`Reject`](crate::Reject), instead of being retried.
    ///
    /// ```
    /// #[derive(Debug, thiserror::Error)]
    /// #[error("card expired")]
    /// struct CardExpired;
    ///
    /// let builder = sourceflow::builder().permanent_error::<CardExpired>();
    /// ```
    pub fn permanent_error<E: std::error::Error + 'static>(mut self) -> Self {
        self.permanent.add::<E>();
        self
    }

    /// Shared state for handlers that take `State<T>`; one value per type.
    pub fn state<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.states.insert(TypeId::of::<T>(), Box::new(value));
        self
    }

    /// The idempotency store (default: `SOURCEFLOW_IDEMPOTENCY`, else the in-memory store).
    /// See [`idempotency`](crate::idempotency).
    pub fn idempotency(mut self, store: impl IdempotencyStore) -> Self {
        self.idempotency = Some(IdempotencyChoice::Store(Arc::new(store)));
        self
    }

    /// The idempotency store, already shared (e.g. by several services in one process).
    pub fn idempotency_arc(mut self, store: Arc<dyn IdempotencyStore>) -> Self {
        self.idempotency = Some(IdempotencyChoice::Store(store));
        self
    }

    /// Keeps the idempotency records in the application's PostgreSQL database, on its
    /// pool: transactional handlers (`&mut Tx<Postgres>`, see [`crate::tx`]) then run on
    /// that pool, in the same database as the rest of the application's data. The
    /// embedded migrations run at start, in their own migrations table.
    #[cfg(feature = "postgres")]
    pub fn postgres(mut self, pool: sqlx::PgPool) -> Self {
        self.idempotency = Some(IdempotencyChoice::Pool(crate::tx::SqlPool::Postgres(pool)));
        self
    }

    /// Keeps the idempotency records in the application's SQLite database, on its pool:
    /// transactional handlers (`&mut Tx<Sqlite>`, see [`crate::tx`]) then run on that
    /// pool. Open it in WAL mode with a busy timeout, as
    /// [`SqliteIdempotencyStore::connect`](crate::idempotency::SqliteIdempotencyStore::connect)
    /// does. The embedded migrations run at start.
    #[cfg(feature = "sqlite")]
    pub fn sqlite(mut self, pool: sqlx::SqlitePool) -> Self {
        self.idempotency = Some(IdempotencyChoice::Pool(crate::tx::SqlPool::Sqlite(pool)));
        self
    }

    /// How the relay of the transactional outbox ([`crate::outbox`]) works. A service whose
    /// idempotency store is on PostgreSQL or SQLite runs one by default.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub fn outbox_relay(mut self, settings: crate::outbox::RelaySettings) -> Self {
        self.relay = Some(Some(settings));
        self
    }

    /// Runs no outbox relay in this service (another service on the database relays).
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub fn without_outbox_relay(mut self) -> Self {
        self.relay = Some(None);
        self
    }

    /// Turns idempotent processing off (`SOURCEFLOW_IDEMPOTENCY=off`): every delivery runs
    /// the handlers.
    pub fn without_idempotency(mut self) -> Self {
        self.idempotency = Some(IdempotencyChoice::Off);
        self
    }

    /// How long completed records are kept (default 24 h;
    /// `SOURCEFLOW_IDEMPOTENCY_TTL_SECS`).
    pub fn idempotency_ttl(mut self, ttl: Duration) -> Self {
        self.idempotency_ttl = Some(ttl);
        self
    }

    /// How long completed records of message type `M` are kept.
    pub fn idempotency_ttl_for<M: Message>(mut self, ttl: Duration) -> Self {
        self.idempotency_ttl_by_type.insert(M::NAME, ttl);
        self
    }

    /// Keys the idempotency of message type `M` by a business key instead of the message
    /// id: messages with equal keys are one operation, whatever their ids. A second one with
    /// the same payload is acknowledged as a duplicate; with another payload it goes to the
    /// dead-letter queue (the key was reused for something else).
    ///
    /// ```
    /// # #[sourceflow::command(queue = "doc-payments", name = "doc.CapturePayment.v1")]
    /// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
    /// # struct CapturePayment { payment_id: String, cents: u64 }
    /// let builder = sourceflow::builder()
    ///     .idempotency_key_for::<CapturePayment, _>(|c| c.payment_id.clone());
    /// ```
    pub fn idempotency_key_for<M, K>(
        mut self,
        key: impl Fn(&M) -> K + Send + Sync + 'static,
    ) -> Self
    where
        M: Message,
        K: std::fmt::Display,
    {
        let f: idempotency::KeyFn = Arc::new(move |payload: &str| {
            crate::payload::decode::<M>(payload).map(|m| key(&m).to_string())
        });
        self.idempotency_key_by_type.insert(M::NAME, f);
        self
    }

    /// Records metrics through this meter provider instead of the global one (see
    /// [`telemetry`](crate::telemetry) for the instruments).
    pub fn meter_provider(
        mut self,
        provider: &(impl opentelemetry::metrics::MeterProvider + ?Sized),
    ) -> Self {
        self.meter = Some(provider.meter("sourceflow"));
        self
    }

    /// Makes sourceflow's spans (`sourceflow.dispatch`, `.process`, `.handler`, `.query`:
    /// see [`telemetry`](crate::telemetry)) with the OpenTelemetry API directly, through a
    /// tracer of this provider, instead of as `tracing` spans for an OpenTelemetry layer to
    /// export. The spans, their parents and attributes are the same; they cost less than
    /// half of what the same spans cost through `tracing-opentelemetry` (the throughput
    /// benchmark's two telemetry floors, in the README).
    ///
    /// With it, sourceflow makes no `tracing` spans of its own, so none is exported twice:
    /// its log events are still `tracing` events, without a message span around them. A
    /// span's OpenTelemetry context is attached while its work runs, so a handler's sends
    /// continue the trace, and spans the handler makes — with the OpenTelemetry API, or as
    /// `tracing` spans through a `tracing-opentelemetry` layer — are children of its
    /// `sourceflow.handler` span.
    ///
    /// ```
    /// # async fn example() -> sourceflow::Result<()> {
    /// let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    /// sourceflow::builder()
    ///     .service("orders")
    ///     .tracer_provider(&provider)
    ///     .run()
    ///     .await
    /// # }
    /// ```
    pub fn tracer_provider<P>(mut self, provider: &P) -> Self
    where
        P: opentelemetry::trace::TracerProvider + ?Sized,
        P::Tracer: Send + Sync + 'static,
        <P::Tracer as opentelemetry::trace::Tracer>::Span: Send + Sync + 'static,
    {
        let tracer = provider.tracer("sourceflow");
        self.tracer = Some(opentelemetry::global::BoxedTracer::new(Box::new(tracer)));
        self
    }

    /// How often queue and dead-letter queue depths are sampled for the
    /// `sourceflow.queue.depth` gauge (default: `SOURCEFLOW_DEPTH_SAMPLE_SECS`, else 30 s;
    /// zero turns sampling off).
    pub fn depth_sample_interval(mut self, every: Duration) -> Self {
        self.depth_sample = Some(every);
        self
    }

    /// The key provider for payload encryption (default: `SOURCEFLOW_LOCAL_KEY` for a local
    /// master key; on the embedded transport, a random key of this process). See
    /// [`encryption`](crate::encryption).
    pub fn key_provider(mut self, provider: impl KeyProvider) -> Self {
        self.key_provider = Some(Arc::new(provider));
        self
    }

    /// The key provider, already shared.
    pub fn key_provider_arc(mut self, provider: Arc<dyn KeyProvider>) -> Self {
        self.key_provider = Some(provider);
        self
    }

    /// Stores the payload of every message too large for its destination (SQS 1 MiB, SNS
    /// 256 KiB, or the claim check's lower threshold) in a bucket, and sends a pointer
    /// (default: `SOURCEFLOW_CLAIM_CHECK_BUCKET` and the other `SOURCEFLOW_CLAIM_CHECK_*`
    /// variables, else off: such messages are refused at the call). See
    /// [`claim_check`](crate::claim_check).
    pub fn claim_check(mut self, settings: crate::claim_check::ClaimCheck) -> Self {
        self.claim_check = Some(settings);
        self
    }

    /// Compresses (gzip) payloads above a size, inline, without a bucket (default:
    /// `SOURCEFLOW_COMPRESS_ABOVE_BYTES`, else off; with a claim check, its
    /// `compress_above` wins).
    pub fn compression(mut self, compression: crate::claim_check::Compression) -> Self {
        self.compression = Some(compression);
        self
    }

    /// Encrypts every message type, not only those declared with `encrypt` (default:
    /// `SOURCEFLOW_ENCRYPT_ALL`, else off).
    pub fn encrypt_all(mut self, on: bool) -> Self {
        self.encrypt_all = Some(on);
        self
    }

    /// Limits of the data-key caches (default: 5 min, 100,000 messages, 1 GiB per key;
    /// [`CacheLimits::disabled`] turns caching off).
    pub fn key_cache(mut self, limits: CacheLimits) -> Self {
        self.key_cache = Some(limits);
        self
    }

    /// Runs only the handlers for which `keep` is true (default: every handler linked into
    /// the binary). Useful to run several services from one binary, and in tests. The
    /// predicate sees message handlers only: with it, the service answers no query unless
    /// [`query_handlers`](Self::query_handlers) selects query handlers too.
    pub fn handlers(
        mut self,
        keep: impl Fn(&HandlerRoute) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.filter = Some(Box::new(keep));
        self
    }

    /// Runs only the handlers defined in modules whose path starts with `prefix`: message
    /// handlers and query handlers alike.
    pub fn handlers_in(self, prefix: &'static str) -> Self {
        let within = move |module: &str| {
            module == prefix
                || module
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with("::"))
        };
        self.handlers(move |h| within(h.module_path))
            .query_handlers(move |q| within(q.module_path))
    }

    /// Answers queries only with the query handlers for which `keep` is true (default:
    /// every query handler linked into the binary, or none once
    /// [`handlers`](Self::handlers) has selected a subset of the message handlers;
    /// [`handlers_in`](Self::handlers_in) selects both). See [`query`](mod@crate::query).
    pub fn query_handlers(
        mut self,
        keep: impl Fn(&registry::QueryRoute) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.query_filter = Some(Box::new(keep));
        self
    }

    /// Works out what the service needs and runs — the topology with its settings and
    /// ownership, the listeners and their handlers — and runs every startup check, without
    /// contacting anything. See [`ServicePlan`](crate::ServicePlan).
    pub async fn plan(self) -> Result<super::ServicePlan> {
        let r = self.resolve_offline().await?;
        let messages: Vec<&'static MessageRoute> = registry::message_routes().collect();
        let planned = plan(&r, &messages)?;
        Ok(super::ServicePlan::new(&r, messages, planned))
    }

    /// The plan and the transport the service would run on, without provisioning anything
    /// or starting a listener: for the operator commands that read the broker (`validate`,
    /// `prune`, `dlq`). Only the transport is built (no idempotency store, no key provider).
    #[cfg_attr(not(feature = "cli"), allow(dead_code))]
    pub(crate) async fn plan_and_transport(
        mut self,
    ) -> Result<(super::ServicePlan, Arc<dyn Transport>, bool)> {
        let given = self.transport.take();
        let explicit = given.is_some();
        let plan = self.plan().await?;
        let transport = super::config::resolve_transport(given).await?;
        Ok((plan, transport, explicit))
    }

    /// Wraps every handler of the service in a middleware layer ([`crate::middleware`]):
    /// a [`tower::Layer`] over [`HandlerService`](crate::middleware::HandlerService) (see
    /// [`HandlerLayer`](crate::middleware::HandlerLayer)), such as one made with [`middleware::from_fn`](crate::middleware::from_fn). The first
    /// layer added is the outermost; layers for every handler wrap those of
    /// [`layer_for`](Self::layer_for).
    pub fn layer(mut self, layer: impl crate::middleware::HandlerLayer) -> Self {
        self.middleware.push(None, layer);
        self
    }

    /// Wraps the handlers of message type `M` only, inside the layers of every handler
    /// ([`layer`](Self::layer)); see [`crate::middleware`].
    pub fn layer_for<M: Message>(mut self, layer: impl crate::middleware::HandlerLayer) -> Self {
        self.middleware.push(Some(M::NAME), layer);
        self
    }

    /// Passes header `name` on ([`crate::headers`]): every message a handler sends or
    /// raises carries the value the handled message arrived with (unless the send sets it
    /// itself), so a tenant id flows through a whole saga.
    pub fn propagate_header(mut self, name: impl Into<String>) -> Self {
        let name = name.into().to_ascii_lowercase();
        if !self.headers.propagate.contains(&name) {
            self.headers.propagate.push(name);
        }
        self
    }

    /// Marks header `name` safe to log ([`crate::headers`]): its value is shown in the
    /// `sourceflow.headers` field of the `sourceflow.handler` span, and so on the log lines
    /// inside it. Headers not marked are never logged.
    pub fn log_header(mut self, name: impl Into<String>) -> Self {
        let name = name.into().to_ascii_lowercase();
        if !self.headers.safe.contains(&name) {
            self.headers.safe.push(name);
        }
        self
    }

    /// Checks the routes, provisions the topology and starts the listeners. Returns once
    /// everything listens.
    pub async fn start(self) -> Result<Handle> {
        let Assembled {
            r,
            topology,
            dispatcher,
            listeners: built,
            stop,
        } = self.assemble().await?;
        let mut tasks = Vec::new();
        let mut listeners = Vec::new();
        for listener in built {
            listeners.push(ListenerInfo {
                queue: listener.queue().to_string(),
                dead_letter_queue: listener.dead_letter_queue().to_string(),
                liveness: listener.liveness.clone(),
                bound: r.receive_wait + r.liveness_slack,
            });
            tasks.push(tokio::spawn(listener.run()));
        }
        if !r.depth_sample.is_zero() {
            tokio::spawn(sample_depths(
                r.transport.clone(),
                r.metrics.clone(),
                listeners
                    .iter()
                    .map(|l| (l.queue.clone(), l.dead_letter_queue.clone()))
                    .collect(),
                r.depth_sample,
                stop.clone(),
            ));
        }
        #[cfg(any(feature = "postgres", feature = "sqlite"))]
        let relay = spawn_relay(
            r.relay.clone(),
            r.idempotency.as_deref(),
            &dispatcher,
            &stop,
        );
        #[cfg(not(any(feature = "postgres", feature = "sqlite")))]
        let relay = None;
        Ok(Handle {
            inner: Arc::new(HandleInner {
                relay: Mutex::new(relay),
                dispatcher,
                topology,
                naming: r.naming,
                stop,
                listeners: Mutex::new(tasks),
                listener_info: listeners,
                cleanup: Mutex::new(
                    r.idempotency
                        .as_ref()
                        .filter(|i| !i.store.purges_itself())
                        .map(|i| {
                            idempotency::spawn_cleanup(
                                i.store.clone(),
                                idempotency::DEFAULT_CLEANUP_INTERVAL,
                                idempotency::DEFAULT_CLEANUP_BATCH,
                            )
                        }),
                ),
                idempotency: r.idempotency,
            }),
        })
    }

    /// Whether a transport was given (else it comes from the environment).
    #[cfg(feature = "lambda")]
    pub(crate) fn has_transport(&self) -> bool {
        self.transport.is_some()
    }

    /// Checks the routes, provisions the topology (as the transport's mode says) and
    /// builds the listeners, one per consumed queue, without starting them: what
    /// [`start`](Self::start) runs, and what `sourceflow::lambda` feeds with the records of
    /// each invocation.
    pub(crate) async fn assemble(mut self) -> Result<Assembled> {
        let middleware = std::mem::take(&mut self.middleware).build();
        let headers = std::mem::take(&mut self.headers);
        let delay_cap = self.native_delay_cap.unwrap_or(crate::transport::MAX_DELAY);
        let mut r = self.resolve().await?;
        let messages: Vec<&'static MessageRoute> = registry::message_routes().collect();
        let plan = plan(&r, &messages)?;
        let claim_settings = r.claim_settings()?;
        #[cfg(any(feature = "postgres", feature = "sqlite"))]
        let tx_pool = transaction_pool(&r)?;
        r.transport.provision(&plan.topology).await?;
        tracing::info!(
            service = %r.service,
            transport = r.transport.name(),
            queues = plan.topology.queues.len(),
            topics = plan.topology.topics.len(),
            subscriptions = plan.topology.subscriptions.len(),
            handlers = r.handlers.len(),
            "sourceflow provisioned"
        );
        let dispatcher = Dispatcher::new(
            r.transport.clone(),
            r.service.clone(),
            r.naming.clone(),
            plan.destinations,
            std::mem::take(&mut r.states),
            r.metrics.clone(),
            r.encryption.clone(),
        );
        let dispatcher = Arc::new(
            dispatcher
                .with_queries(plan.queries)
                .with_headers(headers)
                .with_delay_cap(delay_cap)
                .with_claim_check(claim_settings),
        );
        let known: Arc<HashSet<&'static str>> = Arc::new(messages.iter().map(|m| m.name).collect());
        let encrypted: Arc<HashSet<&'static str>> = Arc::new(
            messages
                .iter()
                .filter(|m| m.encrypt)
                .map(|m| m.name)
                .collect(),
        );
        let stop = CancellationToken::new();
        let mut listeners = Vec::new();
        for lp in plan.listeners {
            let names: Vec<_> = lp.handlers.values().flatten().map(|h| h.name).collect();
            tracing::info!(service = %r.service, queue = %lp.queue, fifo = lp.fifo, handlers = ?names, "listening");
            let listener = Listener::new(ListenerConfig {
                dispatcher: dispatcher.clone(),
                dead_letter_queue: Arc::from(Naming::dead_letter(&lp.queue).as_str()),
                queue: lp.queue,
                fifo: lp.fifo,
                handlers: lp.handlers,
                known: known.clone(),
                encrypted: encrypted.clone(),
                concurrency: r.concurrency,
                retry: r.retry,
                infrastructure_retry: r.infrastructure_retry,
                max_attempts: lp.max_attempts,
                visibility_timeout: lp.visibility_timeout,
                receive_wait: r.receive_wait,
                receive_linger: r.receive_linger,
                shutdown_timeout: r.shutdown_timeout,
                idempotency: r.idempotency.clone(),
                permanent: r.permanent.clone(),
                middleware: middleware.clone(),
                stop: stop.clone(),
                #[cfg(any(feature = "postgres", feature = "sqlite"))]
                tx_pool: tx_pool.clone(),
            });
            listeners.push(listener);
        }
        Ok(Assembled {
            r,
            topology: plan.topology,
            dispatcher,
            listeners,
            stop,
        })
    }

    /// Starts, runs until SIGINT or SIGTERM, then shuts down gracefully.
    pub async fn run(self) -> Result<()> {
        let handle = self.start().await?;
        #[cfg(feature = "health-http")]
        if let Some(addr) = super::config::env_var("SOURCEFLOW_HEALTH_ADDR") {
            let addr: std::net::SocketAddr = addr.parse().map_err(|_| {
                crate::Error::Config(format!(
                    "SOURCEFLOW_HEALTH_ADDR={addr:?} is not an address like 127.0.0.1:8080"
                ))
            })?;
            let h = handle.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::health::serve(h, addr).await {
                    tracing::error!(error = %e, "health endpoint failed");
                }
            });
        }
        shutdown_signal().await;
        tracing::info!(service = %handle.service(), "shutdown signal received; draining");
        handle.shutdown().await?;
        Ok(())
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The pool transactional handlers' transactions are opened on: the SQL idempotency
/// store's, which must be on the database the handlers' `Tx<DB>` names.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
fn transaction_pool(r: &super::config::Resolved) -> Result<Option<crate::tx::SqlPool>> {
    let Some(first) = r.handlers.iter().find(|h| h.tx.is_some()) else {
        return Ok(None);
    };
    let Some(wanted) = first.tx else {
        return Ok(None);
    };
    if let Some(other) = r
        .handlers
        .iter()
        .find(|h| h.tx.is_some_and(|k| k != wanted))
    {
        return Err(crate::Error::Config(format!(
            "handler `{}` takes `{}` and handler `{}` takes `{}`: the transactional handlers of a service share one database, the idempotency store's",
            first.qualified_name(),
            wanted.type_name(),
            other.qualified_name(),
            other.tx.map_or("", |k| k.type_name()),
        )));
    }
    let store = r.idempotency.as_ref().map(|i| &i.store);
    match store.and_then(|s| s.sql_pool()) {
        Some(pool) if pool.kind() == wanted => Ok(Some(pool)),
        _ => Err(crate::Error::Config(format!(
            "handler `{}` takes `{}`, whose transaction is opened on the idempotency store's database, and the store is {}: use the {} store (`SOURCEFLOW_IDEMPOTENCY={}`, or `builder().{}(pool)`)",
            first.qualified_name(),
            wanted.type_name(),
            store.map_or("off".to_string(), |s| format!("`{}`", s.name())),
            wanted.store(),
            match wanted {
                crate::tx::TxKind::Postgres => "postgres://…",
                crate::tx::TxKind::Sqlite => "sqlite://…?mode=rwc",
            },
            wanted.store(),
        ))),
    }
}

/// Starts the outbox relay when the store is a SQL one and the relay is not off.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
fn spawn_relay(
    settings: Option<crate::outbox::RelaySettings>,
    idempotency: Option<&idempotency::Settings>,
    dispatcher: &Arc<Dispatcher>,
    stop: &CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let settings = settings?;
    let pool = idempotency?.store.sql_pool()?;
    let relay = crate::outbox::relay::Relay {
        pool,
        dispatcher: dispatcher.clone(),
        settings,
        stop: stop.clone(),
    };
    Some(tokio::spawn(relay.run()))
}
