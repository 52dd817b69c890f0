//! Idempotency stores on SQL databases, through `sqlx`: SQLite (feature `sqlite`: one host,
//! survives restarts) and PostgreSQL (feature `postgres`: many instances share claims).
//!
//! Both keep their claims in the table [`TABLE`], created by migrations embedded in the
//! binary and run when a store is opened (tracked in their own table,
//! `_sourceflow_migrations`, so they never collide with the application's own `sqlx`
//! migrations in the same database). Times are milliseconds since the Unix epoch: the
//! process clock for SQLite, the database server's clock for PostgreSQL (so that instances
//! whose clocks disagree still agree on leases).
//!
//! A claim is one atomic statement, `INSERT … ON CONFLICT (key) DO UPDATE … WHERE <the
//! existing record is an expired lease or an expired completion> RETURNING token`: it
//! inserts a new record or takes over an expired one, or changes nothing; only when it
//! changed nothing is the record read to tell the caller why. `renew`, `complete` and
//! `release` only touch the record while it is in progress under the caller's token.
//!
//! Expired completed records are deleted by [`purge_expired`](super::IdempotencyStore::purge_expired)
//! in batches; run it periodically with [`spawn_cleanup`](super::spawn_cleanup).

use std::time::Duration;

use super::Claim;
use crate::error::Error;

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

#[cfg(feature = "postgres")]
pub use postgres::PostgresIdempotencyStore;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteIdempotencyStore;

/// The table that holds the claims (created by the embedded migrations).
pub const TABLE: &str = "sourceflow_idempotency";

/// The table that records which of sourceflow's migrations were applied.
pub const MIGRATIONS_TABLE: &str = "_sourceflow_migrations";

/// `state` of a claim being processed.
#[cfg(test)]
const IN_PROGRESS: &str = "in_progress";
/// `state` of a processed message.
const COMPLETED: &str = "completed";

/// How often a claim re-runs its insert when the record changed between the insert and the
/// read that classifies it (it was released, or its lease or expiry ran out meanwhile).
const CLAIM_ATTEMPTS: usize = 5;

/// Durations are stored as milliseconds; capped so that `now + d` never overflows.
fn millis(d: Duration) -> i64 {
    const CAP: i64 = i64::MAX / 4;
    i64::try_from(d.as_millis()).map_or(CAP, |ms| ms.min(CAP))
}

/// Wraps a database error with the store and the operation.
fn store_error(store: &'static str, operation: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| Error::Store {
        store,
        operation,
        source: Box::new(e),
    }
}

/// Wraps a failed migration.
fn migrate_error(store: &'static str) -> impl FnOnce(sqlx::migrate::MigrateError) -> Error {
    move |e| Error::Store {
        store,
        operation: "migrate",
        source: Box::new(e),
    }
}

/// An existing record that a claim could not take, read back to tell why.
struct Existing {
    payload_hash: String,
    state: String,
    lease_until: Option<i64>,
    expires_at: Option<i64>,
    outbox: Option<String>,
    /// The clock the record is judged by, at the time of the read.
    now: i64,
}

/// What to answer when a claim's insert changed nothing.
enum Verdict {
    Answer(Claim),
    /// The record is gone or claimable now: insert again.
    Retry,
}

fn classify(existing: Option<Existing>, payload_hash: &str) -> Verdict {
    let Some(e) = existing else {
        return Verdict::Retry; // released meanwhile
    };
    let completed = e.state == COMPLETED;
    if completed && e.expires_at.is_none_or(|t| t <= e.now) {
        return Verdict::Retry; // expired meanwhile: taken over by the insert
    }
    if e.payload_hash != payload_hash {
        return Verdict::Answer(Claim::Mismatch);
    }
    if completed {
        return Verdict::Answer(Claim::Completed {
            undispatched: e.outbox,
        });
    }
    match e.lease_until {
        Some(until) if until > e.now => Verdict::Answer(Claim::InProgress {
            lease_left: Duration::from_millis(u64::try_from(until - e.now).unwrap_or(0)),
        }),
        _ => Verdict::Retry, // the lease ran out meanwhile: taken over by the insert
    }
}

/// The answer when every attempt raced with a change of the record: another worker is busy
/// with the key, so the caller waits and asks again.
const CONTENDED: Claim = Claim::InProgress {
    lease_left: Duration::ZERO,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn existing(state: &str, hash: &str, lease: Option<i64>, exp: Option<i64>) -> Existing {
        Existing {
            payload_hash: hash.into(),
            state: state.into(),
            lease_until: lease,
            expires_at: exp,
            outbox: Some("[]".into()),
            now: 1_000,
        }
    }

    #[test]
    fn classifies_like_the_memory_store() {
        let answer = |e, h| match classify(e, h) {
            Verdict::Answer(c) => Some(c),
            Verdict::Retry => None,
        };
        assert_eq!(answer(None, "h"), None);
        assert_eq!(
            answer(Some(existing(IN_PROGRESS, "h", Some(1_500), None)), "h"),
            Some(Claim::InProgress {
                lease_left: Duration::from_millis(500)
            })
        );
        assert_eq!(
            answer(Some(existing(IN_PROGRESS, "h", Some(900), None)), "h"),
            None
        );
        assert_eq!(
            answer(Some(existing(IN_PROGRESS, "x", Some(900), None)), "h"),
            Some(Claim::Mismatch)
        );
        assert_eq!(
            answer(Some(existing(COMPLETED, "h", None, Some(2_000))), "h"),
            Some(Claim::Completed {
                undispatched: Some("[]".into())
            })
        );
        assert_eq!(
            answer(Some(existing(COMPLETED, "x", None, Some(2_000))), "h"),
            Some(Claim::Mismatch)
        );
        assert_eq!(
            answer(Some(existing(COMPLETED, "x", None, Some(1_000))), "h"),
            None
        );
    }

    #[test]
    fn durations_never_overflow() {
        assert_eq!(millis(Duration::from_millis(1_500)), 1_500);
        // Now is about 1.7e12 ms; a capped duration leaves room for centuries more.
        assert!(millis(Duration::MAX).checked_add(1 << 50).is_some());
    }
}
