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
