//! The PostgreSQL idempotency store: claims shared by every instance of a service.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnection, PgExecutor, PgPool, PgPoolOptions, PgRow};
use sqlx::Row;

use super::{migrate_error, store_error, ACQUIRE_TIMEOUT, MIGRATIONS_TABLE};
use crate::error::{Error, Result};
use crate::idempotency::record::{claim_with, millis, Attempt, ClaimTries, Existing};
use crate::idempotency::{Claim, IdempotencyStore, Release, ABANDONED_AFTER};
use crate::tx::SqlPool;

const STORE: &str = "postgres";

/// Connections in the pool opened by [`PostgresIdempotencyStore::connect`].
const MAX_CONNECTIONS: u32 = 10;

// Makes the compiler track the migrations, so that editing them rebuilds the crate.
const _: &str = include_str!("../../../migrations/postgres/0001_idempotency.sql");
const _: &str = include_str!("../../../migrations/postgres/0002_attempts.sql");
const _: &str = include_str!("../../../migrations/postgres/0003_outbox.sql");

/// Claims in a PostgreSQL table: for services that run as several instances, on one host
/// or many. Leases and expiries are judged by the database server's clock.
#[derive(Debug, Clone)]
pub struct PostgresIdempotencyStore {
    pool: PgPool,
}

impl PostgresIdempotencyStore {
    /// Connects to `url` (e.g. `postgres://user@host:5432/db`) and applies the embedded
    /// migrations. Built without TLS: reach the database over loopback or a private network,
    /// or bring a pool of your own to [`from_pool`](Self::from_pool).
    ///
    /// Every operation waits at most [`ACQUIRE_TIMEOUT`](super::ACQUIRE_TIMEOUT) for a
    /// connection, so an unreachable database fails claims within seconds, and this call
    /// too.
    pub async fn connect(url: &str) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect(url)
            .await
            .map_err(store_error(STORE, "connect"))?;
        Self::from_pool(pool).await
    }

    /// Uses an existing pool and applies the embedded migrations (under PostgreSQL's
    /// advisory lock, so instances starting together apply them once).
    pub async fn from_pool(pool: PgPool) -> Result<Self> {
        let mut migrator = sqlx::migrate!("migrations/postgres");
        migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
        // A database a later release migrated stays usable by this one (instances of both
        // run side by side during a rolling deploy, and a rollback returns to this one):
        // sourceflow's migrations only ever add what older releases can ignore.
        migrator.set_ignore_missing(true);
        migrator.run(&pool).await.map_err(migrate_error(STORE))?;
        Ok(PostgresIdempotencyStore { pool })
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// One claim attempt: insert, or take over a released claim or an expired lease (same
/// payload) or an expired completion, writing the attempts so far; otherwise change nothing
/// and return no row. A concurrent insert of the same key waits for the first to commit,
/// then sees its record. (`t.` is the existing record.) Returns the attempts recorded.
async fn claim_row<'e>(
    e: impl PgExecutor<'e>,
    key: &str,
    payload_hash: &str,
    token: &str,
    lease: Duration,
) -> Result<Option<i64>> {
    let won: Option<i32> = sqlx::query_scalar(
        "INSERT INTO sourceflow_idempotency AS t
             (key, payload_hash, state, token, lease_until, created_at, attempts)
         SELECT $1, $2, 'in_progress', $3, clock.ms + $4, clock.ms, 0
         FROM (SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS ms) AS clock
         ON CONFLICT (key) DO UPDATE SET
             payload_hash = EXCLUDED.payload_hash,
             state = 'in_progress',
             token = EXCLUDED.token,
             lease_until = EXCLUDED.lease_until,
             expires_at = NULL,
             outbox = NULL,
             created_at = EXCLUDED.created_at,
             attempts = CASE
                 WHEN t.state = 'completed' THEN 0
                 WHEN t.token IS NOT NULL THEN t.attempts + 1
                 ELSE t.attempts
             END
         WHERE (t.state = 'in_progress' AND t.payload_hash = EXCLUDED.payload_hash
                AND (t.token IS NULL OR t.lease_until <= EXCLUDED.created_at))
            OR (t.state = 'completed' AND t.expires_at <= EXCLUDED.created_at)
         RETURNING t.attempts",
    )
    .bind(key)
    .bind(payload_hash)
    .bind(token)
    .bind(millis(lease))
    .fetch_optional(e)
    .await
    .map_err(store_error(STORE, "claim"))?;
    Ok(won.map(i64::from))
}

/// The record in the way of a claim.
async fn existing_row<'e>(e: impl PgExecutor<'e>, key: &str) -> Result<Option<Existing>> {
    let row: Option<PgRow> = sqlx::query(
        "SELECT payload_hash, state, token, attempts, lease_until, expires_at, outbox,
                (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now
         FROM sourceflow_idempotency WHERE key = $1",
    )
    .bind(key)
    .fetch_optional(e)
    .await
    .map_err(store_error(STORE, "claim"))?;
    row.map(|r| read_existing(&r))
        .transpose()
        .map_err(store_error(STORE, "claim"))
}

/// Completes a claim (on the pool, or inside a transaction: [`crate::tx`]). With an outbox,
/// a dispatch lease that `set_outbox` ends: `dispatch_lease` from now, or else the claim's
/// own lease (renewed by the heartbeat while the handlers ran).
pub(crate) async fn complete_row<'e>(
    e: impl PgExecutor<'e>,
    key: &str,
    token: &str,
    ttl: Duration,
    outbox: Option<&str>,
    dispatch_lease: Option<Duration>,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE sourceflow_idempotency
         SET state = 'completed', token = NULL,
             lease_until = CASE WHEN $4::text IS NULL THEN NULL
                 ELSE coalesce((extract(epoch FROM clock_timestamp()) * 1000)::bigint + $5::bigint,
                               lease_until) END,
             expires_at = (extract(epoch FROM clock_timestamp()) * 1000)::bigint + $3,
             outbox = $4
         WHERE key = $1 AND token = $2 AND state = 'in_progress'",
    )
    .bind(key)
    .bind(token)
    .bind(millis(ttl))
    .bind(outbox)
    .bind(dispatch_lease.map(millis))
    .execute(e)
    .await
    .map_err(store_error(STORE, "complete"))?;
    Ok(done.rows_affected() == 1)
}

/// Claims `key` inside the transaction on `conn` (see [`crate::tx`]).
pub(crate) async fn claim_in(
    conn: &mut PgConnection,
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
    pool: &PgPool,
    key: &str,
    payload_hash: &str,
    why: Release,
) -> Result<()> {
    let query = match why {
        Release::Returned => return Ok(()),
        // Only a record nobody holds: a claimable one (released, or a dead worker's).
        Release::DeadLettered => sqlx::query(
            "DELETE FROM sourceflow_idempotency
             WHERE key = $1 AND state = 'in_progress' AND (token IS NULL
                   OR lease_until <= (extract(epoch FROM clock_timestamp()) * 1000)::bigint)",
        )
        .bind(key),
        // The failed attempt, plus the dead worker's whose claim the rolled-back one took
        // over; a record a live claim holds is left alone.
        Release::Failed => sqlx::query(
            "INSERT INTO sourceflow_idempotency AS t
                 (key, payload_hash, state, token, lease_until, created_at, attempts)
             SELECT $1, $2, 'in_progress', NULL, clock.ms, clock.ms, 1
             FROM (SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS ms) AS clock
             ON CONFLICT (key) DO UPDATE SET
                 payload_hash = EXCLUDED.payload_hash,
                 state = 'in_progress',
                 token = NULL,
                 lease_until = EXCLUDED.lease_until,
                 expires_at = NULL,
                 outbox = NULL,
                 attempts = CASE
                     WHEN t.state = 'completed' THEN 1
                     WHEN t.token IS NOT NULL THEN t.attempts + 2
                     ELSE t.attempts + 1
                 END
             WHERE (t.state = 'in_progress' AND t.payload_hash = EXCLUDED.payload_hash
                    AND (t.token IS NULL OR t.lease_until <= EXCLUDED.created_at))
                OR (t.state = 'completed' AND t.expires_at <= EXCLUDED.created_at)",
        )
        .bind(key)
        .bind(payload_hash),
    };
    query
        .execute(pool)
        .await
        .map_err(store_error(STORE, "release"))?;
    Ok(())
}

fn read_existing(r: &PgRow) -> std::result::Result<Existing, sqlx::Error> {
    Ok(Existing {
        payload_hash: r.try_get("payload_hash")?,
        state: r.try_get("state")?,
        token: r.try_get("token")?,
        attempts: Some(r.try_get::<i32, _>("attempts")?.into()),
        lease_until: r.try_get("lease_until")?,
        expires_at: r.try_get("expires_at")?,
        outbox: r.try_get("outbox")?,
        now: r.try_get("now")?,
    })
}

#[async_trait]
impl IdempotencyStore for PostgresIdempotencyStore {
    fn name(&self) -> &'static str {
        STORE
    }

    fn sql_pool(&self) -> Option<SqlPool> {
        Some(SqlPool::Postgres(self.pool.clone()))
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
            "UPDATE sourceflow_idempotency
             SET lease_until = (extract(epoch FROM clock_timestamp()) * 1000)::bigint + $3
             WHERE key = $1 AND token = $2 AND state = 'in_progress'",
        )
        .bind(key)
        .bind(token)
        .bind(millis(lease))
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
            "UPDATE sourceflow_idempotency SET outbox = $2, lease_until = NULL
             WHERE key = $1 AND state = 'completed' AND outbox IS NOT NULL",
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
                 WHERE key = $1 AND token = $2 AND state = 'in_progress'",
            )
            .bind(key)
            .bind(token),
            // Kept with its count, claimable at once by the next delivery.
            Release::Failed | Release::Returned => sqlx::query(
                "UPDATE sourceflow_idempotency
                 SET token = NULL,
                     lease_until = (extract(epoch FROM clock_timestamp()) * 1000)::bigint,
                     attempts = attempts + $3
                 WHERE key = $1 AND token = $2 AND state = 'in_progress'",
            )
            .bind(key)
            .bind(token)
            .bind(i32::from(why == Release::Failed)),
        };
        query
            .execute(&self.pool)
            .await
            .map_err(store_error(STORE, "release"))?;
        Ok(())
    }

    async fn purge_expired(&self, batch: usize) -> Result<usize> {
        // Instances cleaning up at the same time skip each other's rows instead of waiting;
        // a row a claim takes over meanwhile no longer matches and stays. The statement's
        // time (stable, unlike `clock_timestamp()`) lets both arms use their index.
        let done = sqlx::query(
            "DELETE FROM sourceflow_idempotency WHERE key IN (
                 SELECT key FROM sourceflow_idempotency
                 WHERE (state = 'completed'
                        AND expires_at <= (extract(epoch FROM statement_timestamp()) * 1000)::bigint)
                    OR (state = 'in_progress'
                        AND lease_until < (extract(epoch FROM statement_timestamp()) * 1000)::bigint - $2)
                 LIMIT $1
                 FOR UPDATE SKIP LOCKED)",
        )
        .bind(i64::try_from(batch).unwrap_or(i64::MAX))
        .bind(millis(ABANDONED_AFTER))
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
