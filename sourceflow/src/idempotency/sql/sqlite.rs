//! The SQLite idempotency store: claims in a database file on one host, kept across
//! restarts.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteExecutor, SqliteJournalMode, SqlitePool,
    SqlitePoolOptions, SqliteRow,
};
use sqlx::{ConnectOptions, Connection, Row};

use super::{migrate_error, store_error, ACQUIRE_TIMEOUT, MIGRATIONS_TABLE};
use crate::error::{Error, Result};
use crate::idempotency::record::{claim_with, millis, now_millis, Attempt, ClaimTries, Existing};
use crate::idempotency::{Claim, IdempotencyStore, Release, ABANDONED_AFTER};
use crate::tx::SqlPool;

const STORE: &str = "sqlite";

/// How long a statement waits for another connection's write to finish before failing with
/// `SQLITE_BUSY`. Writes to one SQLite file are serialized; a claim waits its turn.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections in the pool opened by [`SqliteIdempotencyStore::connect`].
const MAX_CONNECTIONS: u32 = 8;

// Makes the compiler track the migrations, so that editing them rebuilds the crate.
const _: &str = include_str!("../../../migrations/sqlite/0001_idempotency.sql");
const _: &str = include_str!("../../../migrations/sqlite/0002_attempts.sql");
const _: &str = include_str!("../../../migrations/sqlite/0003_outbox.sql");

/// Claims in a SQLite database file: for a service on a single host whose idempotency must
/// survive restarts (several processes on that host may share the file).
///
/// The database runs in WAL mode with a busy timeout, so concurrent claims from the pool's
/// connections (or other processes) wait for each other instead of failing. Commits are
/// fully synchronous (SQLite's default): a completion is on disk before the message is
/// acknowledged.
#[derive(Debug, Clone)]
pub struct SqliteIdempotencyStore {
    pool: SqlitePool,
}

impl SqliteIdempotencyStore {
    /// Opens (creating it if needed with `?mode=rwc`) the database at `url`, e.g.
    /// `sqlite://var/claims.db?mode=rwc`, in WAL mode with a busy timeout, and applies the
    /// embedded migrations. A claim waits at most [`ACQUIRE_TIMEOUT`](super::ACQUIRE_TIMEOUT)
    /// for one of the pool's connections.
    pub async fn connect(url: &str) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(store_error(STORE, "connect"))?
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(BUSY_TIMEOUT);
        // Switching a new database into WAL mode takes an exclusive lock that the busy
        // timeout does not cover: do it once, on one connection, before opening the pool.
        let mut attempt = 0;
        loop {
            match options.connect().await {
                Ok(conn) => {
                    conn.close().await.map_err(store_error(STORE, "connect"))?;
                    break;
                }
                Err(e) if is_busy(&e) && attempt < 50 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
                }
                Err(e) => return Err(store_error(STORE, "connect")(e)),
            }
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(store_error(STORE, "connect"))?;
        Self::from_pool(pool).await
    }

    /// Uses an existing pool and applies the embedded migrations. Configure it with WAL mode
    /// and a busy timeout (as [`connect`](Self::connect) does) if several connections or
    /// processes share the file.
    pub async fn from_pool(pool: SqlitePool) -> Result<Self> {
        let mut migrator = sqlx::migrate!("migrations/sqlite");
        migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
        // A database a later release migrated stays usable by this one (instances of both
        // run side by side during a rolling deploy, and a rollback returns to this one):
        // sourceflow's migrations only ever add what older releases can ignore.
        migrator.set_ignore_missing(true);
        // Processes opening a new file at the same time may both try to apply a migration;
        // the loser fails (SQLite has no migration lock) and then finds it applied.
        let mut attempt = 0;
        loop {
            match migrator.run(&pool).await {
                Ok(()) => break,
                Err(_) if attempt < 5 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                }
                Err(e) => return Err(migrate_error(STORE)(e)),
            }
        }
        Ok(SqliteIdempotencyStore { pool })
    }

    /// The connection pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// One claim attempt: insert, or take over a released claim or an expired lease (same
/// payload) or an expired completion, writing the attempts so far; otherwise change nothing
/// and return no row. (In `DO UPDATE`, bare column names are the existing record's values.)
/// Returns the attempts recorded.
async fn claim_row<'e>(
    e: impl SqliteExecutor<'e>,
    key: &str,
    payload_hash: &str,
    token: &str,
    lease: Duration,
) -> Result<Option<i64>> {
    sqlx::query_scalar(
        "INSERT INTO sourceflow_idempotency
             (key, payload_hash, state, token, lease_until, created_at, attempts)
         VALUES (?1, ?2, 'in_progress', ?3, ?4 + ?5, ?4, 0)
         ON CONFLICT (key) DO UPDATE SET
             payload_hash = excluded.payload_hash,
             state = 'in_progress',
             token = excluded.token,
             lease_until = excluded.lease_until,
             expires_at = NULL,
             outbox = NULL,
             created_at = excluded.created_at,
             attempts = CASE
                 WHEN state = 'completed' THEN 0
                 WHEN token IS NOT NULL THEN attempts + 1
                 ELSE attempts
             END
         WHERE (state = 'in_progress' AND payload_hash = excluded.payload_hash
                AND (token IS NULL OR lease_until <= excluded.created_at))
            OR (state = 'completed' AND expires_at <= excluded.created_at)
         RETURNING attempts",
    )
    .bind(key)
    .bind(payload_hash)
    .bind(token)
    .bind(now_millis())
    .bind(millis(lease))
    .fetch_optional(e)
    .await
    .map_err(store_error(STORE, "claim"))
}

/// The record in the way of a claim.
async fn existing_row<'e>(e: impl SqliteExecutor<'e>, key: &str) -> Result<Option<Existing>> {
    let row: Option<SqliteRow> = sqlx::query(
        "SELECT payload_hash, state, token, attempts, lease_until, expires_at, outbox
         FROM sourceflow_idempotency WHERE key = ?1",
    )
    .bind(key)
    .fetch_optional(e)
    .await
    .map_err(store_error(STORE, "claim"))?;
    let now = now_millis();
    row.map(|r| read_existing(&r, now))
        .transpose()
        .map_err(store_error(STORE, "claim"))
}

/// Completes a claim (on the pool, or inside a transaction: [`crate::tx`]). With an outbox,
/// a dispatch lease that `set_outbox` ends: `dispatch_lease` from now, or else the claim's
/// own lease (renewed by the heartbeat while the handlers ran).
pub(crate) async fn complete_row<'e>(
    e: impl SqliteExecutor<'e>,
    key: &str,
    token: &str,
    ttl: Duration,
    outbox: Option<&str>,
    dispatch_lease: Option<Duration>,
) -> Result<bool> {
    let now = now_millis();
    let done = sqlx::query(
        "UPDATE sourceflow_idempotency
         SET state = 'completed', token = NULL,
             lease_until = CASE WHEN ?4 IS NULL THEN NULL ELSE coalesce(?5, lease_until) END,
             expires_at = ?3, outbox = ?4
         WHERE key = ?1 AND token = ?2 AND state = 'in_progress'",
    )
    .bind(key)
    .bind(token)
    .bind(now + millis(ttl))
    .bind(outbox)
    .bind(dispatch_lease.map(|d| now + millis(d)))
    .execute(e)
    .await
    .map_err(store_error(STORE, "complete"))?;
    Ok(done.rows_affected() == 1)
}

/// Opens a transaction that holds the database's write lock from its first statement
/// (`BEGIN IMMEDIATE`), so that it never fails to upgrade a read lock halfway.
pub(crate) async fn begin(pool: &SqlitePool) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
    pool.begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(store_error(STORE, "begin"))
}

/// Claims `key` inside the transaction on `conn` (see [`crate::tx`]).
pub(crate) async fn claim_in(
    conn: &mut SqliteConnection,
    key: &str,
    payload_hash: &str,
    lease: Duration,
) -> Result<Claim> {
    let mut tries = ClaimTries::new(payload_hash);
    while let Some((token, _)) = tries.next_try() {
        let found = match claim_row(&mut *conn, key, payload_hash, &token, lease).await? {
            Some(attempts) => Attempt::Won { attempts },
            None => Attempt::Blocked(existing_row(&mut *conn, key).await?),
        };
        if let Some(claim) = tries.judge(token, found) {
            return Ok(claim);
        }
    }
    Ok(ClaimTries::contended())
}

/// Records what a rolled-back claim leaves to record (see [`crate::idempotency::sql`]).
pub(crate) async fn release_rolled_back(
    pool: &SqlitePool,
    key: &str,
    payload_hash: &str,
    why: Release,
) -> Result<()> {
    let now = now_millis();
    let query = match why {
        Release::Returned => return Ok(()),
        // Only a record nobody holds: a claimable one (released, or a dead worker's).
        Release::DeadLettered => sqlx::query(
            "DELETE FROM sourceflow_idempotency
             WHERE key = ?1 AND state = 'in_progress' AND (token IS NULL OR lease_until <= ?2)",
        )
        .bind(key)
        .bind(now),
        // The failed attempt, plus the dead worker's whose claim the rolled-back one took
        // over; a record a live claim holds is left alone.
        Release::Failed => sqlx::query(
            "INSERT INTO sourceflow_idempotency
                 (key, payload_hash, state, token, lease_until, created_at, attempts)
             VALUES (?1, ?2, 'in_progress', NULL, ?3, ?3, 1)
             ON CONFLICT (key) DO UPDATE SET
                 payload_hash = excluded.payload_hash,
                 state = 'in_progress',
                 token = NULL,
                 lease_until = excluded.lease_until,
                 expires_at = NULL,
                 outbox = NULL,
                 attempts = CASE
                     WHEN state = 'completed' THEN 1
                     WHEN token IS NOT NULL THEN attempts + 2
                     ELSE attempts + 1
                 END
             WHERE (state = 'in_progress' AND payload_hash = excluded.payload_hash
                    AND (token IS NULL OR lease_until <= excluded.created_at))
                OR (state = 'completed' AND expires_at <= excluded.created_at)",
        )
        .bind(key)
        .bind(payload_hash)
        .bind(now),
    };
    query
        .execute(pool)
        .await
        .map_err(store_error(STORE, "release"))?;
    Ok(())
}

fn read_existing(r: &SqliteRow, now: i64) -> std::result::Result<Existing, sqlx::Error> {
    Ok(Existing {
        payload_hash: r.try_get("payload_hash")?,
        state: r.try_get("state")?,
        token: r.try_get("token")?,
        attempts: Some(r.try_get::<i64, _>("attempts")?),
        lease_until: r.try_get("lease_until")?,
        expires_at: r.try_get("expires_at")?,
        outbox: r.try_get("outbox")?,
        now,
    })
}

fn is_busy(e: &sqlx::Error) -> bool {
    // SQLITE_BUSY (5) and its extended codes (e.g. 517, SQLITE_BUSY_SNAPSHOT); SQLITE_LOCKED (6).
    e.as_database_error()
        .and_then(|d| d.code())
        .and_then(|c| c.parse::<i32>().ok())
        .is_some_and(|c| matches!(c & 0xff, 5 | 6))
}

#[async_trait]
impl IdempotencyStore for SqliteIdempotencyStore {
    fn name(&self) -> &'static str {
        STORE
    }

    fn sql_pool(&self) -> Option<SqlPool> {
        Some(SqlPool::Sqlite(self.pool.clone()))
    }

    async fn claim(&self, key: &str, payload_hash: &str, lease: Duration) -> Result<Claim> {
        // The statement takes every kind of claimable record itself.
        claim_with(payload_hash, |token, _| async move {
            Ok(
                match claim_row(&self.pool, key, payload_hash, &token, lease).await? {
                    Some(attempts) => Attempt::Won { attempts },
                    None => Attempt::Blocked(existing_row(&self.pool, key).await?),
                },
            )
        })
        .await
    }

    async fn renew(&self, key: &str, token: &str, lease: Duration) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE sourceflow_idempotency SET lease_until = ?3
             WHERE key = ?1 AND token = ?2 AND state = 'in_progress'",
        )
        .bind(key)
        .bind(token)
        .bind(now_millis() + millis(lease))
        .execute(&self.pool)
        .await
        .map_err(store_error(STORE, "renew"))?;
        Ok(done.rows_affected() == 1)
    }

    async fn complete(
        &self,
        key: &str,
        token: &str,
        ttl: Duration,
        outbox: Option<&str>,
    ) -> Result<bool> {
        complete_row(&self.pool, key, token, ttl, outbox, None).await
    }

    async fn set_outbox(&self, key: &str, outbox: Option<&str>) -> Result<()> {
        sqlx::query(
            "UPDATE sourceflow_idempotency SET outbox = ?2, lease_until = NULL
             WHERE key = ?1 AND state = 'completed' AND outbox IS NOT NULL",
        )
        .bind(key)
        .bind(outbox)
        .execute(&self.pool)
        .await
        .map_err(store_error(STORE, "set_outbox"))?;
        Ok(())
    }

    async fn release(&self, key: &str, token: &str, why: Release) -> Result<()> {
        let query = match why {
            // A redrive from the dead-letter queue starts with a fresh count.
            Release::DeadLettered => sqlx::query(
                "DELETE FROM sourceflow_idempotency
                 WHERE key = ?1 AND token = ?2 AND state = 'in_progress'",
            )
            .bind(key)
            .bind(token),
            // Kept with its count, claimable at once by the next delivery.
            Release::Failed | Release::Returned => sqlx::query(
                "UPDATE sourceflow_idempotency
                 SET token = NULL, lease_until = ?3, attempts = attempts + ?4
                 WHERE key = ?1 AND token = ?2 AND state = 'in_progress'",
            )
            .bind(key)
            .bind(token)
            .bind(now_millis())
            .bind(i64::from(why == Release::Failed)),
        };
        query
            .execute(&self.pool)
            .await
            .map_err(store_error(STORE, "release"))?;
        Ok(())
    }

    async fn purge_expired(&self, batch: usize) -> Result<usize> {
        let now = now_millis();
        let done = sqlx::query(
            "DELETE FROM sourceflow_idempotency WHERE rowid IN (
                 SELECT rowid FROM sourceflow_idempotency
                 WHERE (state = 'completed' AND expires_at <= ?1)
                    OR (state = 'in_progress' AND lease_until < ?2)
                 LIMIT ?3)",
        )
        .bind(now)
        .bind(now - millis(ABANDONED_AFTER))
        .bind(i64::try_from(batch).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await
        .map_err(store_error(STORE, "purge_expired"))?;
        usize::try_from(done.rows_affected()).map_err(|e| Error::Store {
            store: STORE,
            operation: "purge_expired",
            source: Box::new(e),
        })
    }

    async fn size(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sourceflow_idempotency")
            .fetch_one(&self.pool)
            .await
            .map_err(store_error(STORE, "size"))?;
        u64::try_from(n).map_err(|e| Error::Store {
            store: STORE,
            operation: "size",
            source: Box::new(e),
        })
    }
}
