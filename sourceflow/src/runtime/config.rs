//! Configuration: what the builder did not set comes from the environment, then the
//! defaults.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::claim_check::{self, ClaimCheck};
use crate::encryption::{self, Encryptor, KeyProvider, LocalKeyProvider};
use crate::error::{Error, Result};
use crate::idempotency::{self, IdempotencyStore, MemoryIdempotencyStore};
use crate::naming::{sanitize_service, Naming};
use crate::registry::{self, HandlerRoute};
use crate::retry::RetryPolicy;
use crate::telemetry::{self, Metrics};
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

/// The builder's value, else `name` from the environment, else `default`.
fn setting<T: std::str::FromStr>(value: Option<T>, name: &str, default: T) -> Result<T> {
    match value {
        Some(v) => Ok(v),
        None => Ok(env_parse(name)?.unwrap_or(default)),
    }
}

/// Like [`setting`], for durations given in the environment in whole seconds.
fn seconds(value: Option<Duration>, name: &str, default: Duration) -> Result<Duration> {
    match value {
        Some(v) => Ok(v),
        None => Ok(env_parse::<u64>(name)?
            .map(Duration::from_secs)
            .unwrap_or(default)),
    }
}

fn config_error(msg: impl Into<String>) -> Error {
    Error::Config(msg.into())
}

impl Builder {
    /// Everything the service runs with: the builder's settings, then the environment,
    /// then the defaults; every invalid value is one clear error.
    pub(super) async fn resolve(self) -> Result<Resolved> {
        self.resolve_with(true).await
    }

    /// Like [`resolve`](Self::resolve) without contacting anything: no transport is built
    /// (an embedded one stands in), no store or key provider is opened. For planning only.
    pub(super) async fn resolve_offline(self) -> Result<Resolved> {
        self.resolve_with(false).await
    }

    async fn resolve_with(mut self, connect: bool) -> Result<Resolved> {
        let service = resolve_service(self.service.take())?;
        let spans = self
            .tracer
            .take()
            .map(|tracer| telemetry::Spans::new(tracer, &service));
        let transport = match connect {
            true => resolve_transport(self.transport.take()).await?,
            false => Arc::new(MemoryTransport::new()),
        };
        let naming = Naming::new(resolve_prefix(self.prefix.take())?);
        let concurrency = setting(
            self.concurrency,
            "SOURCEFLOW_CONCURRENCY",
            DEFAULT_CONCURRENCY,
        )?;
        if concurrency == 0 {
            return Err(config_error("concurrency must be at least 1"));
        }
        let (max_receive_count, redrive_limit) = self.attempts()?;
        let (idempotency, encryption) = match connect {
            true => (
                self.resolve_idempotency().await?,
                self.resolve_encryption(transport.name()).await?,
            ),
            false => {
                self.encrypt_all =
                    Some(setting(self.encrypt_all, "SOURCEFLOW_ENCRYPT_ALL", false)?);
                (None, None)
            }
        };
        let meter = self
            .meter
            .take()
            .unwrap_or_else(|| opentelemetry::global::meter("sourceflow"));
        let handlers: Vec<&'static HandlerRoute> = registry::handler_routes()
            .filter(|h| self.filter.as_ref().is_none_or(|f| f(h)))
            .collect();
        let queries: Vec<&'static registry::QueryRoute> = registry::query_routes()
            .filter(|q| match (&self.query_filter, &self.filter) {
                (Some(keep), _) => keep(q),
                // A `handlers(..)` predicate selects a subset; query handlers, which it
                // cannot see, are not in it.
                (None, Some(_)) => false,
                (None, None) => true,
            })
            .collect();
        let receive_linger = self
            .receive_linger
            .unwrap_or_else(|| transport.receive_linger());
        let (claim_check, compress_above) = self.resolve_claim_check(&naming)?;
        Ok(Resolved {
            claim_check,
            compress_above,
            service,
            transport,
            naming,
            concurrency,
            max_receive_count,
            redrive_limit,
            visibility_timeout: seconds(
                self.visibility_timeout,
                "SOURCEFLOW_VISIBILITY_TIMEOUT_SECS",
                DEFAULT_VISIBILITY_TIMEOUT,
            )?,
            shutdown_timeout: seconds(
                self.shutdown_timeout,
                "SOURCEFLOW_SHUTDOWN_TIMEOUT_SECS",
                DEFAULT_SHUTDOWN_TIMEOUT,
            )?,
            receive_wait: self.receive_wait.unwrap_or(DEFAULT_RECEIVE_WAIT),
            receive_linger,
            liveness_slack: self.liveness_slack.unwrap_or(DEFAULT_LIVENESS_SLACK),
            retry: match self.retry {
                Some(r) => r,
                None => policy_from_env("SOURCEFLOW_RETRY", RetryPolicy::default())?,
            },
            infrastructure_retry: match self.infrastructure_retry {
                Some(r) => r,
                None => policy_from_env("SOURCEFLOW_INFRA_RETRY", RetryPolicy::infrastructure())?,
            },
            permanent: self.permanent,
            states: self.states,
            handlers,
            queries,
            idempotency,
            metrics: Arc::new(Metrics::new(&meter).with_spans(spans)),
            depth_sample: seconds(
                self.depth_sample,
                "SOURCEFLOW_DEPTH_SAMPLE_SECS",
                DEFAULT_DEPTH_SAMPLE,
            )?,
            encrypt_all: self.encrypt_all.unwrap_or(false),
            encryption,
            offline: !connect,
            #[cfg(any(feature = "postgres", feature = "sqlite"))]
            relay: match self.relay.take() {
                None => Some(crate::outbox::RelaySettings::default()),
                Some(choice) => choice,
            },
        })
    }

    /// The claim check (the builder's, else `SOURCEFLOW_CLAIM_CHECK_*`) with its key prefix
    /// resolved, and the size above which payloads are compressed.
    fn resolve_claim_check(
        &mut self,
        naming: &Naming,
    ) -> Result<(Option<ClaimCheck>, Option<usize>)> {
        let claim = match self.claim_check.take() {
            Some(c) => Some(c),
            None => claim_check_from_env()?,
        };
        let compress = match (&claim, self.compression) {
            (Some(c), _) if c.compress_above.is_some() => c.compress_above,
            (_, Some(c)) => Some(c.above),
            _ => env_parse::<usize>("SOURCEFLOW_COMPRESS_ABOVE_BYTES")?,
        };
        let Some(mut c) = claim else {
            return Ok((None, compress));
        };
        check_bucket_name(&c.bucket)?;
        if c.expiration_days == 0 {
            return Err(config_error(
                "the claim check's expiration must be at least 1 day",
            ));
        }
        if c.prefix.as_deref().is_none_or(str::is_empty) {
            c.prefix = Some(naming.resource("claims"));
        }
        Ok((Some(c), compress))
    }

    /// The handler attempts, and the broker's redrive limit when one is set (else each
    /// queue's comes from its attempts).
    fn attempts(&self) -> Result<(u32, Option<u32>)> {
        let attempts = setting(
            self.max_receive_count,
            "SOURCEFLOW_MAX_RECEIVE_COUNT",
            DEFAULT_MAX_RECEIVE_COUNT,
        )?;
        if !(1..=1000).contains(&attempts) {
            return Err(config_error(
                "max receive count must be between 1 and 1000 (the SQS range)",
            ));
        }
        let limit = match self.redrive_limit {
            Some(n) => Some(n),
            None => env_parse::<u32>("SOURCEFLOW_REDRIVE_LIMIT")?,
        };
        if let Some(limit) = limit {
            if !(1..=1000).contains(&limit) {
                return Err(config_error(
                    "the redrive limit must be between 1 and 1000 (the SQS range)",
                ));
            }
            if limit <= attempts && attempts < 1000 {
                return Err(config_error(format!(
                    "the broker's redrive limit ({limit}) must be above the handler attempts ({attempts}), so that sourceflow dead-letters first, with a reason"
                )));
            }
        }
        Ok((attempts, limit))
    }

    async fn resolve_idempotency(&mut self) -> Result<Option<Arc<idempotency::Settings>>> {
        let store = match self.idempotency.take() {
            Some(IdempotencyChoice::Off) => return Ok(None),
            Some(IdempotencyChoice::Store(s)) => s,
            #[cfg(any(feature = "postgres", feature = "sqlite"))]
            Some(IdempotencyChoice::Pool(pool)) => store_on(pool).await?,
            None => match store_from_env().await? {
                Some(s) => s,
                None => return Ok(None),
            },
        };
        let ttl = seconds(
            self.idempotency_ttl,
            "SOURCEFLOW_IDEMPOTENCY_TTL_SECS",
            idempotency::DEFAULT_TTL,
        )?;
        Ok(Some(Arc::new(idempotency::Settings {
            store,
            stats: Arc::default(),
            ttl,
            ttl_by_type: std::mem::take(&mut self.idempotency_ttl_by_type),
            key_by_type: std::mem::take(&mut self.idempotency_key_by_type),
        })))
    }

    async fn resolve_encryption(
        &mut self,
        transport: &str,
    ) -> Result<Option<Arc<encryption::Settings>>> {
        let all = setting(self.encrypt_all, "SOURCEFLOW_ENCRYPT_ALL", false)?;
        self.encrypt_all = Some(all);
        let provider: Arc<dyn KeyProvider> = match self.key_provider.take() {
            Some(p) => p,
            None => match key_provider_from_env(transport).await? {
                Some(p) => p,
                None => return Ok(None),
            },
        };
        Ok(Some(Arc::new(encryption::Settings {
            encryptor: Arc::new(Encryptor::new(provider, self.key_cache.unwrap_or_default())),
            all,
        })))
    }
}

fn resolve_service(given: Option<String>) -> Result<String> {
    match given.or_else(|| env_var("SOURCEFLOW_SERVICE")) {
        Some(s) if sanitize_service(&s) != s => Err(config_error(format!(
            "service name `{s}` may only contain ASCII letters, digits, `-` and `_`"
        ))),
        Some(s) => Ok(s),
        None => Ok(std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .map(|s| sanitize_service(&s))
            .unwrap_or_else(|| "sourceflow".to_string())),
    }
}

pub(super) async fn resolve_transport(
    given: Option<Arc<dyn Transport>>,
) -> Result<Arc<dyn Transport>> {
    if let Some(t) = given {
        return Ok(t);
    }
    match env_var("SOURCEFLOW_TRANSPORT").as_deref() {
        None | Some("memory") => Ok(Arc::new(MemoryTransport::new())),
        #[cfg(feature = "aws")]
        Some("aws") => Ok(Arc::new(
            crate::transport::aws::AwsTransport::from_env().await?,
        )),
        Some(other) => Err(config_error(format!(
            "SOURCEFLOW_TRANSPORT={other:?} is not a transport this build has; use `memory`{}",
            if cfg!(feature = "aws") {
                " or `aws`"
            } else {
                " (or build with the `aws` feature)"
            }
        ))),
    }
}

pub(crate) fn resolve_prefix(given: Option<String>) -> Result<String> {
    let prefix = given
        .or_else(|| env_var("SOURCEFLOW_PREFIX"))
        .unwrap_or_default();
    if prefix
        .chars()
        .any(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    {
        return Err(config_error(format!(
            "prefix `{prefix}` may only contain ASCII letters, digits, `-` and `_`"
        )));
    }
    Ok(prefix)
}

/// The store `SOURCEFLOW_IDEMPOTENCY` names (memory when unset; `None` for `off`).
async fn store_from_env() -> Result<Option<Arc<dyn IdempotencyStore>>> {
    let store: Arc<dyn IdempotencyStore> = match env_var("SOURCEFLOW_IDEMPOTENCY").as_deref() {
        None | Some("memory") => Arc::new(MemoryIdempotencyStore::new()),
        Some("off") => return Ok(None),
        #[cfg(feature = "sqlite")]
        Some(url) if url.starts_with("sqlite:") => {
            Arc::new(idempotency::SqliteIdempotencyStore::connect(url).await?)
        }
        #[cfg(feature = "postgres")]
        Some(url) if url.starts_with("postgres:") || url.starts_with("postgresql:") => {
            Arc::new(idempotency::PostgresIdempotencyStore::connect(url).await?)
        }
        #[cfg(feature = "dynamodb")]
        Some(url) if url.starts_with("dynamodb://") => Arc::new(
            idempotency::DynamoDbIdempotencyStore::connect(&url["dynamodb://".len()..]).await?,
        ),
        Some(other) => {
            return Err(config_error(format!(
                "SOURCEFLOW_IDEMPOTENCY={other:?} is not a store this build has; use `memory`, `off`, or (with the `sqlite`/`postgres`/`dynamodb` features) a `sqlite://` or `postgres://` URL or `dynamodb://<table>`"
            )))
        }
    };
    Ok(Some(store))
}

/// The key provider the environment names: KMS, a local master key, or on the embedded
/// transport a random key of the process.
async fn key_provider_from_env(transport: &str) -> Result<Option<Arc<dyn KeyProvider>>> {
    #[cfg(feature = "aws")]
    if let Some(key) = env_var("SOURCEFLOW_KMS_KEY_ID") {
        return Ok(Some(Arc::new(
            encryption::KmsKeyProvider::from_env(key).await?,
        )));
    }
    Ok(match env_var("SOURCEFLOW_LOCAL_KEY") {
        Some(k) => Some(Arc::new(LocalKeyProvider::from_base64(&k)?)),
        // Messages on the embedded transport never leave the process: a random key of the
        // process (shared by its runtimes) is enough, and the default needs no setup.
        None if transport == "memory" => Some(process_key()),
        None => None,
    })
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
    pub(super) receive_linger: Duration,
    pub(super) retry: RetryPolicy,
    pub(super) infrastructure_retry: RetryPolicy,
    /// Set by the builder or the environment; else each queue's is ten times its attempts.
    pub(super) redrive_limit: Option<u32>,
    pub(super) liveness_slack: Duration,
    pub(super) permanent: crate::outcome::PermanentErrors,
    pub(super) states: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    pub(super) handlers: Vec<&'static HandlerRoute>,
    /// The query handlers the service runs.
    pub(super) queries: Vec<&'static registry::QueryRoute>,
    pub(super) idempotency: Option<Arc<idempotency::Settings>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) depth_sample: Duration,
    pub(super) encryption: Option<Arc<encryption::Settings>>,
    pub(super) encrypt_all: bool,
    /// Resolved for planning only: nothing was contacted (no store, no key provider).
    pub(super) offline: bool,
    /// The outbox relay's settings; `None`: no relay.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub(super) relay: Option<crate::outbox::RelaySettings>,
    /// The claim check, its key prefix resolved; `None`: off.
    pub(super) claim_check: Option<ClaimCheck>,
    /// Compress payloads above this many bytes; `None`: off.
    pub(super) compress_above: Option<usize>,
}

impl Resolved {
    /// What the dispatcher sends large messages with, on this transport's object store;
    /// `None` when neither the claim check nor compression is on.
    pub(super) fn claim_settings(&self) -> Result<Option<Arc<claim_check::Settings>>> {
        let target = match &self.claim_check {
            None => None,
            Some(c) => {
                let store = self.transport.object_store().ok_or_else(|| {
                    config_error(format!(
                        "the claim check (bucket `{}`) needs an object store, and the {} transport has none",
                        c.bucket,
                        self.transport.name()
                    ))
                })?;
                Some(claim_check::Target {
                    store,
                    bucket: c.bucket.clone(),
                    prefix: c.prefix.clone().unwrap_or_default(),
                    threshold: c.threshold,
                    max_bytes: c.max_bytes,
                    expiration_days: c.expiration_days,
                })
            }
        };
        if target.is_none() && self.compress_above.is_none() {
            return Ok(None);
        }
        Ok(Some(Arc::new(claim_check::Settings {
            target,
            compress_above: self.compress_above,
        })))
    }
}

/// The claim check from `SOURCEFLOW_CLAIM_CHECK_BUCKET` (its switch), `_PREFIX`,
/// `_THRESHOLD_BYTES`, `_MAX_BYTES` and `_EXPIRATION_DAYS`.
fn claim_check_from_env() -> Result<Option<ClaimCheck>> {
    let Some(bucket) = env_var("SOURCEFLOW_CLAIM_CHECK_BUCKET") else {
        return Ok(None);
    };
    let mut c = ClaimCheck::bucket(bucket.trim());
    if let Some(prefix) = env_var("SOURCEFLOW_CLAIM_CHECK_PREFIX") {
        c = c.prefix(prefix.trim());
    }
    if let Some(bytes) = env_parse::<usize>("SOURCEFLOW_CLAIM_CHECK_THRESHOLD_BYTES")? {
        c = c.threshold(bytes);
    }
    if let Some(bytes) = env_parse::<usize>("SOURCEFLOW_CLAIM_CHECK_MAX_BYTES")? {
        c = c.max_bytes(bytes);
    }
    if let Some(days) = env_parse::<u32>("SOURCEFLOW_CLAIM_CHECK_EXPIRATION_DAYS")? {
        c = c.expiration_days(days);
    }
    Ok(Some(c))
}

/// An S3 bucket name: 3 to 63 lowercase letters, digits, dots and hyphens, starting and
/// ending with a letter or digit.
fn check_bucket_name(name: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-';
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if (3..=63).contains(&name.len())
        && name.chars().all(ok_char)
        && edge(name.chars().next())
        && edge(name.chars().last())
    {
        return Ok(());
    }
    Err(config_error(format!(
        "`{name}` is not a valid S3 bucket name (3 to 63 lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit)"
    )))
}

/// The SQL store on the application's pool (migrated now).
#[cfg(any(feature = "postgres", feature = "sqlite"))]
async fn store_on(pool: crate::tx::SqlPool) -> Result<Arc<dyn IdempotencyStore>> {
    Ok(match pool {
        #[cfg(feature = "postgres")]
        crate::tx::SqlPool::Postgres(p) => {
            Arc::new(idempotency::PostgresIdempotencyStore::from_pool(p).await?)
        }
        #[cfg(feature = "sqlite")]
        crate::tx::SqlPool::Sqlite(p) => {
            Arc::new(idempotency::SqliteIdempotencyStore::from_pool(p).await?)
        }
    })
}
