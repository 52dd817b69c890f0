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
//!   handler sent or raised), then those messages are dispatched, then marked dispatched
//!   (a completion the store refuses is retried in place: the handlers do not run again);
//!   on failure the claim is released so the retry can run;
//! * the record counts **handler attempts**: a claim is told which attempt it is
//!   ([`Claim::Acquired`]`::attempt`); a release as [`Release::Failed`] and the takeover of
//!   a claim whose worker died holding it count one, while a claim given back untouched
//!   ([`Release::Returned`]: an infrastructure fault, shutdown) and receives that never
//!   reached a claim count nothing, so only the handlers spend a message's retry budget;
//! * the key is `IN_PROGRESS` under another worker's live lease: the duplicate waits, kept
//!   invisible by the visibility heartbeat, polling the claim with backoff, until the
//!   original completes (then it is acknowledged) or fails (then it runs); it is neither
//!   dropped nor run twice, and waiting does not spend its receive count;
//! * the lease has expired (the worker crashed): the claim is taken over, and the dead
//!   worker's attempt counts; an in-progress record abandoned for more than
//!   [`ABANDONED_AFTER`] after its lease ran out is purged (its message long gone);
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
pub(crate) mod record;
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
    /// Another worker is processing the message under a live lease, or completed it and
    /// is still dispatching what it stored (see [`IdempotencyStore::complete`]).
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
    ///
    /// A stored outbox is the completing worker's to send: the claim's lease stays on as
    /// its dispatch lease, and until [`set_outbox`](Self::set_outbox) records the end of
    /// the dispatch (or the lease runs out: the worker died), another claim of the key
    /// answers [`Claim::InProgress`] — a duplicate arriving mid-dispatch waits instead of
    /// sending the messages a second time — and then [`Claim::Completed`] with what is left.
    async fn complete(
        &self,
        key: &str,
        token: &str,
        ttl: Duration,
        outbox: Option<&str>,
    ) -> Result<bool>;

    /// Replaces the undispatched outbox of a completed key: `None` once everything went out,
    /// or the messages still to go after a partial dispatch; either way it ends the dispatch
    /// lease. A key without an outbox (none stored, or cleared by another worker's dispatch)
    /// or not completed is left alone.
    async fn set_outbox(&self, key: &str, outbox: Option<&str>) -> Result<()>;

    /// Gives up a claim so that a later delivery can claim it again at once; `why` says
    /// whether the attempt counts (see [`Release`]). Only the holder of `token` releases:
    /// with another token, or once the claim was taken over or completed, nothing changes.
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

    /// The pool of a SQL store (PostgreSQL, SQLite), on which transactional handlers'
    /// transactions are opened (see [`crate::tx`]); `None` for other stores.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    fn sql_pool(&self) -> Option<crate::tx::SqlPool> {
        None
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
    let mut key = String::with_capacity(service.len() + wire_name.len() + message_id.len() + 2);
    for (i, part) in [service, wire_name, message_id].into_iter().enumerate() {
        if i > 0 {
            key.push(':');
        }
        key.push_str(part);
    }
    key
}

/// SHA-256 of a payload, hex-encoded: stored with the claim to detect a reused id.
pub fn payload_hash(payload: &str) -> String {
    PayloadHash::of(payload).as_str().to_owned()
}

/// [`payload_hash`] without an allocation: the 64 hex digits on the stack (the listener
/// claims with it; a store that keeps it copies it).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct PayloadHash([u8; 64]);

impl PayloadHash {
    pub(crate) fn of(payload: &str) -> Self {
        use sha2::Digest;
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let digest = sha2::Sha256::digest(payload.as_bytes());
        let mut out = [0u8; 64];
        for (i, b) in digest.iter().enumerate() {
            out[2 * i] = HEX[usize::from(b >> 4)];
            out[2 * i + 1] = HEX[usize::from(b & 0x0f)];
        }
        PayloadHash(out)
    }

    /// From its text, when that is 64 hex digits as [`PayloadHash::of`] writes them.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let bytes: [u8; 64] = text.as_bytes().try_into().ok()?;
        bytes
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
            .then_some(PayloadHash(bytes))
    }

    pub(crate) fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever stored (`of`, `parse`).
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// A new random claim token (the SQL stores'; the memory store keeps its tokens as bytes).
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) fn new_token() -> String {
    crate::envelope::uuid_text(uuid::Uuid::new_v4())
}

/// What one cleanup pass of [`purge_expired_in_batches`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// Expired records deleted.
    pub purged: usize,
    /// Calls to [`IdempotencyStore::purge_expired`] made.
    pub batches: usize,
}

/// Deletes every expired completed record and abandoned claim of `store` (see
/// [`IdempotencyStore::purge_expired`]), `batch` records per call, until a call deletes
/// fewer than `batch`. Small batches keep each statement (and the locks it
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
    use std::sync::Arc;

    use super::*;

    /// Ages records for the checks that need old ones: each store's test writes the time
    /// directly (SQL, DynamoDB) or through a test-only hook (memory), rather than waiting an
    /// hour.
    #[async_trait]
    pub trait Backdate: Send + Sync {
        /// Makes the lease of `key`'s in-progress record (held or released) end `ago` ago.
        async fn lease_ran_out(&self, key: &str, ago: Duration);
    }

    const LEASE: Duration = Duration::from_secs(30);
    const SHORT: Duration = Duration::from_millis(50);

    /// Claims `key`, which must be acquired; returns the token and the attempt number.
    async fn acquire(
        store: &dyn IdempotencyStore,
        key: &str,
        hash: &str,
        lease: Duration,
    ) -> (String, u32) {
        match store.claim(key, hash, lease).await.expect("claim") {
            Claim::Acquired { token, attempt } => (token, attempt),
            other => panic!("{key}: expected the claim to be acquired, got {other:?}"),
        }
    }

    /// Claims `key`, which must be acquired as attempt `expected`; returns the token.
    async fn attempt(
        store: &dyn IdempotencyStore,
        key: &str,
        lease: Duration,
        expected: u32,
        why: &str,
    ) -> String {
        let (token, attempt) = acquire(store, key, "h", lease).await;
        assert_eq!(attempt, expected, "{key}: {why}");
        token
    }

    async fn in_progress(store: &dyn IdempotencyStore, key: &str, why: &str) {
        match store.claim(key, "h", LEASE).await.expect("claim") {
            Claim::InProgress { lease_left } => assert!(lease_left <= LEASE, "{key}: {why}"),
            other => panic!("{key}: {why}: expected InProgress, got {other:?}"),
        }
    }

    async fn release(store: &dyn IdempotencyStore, key: &str, token: &str, why: Release) {
        store.release(key, token, why).await.expect("release");
    }

    /// Runs every semantic check against `store` (keys are made unique with `prefix`);
    /// `backdate` ages records for the purge checks.
    pub async fn run(store: &dyn IdempotencyStore, prefix: &str, backdate: &dyn Backdate) {
        let k = |s: &str| format!("{prefix}:{s}");
        let completed = |undispatched: Option<&str>| Claim::Completed {
            undispatched: undispatched.map(str::to_string),
        };

        // First claim wins; a second sees it in progress.
        let a = k("a");
        let token = attempt(store, &a, LEASE, 1, "a new key is the first attempt").await;
        in_progress(store, &a, "a live claim").await;
        assert!(store.renew(&a, &token, LEASE).await.expect("renew"));
        assert!(!store
            .renew(&a, "not-the-token", LEASE)
            .await
            .expect("renew"));
        // Another token cannot complete it.
        assert!(!store
            .complete(&a, "not-the-token", DEFAULT_TTL, None)
            .await
            .expect("complete"));
        assert!(store
            .complete(&a, &token, DEFAULT_TTL, Some("[1]"))
            .await
            .expect("complete"));
        assert!(
            !store.renew(&a, &token, LEASE).await.expect("renew"),
            "a completed claim is not renewed"
        );
        // Its worker is sending the outbox under the claim's lease: a duplicate waits.
        in_progress(store, &a, "a completion still dispatching its outbox").await;
        assert_eq!(
            store.claim(&a, "other-hash", LEASE).await.expect("claim"),
            Claim::Mismatch,
            "a mismatch is one, dispatching or not"
        );
        // The outbox: what a partial dispatch left (the dispatch ended: no more waiting),
        // then nothing; a slower worker that dispatched part of it does not bring back an
        // outbox cleared meanwhile.
        store.set_outbox(&a, Some("[2]")).await.expect("outbox");
        assert_eq!(
            store.claim(&a, "h", LEASE).await.expect("claim"),
            completed(Some("[2]")),
            "set_outbox(Some) replaces the outbox and ends the dispatch lease"
        );
        store.set_outbox(&a, None).await.expect("outbox");
        assert_eq!(
            store.claim(&a, "h", LEASE).await.expect("claim"),
            completed(None),
            "set_outbox(None) clears it"
        );
        store.set_outbox(&a, Some("[3]")).await.expect("outbox");
        assert_eq!(
            store.claim(&a, "h", LEASE).await.expect("claim"),
            completed(None),
            "a cleared outbox stays cleared"
        );
        assert_eq!(
            store.claim(&a, "other-hash", LEASE).await.expect("claim"),
            Claim::Mismatch
        );
        // set_outbox touches completed records only.
        let o = k("outbox-in-progress");
        let token = attempt(store, &o, LEASE, 1, "new").await;
        store.set_outbox(&o, Some("[9]")).await.expect("outbox");
        in_progress(store, &o, "set_outbox leaves a claim alone").await;
        assert!(store
            .complete(&o, &token, DEFAULT_TTL, None)
            .await
            .expect("complete"));
        assert_eq!(
            store.claim(&o, "h", LEASE).await.expect("claim"),
            completed(None)
        );

        // Failed releases count, returned ones do not; a released claim is claimable at
        // once, keeps its payload, and its token is worthless.
        let b = k("b");
        let token = attempt(store, &b, LEASE, 1, "new").await;
        release(store, &b, &token, Release::Failed).await;
        assert_eq!(
            store.claim(&b, "other-hash", LEASE).await.expect("claim"),
            Claim::Mismatch,
            "a released record keeps its payload hash"
        );
        let again = attempt(store, &b, LEASE, 2, "one failed attempt").await;
        assert!(!store.renew(&b, &token, LEASE).await.expect("renew"));
        assert!(!store
            .complete(&b, &token, DEFAULT_TTL, None)
            .await
            .expect("complete"));
        release(store, &b, &token, Release::Failed).await; // the old token: no effect
        in_progress(store, &b, "a release by an old token changes nothing").await;
        release(store, &b, &again, Release::Failed).await;
        let token = attempt(store, &b, LEASE, 3, "two failed attempts").await;
        release(store, &b, &token, Release::Returned).await;
        assert_eq!(
            store.claim(&b, "other-hash", LEASE).await.expect("claim"),
            Claim::Mismatch,
            "a returned record keeps its payload hash"
        );
        let token = attempt(store, &b, LEASE, 3, "a returned attempt does not count").await;
        release(store, &b, &token, Release::Returned).await;
        let token = attempt(store, &b, LEASE, 3, "nor does a second one").await;
        release(store, &b, &token, Release::Failed).await;
        let token = attempt(store, &b, LEASE, 4, "three failed attempts").await;
        // Dead-lettered: the record is deleted, so a redrive starts again.
        let before = store.size().await.expect("size");
        release(store, &b, &token, Release::DeadLettered).await;
        if store.size_is_exact() {
            assert_eq!(
                store.size().await.expect("size"),
                before - 1,
                "a dead-lettered release deletes the record"
            );
        }
        let (token, n) = acquire(store, &b, "redriven-hash", LEASE).await;
        assert_eq!(n, 1, "a dead-lettered record is deleted");
        release(store, &b, &token, Release::DeadLettered).await;

        // Claims whose worker died, and completions that expired: one wait for all.
        let c = k("c"); // dies on its first attempt
        let dead = attempt(store, &c, SHORT, 1, "new").await;
        let c2 = k("c2"); // fails once, then dies
        let token = attempt(store, &c2, LEASE, 1, "new").await;
        release(store, &c2, &token, Release::Failed).await;
        attempt(store, &c2, SHORT, 2, "one failed attempt").await;
        let r = k("r"); // returned once, then dies
        let token = attempt(store, &r, LEASE, 1, "new").await;
        release(store, &r, &token, Release::Returned).await;
        attempt(store, &r, SHORT, 1, "a returned attempt does not count").await;
        let d = k("d"); // fails twice, then completes for a moment
        let token = attempt(store, &d, LEASE, 1, "new").await;
        release(store, &d, &token, Release::Failed).await;
        let token = attempt(store, &d, LEASE, 2, "one failed attempt").await;
        release(store, &d, &token, Release::Failed).await;
        let token = attempt(store, &d, LEASE, 3, "two failed attempts").await;
        assert!(store
            .complete(&d, &token, Duration::from_millis(10), None)
            .await
            .expect("complete"));
        let e = k("e"); // completes for a moment, then is purged
        let token = attempt(store, &e, LEASE, 1, "new").await;
        assert!(store
            .complete(&e, &token, Duration::from_millis(10), None)
            .await
            .expect("complete"));
        let f = k("f"); // completes with an outbox, then its worker dies sending it
        let token = attempt(store, &f, SHORT, 1, "new").await;
        assert!(store
            .complete(&f, &token, DEFAULT_TTL, Some("[1]"))
            .await
            .expect("complete"));
        tokio::time::sleep(Duration::from_millis(1100)).await;

        assert_eq!(
            store.claim(&f, "h", LEASE).await.expect("claim"),
            completed(Some("[1]")),
            "a dispatch lease that ran out: the duplicate sends what is left"
        );

        let new = attempt(store, &c, LEASE, 2, "the dead worker's attempt counts").await;
        assert_ne!(dead, new);
        assert!(!store
            .complete(&c, &dead, DEFAULT_TTL, None)
            .await
            .expect("complete"));
        assert!(!store.renew(&c, &dead, LEASE).await.expect("renew"));
        release(store, &c, &dead, Release::Failed).await;
        in_progress(store, &c, "the dead worker's late release changes nothing").await;
        release(store, &c, &new, Release::Failed).await;
        let token = attempt(store, &c, LEASE, 3, "the takeover counted once").await;
        assert!(store
            .complete(&c, &token, DEFAULT_TTL, None)
            .await
            .expect("complete"));
        attempt(store, &c2, LEASE, 3, "a failure, then a death").await;
        attempt(store, &r, LEASE, 2, "a return, then a death").await;
        let (_, n) = acquire(store, &d, "new-hash", LEASE).await;
        assert_eq!(n, 1, "an expired completion starts again, for any payload");

        // Purge: expired completions and claims abandoned more than ABANDONED_AFTER ago go;
        // younger abandoned claims, released claims and live records stay.
        let long_ago = ABANDONED_AFTER + Duration::from_secs(60);
        let lately = ABANDONED_AFTER - Duration::from_secs(60);
        let old_held = k("old-held");
        attempt(store, &old_held, LEASE, 1, "new").await;
        backdate.lease_ran_out(&old_held, long_ago).await;
        let old_released = k("old-released");
        let token = attempt(store, &old_released, LEASE, 1, "new").await;
        release(store, &old_released, &token, Release::Failed).await;
        backdate.lease_ran_out(&old_released, long_ago).await;
        let young = k("young");
        attempt(store, &young, LEASE, 1, "new").await;
        backdate.lease_ran_out(&young, lately).await;
        let released = k("released");
        let token = attempt(store, &released, LEASE, 1, "new").await;
        release(store, &released, &token, Release::Failed).await;
        let live = k("live");
        attempt(store, &live, LEASE, 1, "new").await;

        let before = store.size().await.expect("size");
        let purged = store.purge_expired(1000).await.expect("purge");
        assert_eq!(
            purged, 3,
            "the expired completion and the two abandoned claims are purged"
        );
        if store.size_is_exact() {
            assert_eq!(store.size().await.expect("size"), before - 3);
        }
        assert_eq!(store.purge_expired(1000).await.expect("purge"), 0);
        attempt(store, &e, LEASE, 1, "purged").await;
        attempt(store, &old_held, LEASE, 1, "purged, not taken over").await;
        attempt(store, &old_released, LEASE, 1, "purged, not taken over").await;
        attempt(store, &young, LEASE, 2, "kept, and taken over").await;
        attempt(store, &released, LEASE, 2, "kept").await;
        in_progress(store, &live, "a live claim survives the purge").await;
        assert_eq!(
            store.claim(&a, "h", LEASE).await.expect("claim"),
            completed(None),
            "a live completed record survives the purge"
        );
    }

    /// 16 concurrent claims of `key`: exactly one wins, every other one sees it in progress.
    /// Returns the winner's token and attempt.
    async fn round(store: &Arc<dyn IdempotencyStore>, key: &str) -> (String, u32) {
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let store = store.clone();
                let key = key.to_string();
                tokio::spawn(async move { store.claim(&key, "h", LEASE).await.expect("claim") })
            })
            .collect();
        let mut won = Vec::new();
        for t in tasks {
            match t.await.expect("task") {
                Claim::Acquired { token, attempt } => won.push((token, attempt)),
                Claim::InProgress { .. } => {}
                other => panic!("{key}: unexpected {other:?}"),
            }
        }
        assert_eq!(won.len(), 1, "exactly one concurrent claim wins");
        won.remove(0)
    }

    /// Many concurrent claims of one key: exactly one wins, on a new key and on every kind
    /// of record a claim takes over, and the attempt it gets counts the dead worker once.
    pub async fn race(store: Arc<dyn IdempotencyStore>, key: &str) {
        let (token, n) = round(&store, key).await;
        assert_eq!(n, 1, "a new key");
        release(&*store, key, &token, Release::Failed).await;
        let (token, n) = round(&store, key).await;
        assert_eq!(n, 2, "after a failed attempt");
        release(&*store, key, &token, Release::Returned).await;
        let (token, n) = round(&store, key).await;
        assert_eq!(n, 2, "after a returned attempt");
        // The winner dies: its lease runs out.
        assert!(store
            .renew(key, &token, Duration::from_millis(1))
            .await
            .expect("renew"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (token, n) = round(&store, key).await;
        assert_eq!(n, 3, "16 takeovers of a dead worker's claim count it once");
        assert!(store
            .complete(key, &token, Duration::from_millis(1), None)
            .await
            .expect("complete"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (_, n) = round(&store, key).await;
        assert_eq!(n, 1, "an expired completion starts again");
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
