//! Starting a service: configuration, the startup checks, provisioning, listeners, and the
//! [`Handle`] for code outside handlers.

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::dispatch::Dispatcher;
use crate::encryption::{self, CacheLimits, Encryptor, KeyProvider, LocalKeyProvider};
use crate::envelope::SendMeta;
use crate::error::{Error, Result, TopologyProblems};
use crate::health::{HealthCheck, HealthReport, Liveness, Status};
use crate::idempotency::{
    self, IdempotencyStatsSnapshot, IdempotencyStore, MemoryIdempotencyStore,
};
use crate::listener::{DrainReport, Listener};
use crate::message::{Command, Event, Message, MessageKind};
use crate::naming::{check_queue_name, sanitize_service, Naming};
use crate::registry::{self, HandlerRoute, MessageRoute};
use crate::retry::RetryPolicy;
use crate::telemetry::{self, Metrics};
use crate::transport::memory::MemoryTransport;
use crate::transport::{
    DeadLetterSpec, QueueSpec, SubscriptionSpec, TopicSpec, Topology, Transport,
};

/// Default number of handler runs in flight per listener.
pub const DEFAULT_CONCURRENCY: usize = 10;
/// Default receives before a message goes to the dead-letter queue.
pub const DEFAULT_MAX_RECEIVE_COUNT: u32 = 5;
/// Default visibility timeout of provisioned queues.
pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time in-flight handlers get to finish on shutdown.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default interval of queue depth sampling.
pub const DEFAULT_DEPTH_SAMPLE: Duration = Duration::from_secs(30);
/// Default long-poll wait of a receive.
pub const DEFAULT_RECEIVE_WAIT: Duration = Duration::from_secs(20);

type HandlerFilter = Box<dyn Fn(&HandlerRoute) -> bool + Send + Sync>;

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
    service: Option<String>,
    transport: Option<Arc<dyn Transport>>,
    prefix: Option<String>,
    concurrency: Option<usize>,
    max_receive_count: Option<u32>,
    visibility_timeout: Option<Duration>,
    shutdown_timeout: Option<Duration>,
    receive_wait: Option<Duration>,
    retry: Option<RetryPolicy>,
    states: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    filter: Option<HandlerFilter>,
    idempotency: Option<IdempotencyChoice>,
    idempotency_ttl: Option<Duration>,
    idempotency_ttl_by_type: HashMap<&'static str, Duration>,
    idempotency_key_by_type: HashMap<&'static str, idempotency::KeyFn>,
    meter: Option<opentelemetry::metrics::Meter>,
    depth_sample: Option<Duration>,
    key_provider: Option<Arc<dyn KeyProvider>>,
    encrypt_all: Option<bool>,
    key_cache: Option<CacheLimits>,
}

enum IdempotencyChoice {
    Off,
    Store(Arc<dyn IdempotencyStore>),
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

/// The random master key of this process, for the embedded transport's default.
fn process_key() -> Arc<dyn KeyProvider> {
    static KEY: std::sync::OnceLock<Arc<LocalKeyProvider>> = std::sync::OnceLock::new();
    KEY.get_or_init(|| Arc::new(LocalKeyProvider::random()))
        .clone()
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn env_parse<T: std::str::FromStr>(name: &str) -> Result<Option<T>> {
    match env_var(name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| Error::Config(format!("{name}={v:?} is not a valid value"))),
    }
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

    /// Receives after which a message moves to the dead-letter queue (default:
    /// `SOURCEFLOW_MAX_RECEIVE_COUNT`, else 5).
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

    /// Backoff between attempts of a failing handler (default: 1 s doubling to 5 min;
    /// `SOURCEFLOW_RETRY_BASE_MS`, `SOURCEFLOW_RETRY_MAX_MS`).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
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
            serde_json::from_str::<M>(payload)
                .map(|m| key(&m).to_string())
                .map_err(|e| e.to_string())
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
    /// the binary). Useful to run several services from one binary, and in tests.
    pub fn handlers(
        mut self,
        keep: impl Fn(&HandlerRoute) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.filter = Some(Box::new(keep));
        self
    }

    /// Runs only the handlers defined in modules whose path starts with `prefix`.
    pub fn handlers_in(self, prefix: &'static str) -> Self {
        self.handlers(move |h| {
            h.module_path == prefix
                || h.module_path
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with("::"))
        })
    }

    async fn resolve(self) -> Result<Resolved> {
        let service = match self.service.or_else(|| env_var("SOURCEFLOW_SERVICE")) {
            Some(s) => {
                if sanitize_service(&s) != s {
                    return Err(Error::Config(format!(
                        "service name `{s}` may only contain ASCII letters, digits, `-` and `_`"
                    )));
                }
                s
            }
            None => std::env::current_exe()
                .ok()
                .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                .map(|s| sanitize_service(&s))
                .unwrap_or_else(|| "sourceflow".to_string()),
        };
        let transport: Arc<dyn Transport> = match self.transport {
            Some(t) => t,
            None => match env_var("SOURCEFLOW_TRANSPORT").as_deref() {
                None | Some("memory") => Arc::new(MemoryTransport::new()),
                #[cfg(feature = "aws")]
                Some("aws") => Arc::new(crate::transport::aws::AwsTransport::from_env().await?),
                Some(other) => {
                    return Err(Error::Config(format!(
                        "SOURCEFLOW_TRANSPORT={other:?} is not a transport this build has; use `memory`{}",
                        if cfg!(feature = "aws") { " or `aws`" } else { " (or build with the `aws` feature)" }
                    )))
                }
            },
        };
        let prefix = self
            .prefix
            .or_else(|| env_var("SOURCEFLOW_PREFIX"))
            .unwrap_or_default();
        if prefix
            .chars()
            .any(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            return Err(Error::Config(format!(
                "prefix `{prefix}` may only contain ASCII letters, digits, `-` and `_`"
            )));
        }
        let concurrency = match self.concurrency {
            Some(n) => n,
            None => env_parse("SOURCEFLOW_CONCURRENCY")?.unwrap_or(DEFAULT_CONCURRENCY),
        };
        if concurrency == 0 {
            return Err(Error::Config("concurrency must be at least 1".into()));
        }
        let max_receive_count = match self.max_receive_count {
            Some(n) => n,
            None => env_parse("SOURCEFLOW_MAX_RECEIVE_COUNT")?.unwrap_or(DEFAULT_MAX_RECEIVE_COUNT),
        };
        if !(1..=1000).contains(&max_receive_count) {
            return Err(Error::Config(
                "max receive count must be between 1 and 1000 (the SQS range)".into(),
            ));
        }
        let visibility_timeout = match self.visibility_timeout {
            Some(d) => d,
            None => env_parse::<u64>("SOURCEFLOW_VISIBILITY_TIMEOUT_SECS")?
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_VISIBILITY_TIMEOUT),
        };
        let shutdown_timeout = match self.shutdown_timeout {
            Some(d) => d,
            None => env_parse::<u64>("SOURCEFLOW_SHUTDOWN_TIMEOUT_SECS")?
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT),
        };
        let retry = match self.retry {
            Some(r) => r,
            None => {
                let d = RetryPolicy::default();
                RetryPolicy {
                    base: env_parse::<u64>("SOURCEFLOW_RETRY_BASE_MS")?
                        .map(Duration::from_millis)
                        .unwrap_or(d.base),
                    max: env_parse::<u64>("SOURCEFLOW_RETRY_MAX_MS")?
                        .map(Duration::from_millis)
                        .unwrap_or(d.max),
                }
            }
        };
        let idempotency = match self.idempotency {
            Some(IdempotencyChoice::Off) => None,
            Some(IdempotencyChoice::Store(s)) => Some(s),
            None => match env_var("SOURCEFLOW_IDEMPOTENCY").as_deref() {
                None | Some("memory") => {
                    Some(Arc::new(MemoryIdempotencyStore::new()) as Arc<dyn IdempotencyStore>)
                }
                Some("off") => None,
                #[cfg(feature = "sqlite")]
                Some(url) if url.starts_with("sqlite:") => Some(Arc::new(
                    idempotency::SqliteIdempotencyStore::connect(url).await?,
                )
                    as Arc<dyn IdempotencyStore>),
                #[cfg(feature = "postgres")]
                Some(url) if url.starts_with("postgres:") || url.starts_with("postgresql:") => {
                    Some(Arc::new(idempotency::PostgresIdempotencyStore::connect(url).await?)
                        as Arc<dyn IdempotencyStore>)
                }
                #[cfg(feature = "dynamodb")]
                Some(url) if url.starts_with("dynamodb://") => {
                    Some(Arc::new(idempotency::DynamoDbIdempotencyStore::connect(
                        &url["dynamodb://".len()..],
                    )
                    .await?) as Arc<dyn IdempotencyStore>)
                }
                Some(other) => {
                    return Err(Error::Config(format!(
                        "SOURCEFLOW_IDEMPOTENCY={other:?} is not a store this build has; use `memory`, `off`, or (with the `sqlite`/`postgres`/`dynamodb` features) a `sqlite://` or `postgres://` URL or `dynamodb://<table>`"
                    )))
                }
            },
        };
        let idempotency_ttl = match self.idempotency_ttl {
            Some(d) => d,
            None => env_parse::<u64>("SOURCEFLOW_IDEMPOTENCY_TTL_SECS")?
                .map(Duration::from_secs)
                .unwrap_or(idempotency::DEFAULT_TTL),
        };
        let idempotency = idempotency.map(|store| {
            Arc::new(idempotency::Settings {
                store,
                stats: Arc::default(),
                ttl: idempotency_ttl,
                ttl_by_type: self.idempotency_ttl_by_type,
                key_by_type: self.idempotency_key_by_type,
            })
        });
        let meter = self
            .meter
            .unwrap_or_else(|| opentelemetry::global::meter("sourceflow"));
        let depth_sample = match self.depth_sample {
            Some(d) => d,
            None => env_parse::<u64>("SOURCEFLOW_DEPTH_SAMPLE_SECS")?
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_DEPTH_SAMPLE),
        };
        let encrypt_all = match self.encrypt_all {
            Some(on) => on,
            None => env_parse::<bool>("SOURCEFLOW_ENCRYPT_ALL")?.unwrap_or(false),
        };
        let key_provider: Option<Arc<dyn KeyProvider>> = match self.key_provider {
            Some(p) => Some(p),
            None => match env_var("SOURCEFLOW_LOCAL_KEY") {
                #[cfg(feature = "aws")]
                _ if env_var("SOURCEFLOW_KMS_KEY_ID").is_some() => {
                    let key = env_var("SOURCEFLOW_KMS_KEY_ID").unwrap_or_default();
                    Some(Arc::new(encryption::KmsKeyProvider::from_env(key).await?))
                }
                Some(k) => Some(Arc::new(LocalKeyProvider::from_base64(&k)?)),
                // Messages on the embedded transport never leave the process: a random
                // key of the process (shared by its runtimes) is enough, and the default
                // needs no setup.
                None if transport.name() == "memory" => Some(process_key()),
                None => None,
            },
        };
        let encryption = key_provider.map(|p| {
            Arc::new(encryption::Settings {
                encryptor: Arc::new(Encryptor::new(p, self.key_cache.unwrap_or_default())),
                all: encrypt_all,
            })
        });
        let handlers: Vec<&'static HandlerRoute> = registry::handler_routes()
            .filter(|h| self.filter.as_ref().is_none_or(|f| f(h)))
            .collect();
        Ok(Resolved {
            service,
            transport,
            naming: Naming::new(prefix),
            concurrency,
            max_receive_count,
            visibility_timeout,
            shutdown_timeout,
            receive_wait: self.receive_wait.unwrap_or(DEFAULT_RECEIVE_WAIT),
            retry,
            states: self.states,
            handlers,
            idempotency,
            metrics: Arc::new(Metrics::new(&meter)),
            depth_sample,
            encryption,
            encrypt_all,
        })
    }

    /// Checks the routes, provisions the topology and starts the listeners. Returns once
    /// everything listens.
    pub async fn start(self) -> Result<Handle> {
        let r = self.resolve().await?;
        let messages: Vec<&'static MessageRoute> = registry::message_routes().collect();
        let plan = plan(&r, &messages)?;
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
        let dispatcher = Arc::new(Dispatcher::new(
            r.transport.clone(),
            r.service.clone(),
            r.naming.clone(),
            plan.destinations,
            r.states,
            r.metrics.clone(),
            r.encryption.clone(),
        ));
        let known: Arc<HashSet<&'static str>> = Arc::new(messages.iter().map(|m| m.name).collect());
        let encrypted: Arc<HashSet<&'static str>> = Arc::new(
            messages
                .iter()
                .filter(|m| m.encrypt)
                .map(|m| m.name)
                .collect(),
        );
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut listeners = Vec::new();
        for lp in plan.listeners {
            let names: Vec<_> = lp.handlers.values().flatten().map(|h| h.name).collect();
            tracing::info!(service = %r.service, queue = %lp.queue, fifo = lp.fifo, handlers = ?names, "listening");
            let listener = Arc::new(Listener {
                dispatcher: dispatcher.clone(),
                queue: lp.queue,
                fifo: lp.fifo,
                handlers: lp.handlers,
                known: known.clone(),
                concurrency: r.concurrency,
                retry: r.retry,
                max_receive_count: r.max_receive_count,
                visibility_timeout: r.visibility_timeout,
                receive_wait: r.receive_wait,
                shutdown_timeout: r.shutdown_timeout,
                idempotency: r.idempotency.clone(),
                liveness: Liveness::new(),
                encrypted: encrypted.clone(),
            });
            listeners.push(ListenerInfo {
                queue: listener.queue.to_string(),
                dead_letter_queue: Naming::dead_letter(&listener.queue),
                liveness: listener.liveness.clone(),
                bound: r.receive_wait + LIVENESS_SLACK,
            });
            tasks.push(tokio::spawn(listener.run(stop.clone())));
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
        Ok(Handle {
            inner: Arc::new(HandleInner {
                dispatcher,
                topology: plan.topology,
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

    /// Starts, runs until SIGINT or SIGTERM, then shuts down gracefully.
    pub async fn run(self) -> Result<()> {
        let handle = self.start().await?;
        #[cfg(feature = "health-http")]
        if let Some(addr) = env_var("SOURCEFLOW_HEALTH_ADDR") {
            let addr: std::net::SocketAddr = addr.parse().map_err(|_| {
                Error::Config(format!(
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

struct Resolved {
    service: String,
    transport: Arc<dyn Transport>,
    naming: Naming,
    concurrency: usize,
    max_receive_count: u32,
    visibility_timeout: Duration,
    shutdown_timeout: Duration,
    receive_wait: Duration,
    retry: RetryPolicy,
    states: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    handlers: Vec<&'static HandlerRoute>,
    idempotency: Option<Arc<idempotency::Settings>>,
    metrics: Arc<Metrics>,
    depth_sample: Duration,
    encryption: Option<Arc<encryption::Settings>>,
    encrypt_all: bool,
}

struct ListenerPlan {
    queue: Arc<str>,
    fifo: bool,
    handlers: HashMap<&'static str, Vec<&'static HandlerRoute>>,
}

struct Plan {
    topology: Topology,
    listeners: Vec<ListenerPlan>,
    destinations: HashMap<&'static str, Arc<str>>,
}

/// Works out the topology and listeners, and runs every check that needs all routes.
fn plan(r: &Resolved, messages: &[&'static MessageRoute]) -> Result<Plan> {
    let mut problems = Vec::new();
    registry::check_messages(messages, &mut problems);
    let states: HashSet<TypeId> = r.states.keys().copied().collect();
    registry::check_handlers(&r.handlers, &states, &mut problems);

    if r.encryption.is_none() {
        // Receiving needs the key from the start; a send of an encrypted type without a key
        // fails at the call with the same advice.
        let handled: HashSet<&str> = r.handlers.iter().map(|h| h.message).collect();
        let mut needing: Vec<&str> = messages
            .iter()
            .filter(|m| (m.encrypt || r.encrypt_all) && handled.contains(m.name))
            .map(|m| m.name)
            .collect();
        needing.sort_unstable();
        needing.dedup();
        if !needing.is_empty() {
            problems.push(format!(
                "this service handles {}, which must be encrypted, but no key provider is configured: set SOURCEFLOW_KMS_KEY_ID (KMS) or SOURCEFLOW_LOCAL_KEY (development), or call `.key_provider(..)`",
                needing.join(", ")
            ));
        }
    }
    let naming = &r.naming;
    let mut destinations = HashMap::new();
    // Queues and topics of every message known to the binary: a service may send any.
    let mut queues: BTreeMap<String, bool> = BTreeMap::new();
    let mut topics: BTreeMap<String, bool> = BTreeMap::new();
    for m in messages {
        let full = naming.resource(m.destination);
        destinations.insert(m.name, Arc::from(full.as_str()));
        match m.kind {
            MessageKind::Command => {
                queues.insert(full, m.fifo);
            }
            MessageKind::Event => {
                topics.insert(full, m.fifo);
            }
        }
    }

    // Listeners: command queues, and one subscriber queue per (service, topic).
    let mut listeners: BTreeMap<String, (bool, HashMap<&'static str, Vec<&'static HandlerRoute>>)> =
        BTreeMap::new();
    let mut subscriptions: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for h in &r.handlers {
        let queue = match h.kind {
            MessageKind::Command => naming.resource(h.destination),
            MessageKind::Event => {
                let q = match h.queue {
                    Some(q) => naming.resource(q),
                    None => naming.subscriber(&r.service, h.destination),
                };
                let types = subscriptions
                    .entry((naming.resource(h.destination), q.clone()))
                    .or_default();
                if !types.iter().any(|t| t == h.message) {
                    types.push(h.message.to_string());
                }
                q
            }
        };
        let fifo = queue.ends_with(".fifo");
        queues.entry(queue.clone()).or_insert(fifo);
        listeners
            .entry(queue)
            .or_insert_with(|| (fifo, HashMap::new()))
            .1
            .entry(h.message)
            .or_default()
            .push(h);
    }

    // A command queue this service consumes must not carry commands it cannot handle.
    for m in messages.iter().filter(|m| m.kind == MessageKind::Command) {
        let q = naming.resource(m.destination);
        if let Some((_, hs)) = listeners.get(&q) {
            if !hs.contains_key(m.name) {
                let handled: Vec<_> = hs.keys().copied().collect();
                problems.push(format!(
                    "service `{}` consumes queue `{q}` (for {}), which also carries command `{}` ({}) that it has no handler for; such messages would be dead-lettered: add a handler, or give `{}` its own queue",
                    r.service,
                    handled.join(", "),
                    m.name,
                    m.rust_path(),
                    m.type_name
                ));
            }
        }
    }

    for q in queues.keys() {
        if let Err(e) = check_queue_name(q) {
            problems.push(e);
        }
    }
    for t in topics.keys() {
        if t.len() > crate::naming::SNS_NAME_MAX {
            problems.push(format!(
                "topic name `{t}` is longer than {} characters",
                crate::naming::SNS_NAME_MAX
            ));
        }
    }
    if !problems.is_empty() {
        problems.sort();
        problems.dedup();
        return Err(Error::Topology(TopologyProblems(problems)));
    }

    let mut topology = Topology::default();
    for (name, fifo) in &queues {
        let dlq = Naming::dead_letter(name);
        topology.queues.push(QueueSpec {
            name: dlq.clone(),
            fifo: *fifo,
            visibility_timeout: r.visibility_timeout,
            dead_letter: None,
        });
        topology.queues.push(QueueSpec {
            name: name.clone(),
            fifo: *fifo,
            visibility_timeout: r.visibility_timeout,
            dead_letter: Some(DeadLetterSpec {
                queue: dlq,
                max_receive_count: r.max_receive_count,
            }),
        });
    }
    for (name, fifo) in &topics {
        topology.topics.push(TopicSpec {
            name: name.clone(),
            fifo: *fifo,
        });
    }
    for ((topic, queue), mut types) in subscriptions {
        types.sort();
        topology.subscriptions.push(SubscriptionSpec {
            topic,
            queue,
            message_types: types,
        });
    }
    let listeners = listeners
        .into_iter()
        .map(|(queue, (fifo, handlers))| ListenerPlan {
            queue: Arc::from(queue.as_str()),
            fifo,
            handlers,
        })
        .collect();
    Ok(Plan {
        topology,
        listeners,
        destinations,
    })
}

/// Options for [`Handle::send_with`] and [`Handle::raise_with`].
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    meta: SendMeta,
}

impl SendOptions {
    /// Default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts the message into an existing conversation.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.meta.correlation_id = Some(id.into());
        self
    }

    /// Pins the message id; a retried send with the same id is deduplicated on FIFO queues.
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.meta.message_id = Some(id.into());
        self
    }

    /// Delays delivery (standard queues only; at most 15 minutes on SQS).
    pub fn delay(mut self, d: Duration) -> Self {
        self.meta.delay = Some(d);
        self
    }
}

struct HandleInner {
    dispatcher: Arc<Dispatcher>,
    topology: Topology,
    naming: Naming,
    stop: CancellationToken,
    listeners: Mutex<Vec<JoinHandle<DrainReport>>>,
    listener_info: Vec<ListenerInfo>,
    /// The periodic purge of expired idempotency records.
    cleanup: Mutex<Option<JoinHandle<()>>>,
    idempotency: Option<Arc<idempotency::Settings>>,
}

struct ListenerInfo {
    queue: String,
    dead_letter_queue: String,
    liveness: Arc<Liveness>,
    bound: Duration,
}

/// How much longer than one long poll a listener may go without a successful receive
/// before it counts as unhealthy.
const LIVENESS_SLACK: Duration = Duration::from_secs(30);
/// How long a health check waits for the broker or a store.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Samples queue and dead-letter queue depths into the `sourceflow.queue.depth` gauge.
async fn sample_depths(
    transport: Arc<dyn Transport>,
    metrics: Arc<Metrics>,
    queues: Vec<(String, String)>,
    every: Duration,
    stop: CancellationToken,
) {
    use opentelemetry::KeyValue;
    loop {
        for (queue, dlq) in &queues {
            for (name, kind) in [(queue, "source"), (dlq, "dead_letter")] {
                if let Ok(Some(d)) = transport.queue_depth(name).await {
                    for (state, n) in [
                        ("visible", d.visible),
                        ("in_flight", d.in_flight),
                        ("delayed", d.delayed),
                    ] {
                        metrics.queue_depth.record(
                            n as u64,
                            &[
                                KeyValue::new("messaging.destination.name", name.clone()),
                                KeyValue::new("sourceflow.queue.kind", kind),
                                KeyValue::new("sourceflow.state", state),
                            ],
                        );
                    }
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// A running service, for code outside handlers (an HTTP endpoint, a test): send commands,
/// raise events, inspect the topology, shut down. Cheap to clone.
#[derive(Clone)]
pub struct Handle {
    inner: Arc<HandleInner>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("service", &self.service())
            .field("transport", &self.inner.dispatcher.transport().name())
            .finish()
    }
}

impl Handle {
    /// Sends a command now; returns its message id.
    pub async fn send<C: Command>(&self, command: C) -> Result<String> {
        self.send_with(command, SendOptions::default()).await
    }

    /// Sends a command with options; returns its message id.
    pub async fn send_with<C: Command>(&self, command: C, options: SendOptions) -> Result<String> {
        self.dispatch(&command, options).await
    }

    /// Publishes an event now; returns its message id.
    pub async fn raise<E: Event>(&self, event: E) -> Result<String> {
        self.raise_with(event, SendOptions::default()).await
    }

    /// Publishes an event with options; returns its message id.
    pub async fn raise_with<E: Event>(&self, event: E, options: SendOptions) -> Result<String> {
        self.dispatch(&event, options).await
    }

    async fn dispatch<M: Message>(&self, msg: &M, options: SendOptions) -> Result<String> {
        if self.inner.stop.is_cancelled() {
            return Err(Error::ShutDown);
        }
        let mut meta = options.meta;
        if meta.traceparent.is_none() {
            if let Some((tp, ts)) = telemetry::current_trace_context() {
                meta.traceparent = Some(tp);
                meta.tracestate = ts;
            }
        }
        let out = self.inner.dispatcher.encode(msg, meta).await?;
        let id = out.message_id.clone();
        let pending = self.inner.dispatcher.pending::<M>(out)?;
        self.inner.dispatcher.dispatch(pending).await?;
        Ok(id)
    }

    /// This service's name.
    pub fn service(&self) -> &str {
        self.inner.dispatcher.service()
    }

    /// The transport in use.
    pub fn transport(&self) -> Arc<dyn Transport> {
        self.inner.dispatcher.transport().clone()
    }

    /// What was provisioned at startup.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// Resource naming (prefix) of this service.
    pub fn naming(&self) -> &Naming {
        &self.inner.naming
    }

    /// The full name of the queue a command type is sent to.
    pub fn queue_of<C: Command>(&self) -> String {
        self.inner.naming.resource(C::DESTINATION)
    }

    /// The full name of the topic an event type is published to.
    pub fn topic_of<E: Event>(&self) -> String {
        self.inner.naming.resource(E::DESTINATION)
    }

    /// The full name of the queue through which this service receives `E`.
    pub fn subscriber_queue_of<E: Event>(&self) -> String {
        self.inner.naming.subscriber(self.service(), E::DESTINATION)
    }

    /// Stops receiving, lets in-flight handlers finish within the shutdown timeout, and
    /// returns unfinished messages to their queues. A second call returns an empty report.
    pub async fn shutdown(&self) -> Result<DrainReport> {
        self.inner.stop.cancel();
        if let Some(cleanup) = self.inner.cleanup.lock().take() {
            cleanup.abort();
        }
        let tasks: Vec<_> = std::mem::take(&mut *self.inner.listeners.lock());
        let mut report = DrainReport::default();
        for t in tasks {
            match t.await {
                Ok(r) => report += r,
                Err(e) => tracing::error!(error = %e, "a listener task failed"),
            }
        }
        tracing::info!(
            service = %self.service(),
            finished = report.finished,
            returned = report.returned,
            "sourceflow stopped"
        );
        Ok(report)
    }

    /// Idempotency counters (checks, duplicates, unique, deferred, mismatches), if
    /// idempotent processing is on.
    pub fn idempotency_stats(&self) -> Option<IdempotencyStatsSnapshot> {
        self.inner.idempotency.as_ref().map(|i| i.stats.snapshot())
    }

    /// The idempotency store in use, if any.
    pub fn idempotency_store(&self) -> Option<Arc<dyn IdempotencyStore>> {
        self.inner.idempotency.as_ref().map(|i| i.store.clone())
    }

    /// Checks the broker, every resource of the topology, each listener, each dead-letter
    /// queue and the idempotency store. See [`health`](crate::health).
    pub async fn health(&self) -> HealthReport {
        let inner = &self.inner;
        let transport = inner.dispatcher.transport();
        let mut checks = Vec::new();
        let t = &inner.topology;
        let check = match tokio::time::timeout(HEALTH_TIMEOUT, transport.missing(t)).await {
            Ok(Ok(missing)) if missing.is_empty() => HealthCheck {
                name: "transport".into(),
                status: Status::Healthy,
                detail: format!(
                    "{} queues, {} topics, {} subscriptions present",
                    t.queues.len(),
                    t.topics.len(),
                    t.subscriptions.len()
                ),
            },
            Ok(Ok(missing)) => HealthCheck {
                name: "transport".into(),
                status: Status::Unhealthy,
                detail: format!("missing: {}", missing.join(", ")),
            },
            Ok(Err(e)) => HealthCheck {
                name: "transport".into(),
                status: Status::Unhealthy,
                detail: format!("unreachable: {e}"),
            },
            Err(_) => HealthCheck {
                name: "transport".into(),
                status: Status::Unhealthy,
                detail: format!("no answer within {HEALTH_TIMEOUT:?}"),
            },
        };
        checks.push(check);
        let stopped = self.is_shut_down();
        for l in &inner.listener_info {
            let age = l.liveness.age();
            let (status, detail) = if stopped {
                (Status::Unhealthy, "stopped (shutting down)".to_string())
            } else if age > l.bound {
                (
                    Status::Unhealthy,
                    format!("no successful poll for {:.1} s", age.as_secs_f64()),
                )
            } else {
                (
                    Status::Healthy,
                    format!("last successful poll {:.1} s ago", age.as_secs_f64()),
                )
            };
            checks.push(HealthCheck {
                name: format!("listener {}", l.queue),
                status,
                detail,
            });
            let depth =
                tokio::time::timeout(HEALTH_TIMEOUT, transport.queue_depth(&l.dead_letter_queue))
                    .await;
            let (status, detail) = match depth {
                Ok(Ok(Some(d))) if d.total() > 0 => {
                    (Status::Degraded, format!("{} messages waiting", d.total()))
                }
                Ok(Ok(Some(_))) => (Status::Healthy, "empty".to_string()),
                Ok(Ok(None)) => (Status::Healthy, "depth unknown".to_string()),
                Ok(Err(e)) => (Status::Unhealthy, format!("unreachable: {e}")),
                Err(_) => (Status::Unhealthy, "no answer".to_string()),
            };
            checks.push(HealthCheck {
                name: format!("dead-letter queue {}", l.dead_letter_queue),
                status,
                detail,
            });
        }
        if let Some(idem) = &inner.idempotency {
            let (status, detail) =
                match tokio::time::timeout(HEALTH_TIMEOUT, idem.store.size()).await {
                    Ok(Ok(n)) => (Status::Healthy, format!("{n} records")),
                    Ok(Err(e)) => (Status::Unhealthy, format!("unreachable: {e}")),
                    Err(_) => (Status::Unhealthy, "no answer".to_string()),
                };
            checks.push(HealthCheck {
                name: format!("idempotency store {}", idem.store.name()),
                status,
                detail,
            });
        }
        HealthReport::new(self.service(), transport.name(), checks)
    }

    /// The IAM policy this service needs (see [`iam`](crate::iam)): its consumed queues,
    /// dead-letter queues, command queues, topics and KMS key, for `scope`'s account and
    /// region.
    pub fn iam_policy(&self, mut scope: crate::iam::IamScope) -> serde_json::Value {
        if scope.kms_key.is_none() {
            scope.kms_key = self
                .inner
                .dispatcher
                .encryption()
                .and_then(|e| e.encryptor.key_arn());
        }
        if scope.idempotency_table.is_none() {
            scope.idempotency_table = self
                .inner
                .idempotency
                .as_ref()
                .and_then(|i| i.store.dynamodb_table().map(str::to_string));
        }
        let consumed: Vec<String> = self
            .inner
            .listener_info
            .iter()
            .map(|l| l.queue.clone())
            .collect();
        crate::iam::policy(&self.inner.topology, &consumed, &scope)
    }

    /// Moves the messages of `queue`'s dead-letter queue back to `queue` (full name, as
    /// from [`queue_of`](Self::queue_of) or [`subscriber_queue_of`](Self::subscriber_queue_of)),
    /// keeping FIFO group ids; returns how many moved.
    pub async fn redrive(&self, queue: &str) -> Result<usize> {
        crate::redrive::redrive(
            self.inner.dispatcher.transport().as_ref(),
            &Naming::dead_letter(queue),
            queue,
        )
        .await
    }

    /// Resolves once shutdown has begun.
    pub async fn stopped(&self) {
        self.inner.stop.cancelled().await
    }

    /// True once shutdown has begun.
    pub fn is_shut_down(&self) -> bool {
        self.inner.stop.is_cancelled()
    }
}
