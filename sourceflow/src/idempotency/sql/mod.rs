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
//! A claim is one atomic statement, `INSERT … ON CONFLICT (key) DO UPDATE SET …, attempts =
//! CASE … END WHERE <the existing record is a released claim, an expired lease or an
//! expired completion> RETURNING attempts`: it inserts a new record (attempts 0) or takes
//! over a claimable one (a dead worker's claim: attempts + 1; a released claim: attempts
//! kept; an expired completion: 0), or changes nothing; only when it changed nothing is the
//! record read to tell the caller why. `renew`, `complete` and `release` only touch the
//! record while it is in progress under the caller's token. A release as failed or returned
//! keeps the record, in progress without a token (claimable at once), adding one attempt
//! when failed; a release as dead-lettered deletes it.
//!
//! Expired completed records, and claims abandoned for more than
//! [`ABANDONED_AFTER`](super::ABANDONED_AFTER) after their lease ran out, are deleted by
//! [`purge_expired`](super::IdempotencyStore::purge_expired) in batches; run it periodically
//! with [`spawn_cleanup`](super::spawn_cleanup).
//!
//! Migrations only add what older releases can ignore (a column with a default, an index),
//! and a store opens a database that a later release migrated further: instances of two
//! releases can share the database during a rolling deploy. (The first release, which
//! knew only `0001`, refuses to start on a database migrated further: finish the deploy
//! rather than start instances of it afterwards.)
//!
//! The pools that `connect` opens wait at most [`ACQUIRE_TIMEOUT`] for a connection: when
//! the database is unreachable, a claim fails within seconds (an infrastructure fault, which
//! returns the message without spending an attempt) instead of holding the message for
//! sqlx's default of 30 seconds. A pool brought to `from_pool` keeps its own settings.

use std::time::Duration;

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

/// How long a store opened by `connect` waits for a pooled connection (to open one, or for
/// one to come free) before the operation fails.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The table that records which of sourceflow's migrations were applied.
pub const MIGRATIONS_TABLE: &str = "_sourceflow_migrations";

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

/// The claim steps of a transactional handler (see [`crate::tx`]), on whichever database
/// the store's pool is: open the transaction, claim and complete inside it, and record
/// afterwards what a rolled-back claim leaves to record.
pub(crate) mod in_tx {
    use std::time::Duration;

    use crate::error::Result;
    use crate::idempotency::{Claim, Release};
    use crate::tx::{SqlPool, TxSlot};

    /// Opens a transaction on `pool` (on SQLite, holding the write lock from the start).
    pub(crate) async fn begin(pool: &SqlPool) -> Result<TxSlot> {
        match pool {
            #[cfg(feature = "postgres")]
            SqlPool::Postgres(p) => p
                .begin()
                .await
                .map(TxSlot::Postgres)
                .map_err(super::store_error("postgres", "begin")),
            #[cfg(feature = "sqlite")]
            SqlPool::Sqlite(p) => super::sqlite::begin(p).await.map(TxSlot::Sqlite),
        }
    }

    /// Claims `key` inside `tx`: the record is invisible to others until the commit.
    pub(crate) async fn claim(
        tx: &mut TxSlot,
        key: &str,
        payload_hash: &str,
        lease: Duration,
    ) -> Result<Claim> {
        match tx {
            #[cfg(feature = "postgres")]
            TxSlot::Postgres(t) => super::postgres::claim_in(t, key, payload_hash, lease).await,
            #[cfg(feature = "sqlite")]
            TxSlot::Sqlite(t) => super::sqlite::claim_in(t, key, payload_hash, lease).await,
        }
    }

    /// Marks the claim completed inside `tx`, with the messages still to dispatch under a
    /// dispatch lease of `lease` from now (nothing renewed the claim's lease in the
    /// transaction: it may have run out).
    pub(crate) async fn complete(
        tx: &mut TxSlot,
        key: &str,
        token: &str,
        ttl: Duration,
        outbox: Option<&str>,
        lease: Duration,
    ) -> Result<bool> {
        match tx {
            #[cfg(feature = "postgres")]
            TxSlot::Postgres(t) => {
                super::postgres::complete_row(&mut **t, key, token, ttl, outbox, Some(lease)).await
            }
            #[cfg(feature = "sqlite")]
            TxSlot::Sqlite(t) => {
                super::sqlite::complete_row(&mut **t, key, token, ttl, outbox, Some(lease)).await
            }
        }
    }

    /// After a rollback: records the failed attempt (`Failed`: the rolled-back transaction
    /// took its count with it), clears a claimable record (`DeadLettered`), or nothing
    /// (`Returned`). Never touches a record a live claim holds.
    pub(crate) async fn release_rolled_back(
        pool: &SqlPool,
        key: &str,
        payload_hash: &str,
        why: Release,
    ) -> Result<()> {
        match pool {
            #[cfg(feature = "postgres")]
            SqlPool::Postgres(p) => {
                super::postgres::release_rolled_back(p, key, payload_hash, why).await
            }
            #[cfg(feature = "sqlite")]
            SqlPool::Sqlite(p) => {
                super::sqlite::release_rolled_back(p, key, payload_hash, why).await
            }
        }
    }
}
