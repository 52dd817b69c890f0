//! Configuration: what the builder did not set comes from the environment, then the
//! defaults.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::encryption::{self, Encryptor, KeyProvider, LocalKeyProvider};
use crate::error::{Error, Result};
use crate::idempotency::{self, IdempotencyStore, MemoryIdempotencyStore};
use crate::naming::{sanitize_service, Naming};
use crate::registry::{self, HandlerRoute};
use crate::retry::RetryPolicy;
use crate::telemetry::Metrics;
use crate::transport::memory::MemoryTransport;
use crate::transport::Transport;

use super::builder::IdempotencyChoice;
use super::*;

/// The random master key of this process, for the embedded transport's default.
pub(super) fn process_key() -> Arc<dyn KeyProvider> {
    static KEY: std::sync::OnceLock<Arc<LocalKeyProvider>> = std::sync::OnceLock::new();
    KEY.get_or_init(|| Arc::new(LocalKeyProvider::random()))
        .clone()
}

pub(super) fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

pub(super) fn env_parse<T: std::str::FromStr>(name: &str) -> Result<Option<T>> {
    match env_var(name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| Error::Config(format!("{name}={v:?} is not a valid value"))),
    }
}

/// A backoff from `{prefix}_BASE_MS` and `{prefix}_MAX_MS`, else `default`'s.
fn policy_from_env(prefix: &str, default: RetryPolicy) -> Result<RetryPolicy> {
    Ok(RetryPolicy {
        base: env_parse::<u64>(&format!("{prefix}_BASE_MS"))?
            .map(Duration::from_millis)
            .unwrap_or(default.base),
        max: env_parse::<u64>(&format!("{prefix}_MAX_MS"))?
            .map(Duration::from_millis)
            .unwrap_or(default.max),
    })
}

/// The broker's own redrive limit: well above the handler attempts (ten times, at least
/// 100), so that sourceflow always dead-letters first, with a reason, and returns after
/// infrastructure faults (which SQS counts as receives) do not reach it.
pub(super) fn default_redrive_limit(max_attempts: u32) -> u32 {
    max_attempts.saturating_mul(10).clamp(100, 1000)
}

impl Builder {
    pub(super) async fn resolve(self) -> Result<Resolved> {
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
            None => policy_from_env("SOURCEFLOW_RETRY", RetryPolicy::default())?,
        };
        let infrastructure_retry = match self.infrastructure_retry {
            Some(r) => r,
            None => policy_from_env("SOURCEFLOW_INFRA_RETRY", RetryPolicy::infrastructure())?,
        };
        let redrive_limit = match self.redrive_limit {
            Some(n) => n,
            None => env_parse("SOURCEFLOW_REDRIVE_LIMIT")?
                .unwrap_or_else(|| default_redrive_limit(max_receive_count)),
        };
        if redrive_limit <= max_receive_count && max_receive_count < 1000 {
            return Err(Error::Config(format!(
                "the broker's redrive limit ({redrive_limit}) must be above the handler attempts ({max_receive_count}), so that sourceflow dead-letters first, with a reason"
            )));
        }
        if !(1..=1000).contains(&redrive_limit) {
            return Err(Error::Config(
                "the redrive limit must be between 1 and 1000 (the SQS range)".into(),
            ));
        }
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
            liveness_slack: self.liveness_slack.unwrap_or(DEFAULT_LIVENESS_SLACK),
            retry,
            infrastructure_retry,
            redrive_limit,
            permanent: self.permanent,
            states: self.states,
            handlers,
            idempotency,
            metrics: Arc::new(Metrics::new(&meter)),
            depth_sample,
            encryption,
            encrypt_all,
        })
    }
}

pub(super) struct Resolved {
    pub(super) service: String,
    pub(super) transport: Arc<dyn Transport>,
    pub(super) naming: Naming,
    pub(super) concurrency: usize,
    pub(super) max_receive_count: u32,
    pub(super) visibility_timeout: Duration,
    pub(super) shutdown_timeout: Duration,
    pub(super) receive_wait: Duration,
    pub(super) retry: RetryPolicy,
    pub(super) infrastructure_retry: RetryPolicy,
    pub(super) redrive_limit: u32,
    pub(super) liveness_slack: Duration,
    pub(super) permanent: crate::outcome::PermanentErrors,
    pub(super) states: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    pub(super) handlers: Vec<&'static HandlerRoute>,
    pub(super) idempotency: Option<Arc<idempotency::Settings>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) depth_sample: Duration,
    pub(super) encryption: Option<Arc<encryption::Settings>>,
    pub(super) encrypt_all: bool,
}
