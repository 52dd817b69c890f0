//! Idempotent processing: a handler's effect happens once per message, however often SQS
//! or SNS deliver it and however often a producer re-sends it.
//!
//! Before its handlers run, a message is **claimed** in an [`IdempotencyStore`] under the
//! key `{service}:{wire name}:{message id}` (the envelope's message id, stable across SQS
//! redeliveries, producer re-sends and duplicate SNS deliveries; the service is part of the
//! key because every service handles an event once). The claim is an atomic
//! insert-if-absent that records `IN_PROGRESS` with a lease; never check-then-mark.
//!
//! * the claim is won: handlers run; the lease is renewed with the visibility heartbeat;
//!   on success the record becomes `COMPLETED` (with an expiry, and with the messages the
//!   handler sent or raised), then those messages are dispatched, then marked dispatched;
//!   on failure the claim is released so the retry can run;
//! * the key is `IN_PROGRESS` under another worker's live lease: the duplicate waits, kept
//!   invisible by the visibility heartbeat, polling the claim with backoff, until the
//!   original completes (then it is acknowledged) or fails (then it runs); it is neither
//!   dropped nor run twice, and waiting does not spend its receive count;
//! * the lease has expired (the worker crashed): the claim is taken over;
//! * the key is `COMPLETED`: the message is acknowledged and counted as a duplicate; if the
//!   original worker died between completing and dispatching, the stored messages are
//!   dispatched first (with their original ids, so nothing is lost and receivers dedupe);
//! * the same id arrives with a different payload: an error, and the message goes to the
//!   dead-letter queue with the reason.
//!
//! **Business keys.** Where a producer may send the same business operation under new message
//! ids (a retried HTTP request that mints a new id, say), key the type by a field of its own
//! with `Builder::idempotency_key_for`: the key becomes `{service}:{wire name}:{business key}`,
//! and a second message with that business key is a duplicate (same payload) or refused to
//! the dead-letter queue (different payload).
//!
//! The default expiry of a completed record is 24 hours: duplicates from SQS redelivery,
//! SNS retries and producer retries arrive within minutes, and a day also covers a retried
//! deployment or a manual re-send the same day, while keeping stores small. Set it per
//! service with `Builder::idempotency_ttl` and per type with `Builder::idempotency_ttl_for`.

#[cfg(feature = "dynamodb")]
pub mod dynamodb;
mod memory;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "dynamodb"))]
mod record;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub mod sql;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;

#[cfg(feature = "dynamodb")]
pub use dynamodb::DynamoDbIdempotencyStore;
pub use memory::MemoryIdempotencyStore;
#[cfg(feature = "postgres")]
pub use sql::PostgresIdempotencyStore;
#[cfg(feature = "sqlite")]
pub use sql::SqliteIdempotencyStore;

/// Why a claim is given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// The handlers failed: the next claim is the next attempt (the count is kept).
    Failed,
    /// The message goes back untouched (an infrastructure fault, shutdown): the attempt
    /// does not count.
    Returned,
    /// The message went to the dead-letter queue: the record is deleted, so that a redrive
    /// starts with a fresh count.
    DeadLettered,
}

/// How long after its lease ran out an abandoned in-progress claim is purged.
pub const ABANDONED_AFTER: Duration = Duration::from_secs(60 * 60);

/// Default time a completed record is kept.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// The result of trying to claim a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This worker owns the key until its lease runs out; the token proves it.
    Acquired {
        /// Proof of ownership for `renew`, `complete` and `release`.
        token: String,
        /// Which attempt of the handlers this is: 1, plus the failed attempts recorded with
        /// [`Release::Failed`], plus the claims taken over from workers that died holding
        /// them. Receives that never reached the handlers do not count.
        attempt: u32,
    },
    /// Another worker is processing the message under a live lease.
    InProgress {
        /// Time left on that lease.
        lease_left: Duration,
    },
    /// The message was processed before.
    Completed {
        /// Messages the handler produced that may not have been dispatched yet (JSON, as
        /// given to [`IdempotencyStore::complete`]); `None` once dispatched.
        undispatched: Option<String>,
    },
    /// The key exists with a different payload hash.
    Mismatch,
}

/// Where claims live. Implementations must make [`claim`](Self::claim) atomic: two
/// concurrent claims of one key never both return [`Claim::Acquired`] while a lease is live.
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Short name for logs (`memory`, `sqlite`, `postgres`, `dynamodb`).
    fn name(&self) -> &'static str;

    /// Inserts `key` as in progress with a lease, unless it exists; takes over an in-progress
    /// record whose lease has expired.
    async fn claim(&self, key: &str, payload_hash: &str, lease: Duration) -> Result<Claim>;

    /// Extends a live claim's lease; false if the claim is no longer this token's.
    async fn renew(&self, key: &str, token: &str, lease: Duration) -> Result<bool>;

    /// Marks the claim completed, to expire after `ttl`, storing the undispatched outbox
    /// (`None` when the handler produced nothing). False if the claim was lost.
    async fn complete(
        &self,
        key: &str,
        token: &str,
        ttl: Duration,
        outbox: Option<&str>,
    ) -> Result<bool>;

    /// Replaces the undispatched outbox of a completed key: `None` once everything went out,
    /// or the messages still to go after a partial dispatch.
    async fn set_outbox(&self, key: &str, outbox: Option<&str>) -> Result<()>;

    /// Gives up a claim so that a later delivery can claim it again; `why` says whether the
    /// attempt counts (see [`Release`]).
    async fn release(&self, key: &str, token: &str, why: Release) -> Result<()>;

    /// Deletes up to `batch` expired records — completed records past their expiry, and
    /// abandoned in-progress claims whose lease ran out more than [`ABANDONED_AFTER`] ago —
    /// and returns how many.
    async fn purge_expired(&self, batch: usize) -> Result<usize>;

    /// Number of records currently stored (approximate where
    /// [`size_is_exact`](Self::size_is_exact) says so).
    async fn size(&self) -> Result<u64>;

    /// False when [`size`](Self::size) is an estimate the database refreshes now and then
    /// (DynamoDB's item count), rather than a count.
    fn size_is_exact(&self) -> bool {
        true
    }

    /// The DynamoDB table holding the records, if the store is one (for
    /// [`Handle::iam_policy`](crate::Handle::iam_policy)).
    fn dynamodb_table(&self) -> Option<&str> {
        None
    }

    /// True when the database deletes expired records by itself (DynamoDB's TTL), so the
    /// runtime runs no periodic [`purge_expired`](Self::purge_expired).
    fn purges_itself(&self) -> bool {
        false
    }

    /// True when records outlive the process (SQL, DynamoDB). A durable store receives the
    /// outbox with `complete`, before dispatch, so a crash in between loses nothing. A store
    /// that dies with the process (memory) is completed after a successful dispatch, and
    /// receives the outbox only when the dispatch failed: the same guarantee, without
    /// serializing every outbox.
    fn durable(&self) -> bool {
        true
    }
}

/// Counters of idempotency checks, for metrics.
#[derive(Debug, Default)]
pub struct IdempotencyStats {
    checks: AtomicU64,
    duplicates: AtomicU64,
    unique: AtomicU64,
    deferred: AtomicU64,
    mismatches: AtomicU64,
}

/// A point-in-time copy of [`IdempotencyStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdempotencyStatsSnapshot {
    /// Claims attempted.
    pub checks: u64,
    /// Messages acknowledged because they were completed before.
    pub duplicates: u64,
    /// Claims won.
    pub unique: u64,
    /// Messages retried later because another worker held the claim.
    pub deferred: u64,
    /// Messages rejected because the id came with a different payload.
    pub mismatches: u64,
}

impl IdempotencyStats {
    pub(crate) fn record(&self, claim: &Claim) {
        self.checks.fetch_add(1, Ordering::Relaxed);
        let c = match claim {
            Claim::Acquired { .. } => &self.unique,
            Claim::InProgress { .. } => &self.deferred,
            Claim::Completed { .. } => &self.duplicates,
            Claim::Mismatch => &self.mismatches,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The current counts.
    pub fn snapshot(&self) -> IdempotencyStatsSnapshot {
        IdempotencyStatsSnapshot {
            checks: self.checks.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            unique: self.unique.load(Ordering::Relaxed),
            deferred: self.deferred.load(Ordering::Relaxed),
            mismatches: self.mismatches.load(Ordering::Relaxed),
        }
    }
}

/// The idempotency key of a message in a service.
pub fn key(service: &str, wire_name: &str, message_id: &str) -> String {
    format!("{service}:{wire_name}:{message_id}")
}

/// SHA-256 of a payload, hex-encoded: stored with the claim to detect a reused id.
pub fn payload_hash(payload: &str) -> String {
    use sha2::Digest;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = sha2::Sha256::digest(payload.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

/// A new random claim token.
pub(crate) fn new_token() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// What one cleanup pass of [`purge_expired_in_batches`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// Expired records deleted.
    pub purged: usize,
    /// Calls to [`IdempotencyStore::purge_expired`] made.
    pub batches: usize,
}

/// Deletes every expired completed record of `store`, `batch` records per call, until a
/// call deletes fewer than `batch`. Small batches keep each statement (and the locks it
/// holds) short while claims go on.
pub async fn purge_expired_in_batches<S>(store: &S, batch: usize) -> Result<Cleanup>
where
    S: IdempotencyStore + ?Sized,
{
    let batch = batch.max(1);
    let mut done = Cleanup::default();
    loop {
        let n = store.purge_expired(batch).await?;
        done.purged += n;
        done.batches += 1;
        if n < batch {
            return Ok(done);
        }
        tokio::task::yield_now().await;
    }
}

/// Default interval of [`spawn_cleanup`].
pub const DEFAULT_CLEANUP_INTERVAL: Duration = Duration::from_secs(5 * 60);

/// Default batch size of [`spawn_cleanup`].
pub const DEFAULT_CLEANUP_BATCH: usize = 1_000;

/// Runs [`purge_expired_in_batches`] now and then every `every`, until the task is aborted.
/// Failures are logged and retried at the next interval.
pub fn spawn_cleanup<S>(
    store: std::sync::Arc<S>,
    every: Duration,
    batch: usize,
) -> tokio::task::JoinHandle<()>
where
    S: IdempotencyStore + ?Sized,
{
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every.max(Duration::from_millis(1)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            match purge_expired_in_batches(&*store, batch).await {
                Ok(done) if done.purged > 0 => tracing::debug!(
                    store = store.name(),
                    purged = done.purged,
                    batches = done.batches,
                    "expired idempotency records purged"
                ),
                Ok(_) => {}
                Err(error) => tracing::warn!(
                    store = store.name(),
                    %error,
                    "purging expired idempotency records failed; retrying at the next interval"
                ),
            }
        }
    })
}

/// A conformance suite every store must pass; stores call it from their tests.
#[doc(hidden)]
pub mod conformance {
    use super::*;

    /// Runs every semantic check against `store` (keys are made unique with `prefix`).
    pub async fn run(store: &dyn IdempotencyStore, prefix: &str) {
        let k = |s: &str| format!("{prefix}:{s}");
        let lease = Duration::from_secs(30);

        // First claim wins; a second sees it in progress.
        let Claim::Acquired { token, .. } = store.claim(&k("a"), "h1", lease).await.expect("claim")
        else {
            panic!("first claim must be acquired");
        };
        match store.claim(&k("a"), "h1", lease).await.expect("claim") {
            Claim::InProgress { lease_left } => assert!(lease_left <= lease),
            other => panic!("expected InProgress, got {other:?}"),
        }
        assert!(store.renew(&k("a"), &token, lease).await.expect("renew"));
        assert!(!store
            .renew(&k("a"), "not-the-token", lease)
            .await
            .expect("renew"));
        // Another token cannot complete it.
        assert!(!store
            .complete(&k("a"), "not-the-token", DEFAULT_TTL, None)
            .await
            .expect("complete"));
        assert!(store
            .complete(&k("a"), &token, DEFAULT_TTL, Some("[1]"))
            .await
            .expect("complete"));
        assert_eq!(
            store.claim(&k("a"), "h1", lease).await.expect("claim"),
            Claim::Completed {
                undispatched: Some("[1]".into())
            }
        );
        store.set_outbox(&k("a"), None).await.expect("dispatched");
        assert_eq!(
            store.claim(&k("a"), "h1", lease).await.expect("claim"),
            Claim::Completed { undispatched: None }
        );
        assert_eq!(
            store
                .claim(&k("a"), "other-hash", lease)
                .await
                .expect("claim"),
            Claim::Mismatch
        );

        // Release lets the retry claim again.
        let Claim::Acquired { token, .. } = store.claim(&k("b"), "h", lease).await.expect("claim")
        else {
            panic!("claim b");
        };
        store
            .release(&k("b"), &token, Release::Failed)
            .await
            .expect("release");
        assert!(matches!(
            store.claim(&k("b"), "h", lease).await.expect("claim"),
            Claim::Acquired { .. }
        ));

        // An expired lease is taken over, and the old token is worthless.
        let Claim::Acquired { token: old, .. } = store
            .claim(&k("c"), "h", Duration::from_millis(50))
            .await
            .expect("claim")
        else {
            panic!("claim c");
        };
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let Claim::Acquired { token: new, .. } =
            store.claim(&k("c"), "h", lease).await.expect("claim")
        else {
            panic!("expired lease must be taken over");
        };
        assert_ne!(old, new);
        assert!(!store
            .complete(&k("c"), &old, DEFAULT_TTL, None)
            .await
            .expect("complete"));
        assert!(store
            .complete(&k("c"), &new, DEFAULT_TTL, None)
            .await
            .expect("complete"));

        // Expired completed records are purged; live ones stay.
        let Claim::Acquired { token, .. } = store.claim(&k("d"), "h", lease).await.expect("claim")
        else {
            panic!("claim d");
        };
        assert!(store
            .complete(&k("d"), &token, Duration::from_millis(10), None)
            .await
            .expect("complete"));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let before = store.size().await.expect("size");
        let purged = store.purge_expired(1000).await.expect("purge");
        assert!(purged >= 1, "the expired record is purged");
        if store.size_is_exact() {
            assert_eq!(store.size().await.expect("size"), before - purged as u64);
        }
        assert!(matches!(
            store.claim(&k("d"), "h", lease).await.expect("claim"),
            Claim::Acquired { .. }
        ));
        assert_eq!(
            store.claim(&k("a"), "h1", lease).await.expect("claim"),
            Claim::Completed { undispatched: None },
            "a live completed record survives the purge"
        );
    }

    /// Many concurrent claims of one key: exactly one wins.
    pub async fn race(store: std::sync::Arc<dyn IdempotencyStore>, key: &str) {
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let store = store.clone();
            let key = key.to_string();
            tasks.push(tokio::spawn(async move {
                store
                    .claim(&key, "h", Duration::from_secs(30))
                    .await
                    .expect("claim")
            }));
        }
        let mut won = 0;
        for t in tasks {
            if matches!(t.await.expect("task"), Claim::Acquired { .. }) {
                won += 1;
            }
        }
        assert_eq!(won, 1, "exactly one concurrent claim wins");
    }
}

/// Derives a message type's business key from its JSON payload (an error: the payload does
/// not decode as the type).
pub(crate) type KeyFn =
    std::sync::Arc<dyn Fn(&str) -> std::result::Result<String, String> + Send + Sync>;

/// How a service uses its store: the store, counters, expiries and business keys.
pub(crate) struct Settings {
    pub store: std::sync::Arc<dyn IdempotencyStore>,
    pub stats: std::sync::Arc<IdempotencyStats>,
    pub ttl: Duration,
    pub ttl_by_type: std::collections::HashMap<&'static str, Duration>,
    pub key_by_type: std::collections::HashMap<&'static str, KeyFn>,
}

impl Settings {
    /// The idempotency key of a message: from its business key when its type has one, else
    /// from its message id.
    pub(crate) fn key_for(
        &self,
        service: &str,
        wire_name: &str,
        message_id: &str,
        payload: &str,
    ) -> std::result::Result<String, String> {
        match self.key_by_type.get(wire_name) {
            Some(f) => Ok(key(service, wire_name, &f(payload)?)),
            None => Ok(key(service, wire_name, message_id)),
        }
    }

    pub(crate) fn ttl_for(&self, wire_name: &str) -> Duration {
        self.ttl_by_type.get(wire_name).copied().unwrap_or(self.ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_hash_is_hex_sha256() {
        // FIPS 180-2 test vector.
        assert_eq!(
            payload_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(payload_hash("").len(), 64);
    }

    #[test]
    fn keys_use_the_business_key_where_the_type_has_one() {
        let mut settings = Settings {
            store: std::sync::Arc::new(MemoryIdempotencyStore::new()),
            stats: Default::default(),
            ttl: DEFAULT_TTL,
            ttl_by_type: Default::default(),
            key_by_type: Default::default(),
        };
        assert_eq!(
            settings.key_for("svc", "a.B.v1", "id-1", "{}"),
            Ok("svc:a.B.v1:id-1".to_string())
        );
        settings.key_by_type.insert(
            "a.B.v1",
            std::sync::Arc::new(|p: &str| {
                let v: serde_json::Value = serde_json::from_str(p).map_err(|e| e.to_string())?;
                v["k"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or("no k".to_string())
            }),
        );
        assert_eq!(
            settings.key_for("svc", "a.B.v1", "id-1", r#"{"k":"order-9"}"#),
            Ok("svc:a.B.v1:order-9".to_string())
        );
        assert_eq!(
            settings.key_for("svc", "a.B.v1", "id-1", "{}"),
            Err("no k".to_string())
        );
        assert_eq!(
            settings.key_for("svc", "other.v1", "id-2", "{}"),
            Ok("svc:other.v1:id-2".to_string()),
            "other types keep the message id"
        );
    }
}
