//! The outbox's statements, on PostgreSQL and SQLite.

use std::time::Duration;

use super::{kind_label, kind_of, Row};
use crate::idempotency::record::millis;
#[cfg(feature = "sqlite")]
use crate::idempotency::record::now_millis;
use crate::tx::SqlPool;

type SqlResult<T> = std::result::Result<T, sqlx::Error>;

/// A row a relay leased, to send.
#[derive(Debug, Clone)]
pub(crate) struct Leased {
    pub id: i64,
    pub row: Row,
}

/// PostgreSQL's advisory lock that serializes the relays' leasing (a few milliseconds,
/// no network call inside): with it, no two relays lease rows of one ordering key.
#[cfg(feature = "postgres")]
const LEASE_LOCK: i64 = 0x736f_7572_6365_6f62; // "sourceob"

/// The channel `outbox::send` notifies on PostgreSQL (delivered at the commit).
#[cfg(feature = "postgres")]
pub(crate) const CHANNEL: &str = "sourceflow_outbox";

/// Stores a row in the application's PostgreSQL transaction.
#[cfg(feature = "postgres")]
pub(crate) async fn insert_postgres(conn: &mut sqlx::PgConnection, row: &Row) -> SqlResult<()> {
    if let Some(key) = &row.ordering_key {
        // Transactions storing messages of one key commit one after the other: this row
        // is locked until the commit.
        sqlx::query(
            "INSERT INTO sourceflow_outbox_keys (ordering_key, stored) VALUES ($1, 1)
             ON CONFLICT (ordering_key) DO UPDATE SET stored = sourceflow_outbox_keys.stored + 1",
        )
        .bind(key)
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query(
        "INSERT INTO sourceflow_outbox
             (message_id, kind, wire_name, destination, body, attributes, group_id, dedup_id,
              delay_ms, ordering_key, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                 (extract(epoch FROM clock_timestamp()) * 1000)::bigint)",
    )
    .bind(&row.message_id)
    .bind(kind_label(row.kind))
    .bind(&row.wire_name)
    .bind(&row.destination)
    .bind(&row.body)
    .bind(&row.attributes)
    .bind(&row.group_id)
    .bind(&row.dedup_id)
    .bind(row.delay_ms)
    .bind(&row.ordering_key)
    .execute(&mut *conn)
    .await?;
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(CHANNEL)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Stores a row in the application's SQLite transaction.
#[cfg(feature = "sqlite")]
pub(crate) async fn insert_sqlite(conn: &mut sqlx::SqliteConnection, row: &Row) -> SqlResult<()> {
    sqlx::query(
        "INSERT INTO sourceflow_outbox
             (message_id, kind, wire_name, destination, body, attributes, group_id, dedup_id,
              delay_ms, ordering_key, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )
    .bind(&row.message_id)
    .bind(kind_label(row.kind))
    .bind(&row.wire_name)
    .bind(&row.destination)
    .bind(&row.body)
    .bind(&row.attributes)
    .bind(&row.group_id)
    .bind(&row.dedup_id)
    .bind(row.delay_ms)
    .bind(&row.ordering_key)
    .bind(now_millis())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The rows a lease may take, oldest first: due (never leased, or the lease or backoff
/// over), and of no ordering key another row of which is leased or backing off.
const DUE: &str = "SELECT o.id FROM sourceflow_outbox o
     WHERE (o.leased_until IS NULL OR o.leased_until <= :now)
       AND (o.ordering_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM sourceflow_outbox b
            WHERE b.ordering_key = o.ordering_key AND b.leased_until > :now))
     ORDER BY o.id LIMIT :limit";

const RETURNING: &str = "RETURNING id, message_id, kind, wire_name, destination, body, attributes,
     group_id, dedup_id, delay_ms, ordering_key";

/// Leases up to `limit` due rows for `lease` under `token`, oldest first.
pub(crate) async fn lease(
    pool: &SqlPool,
    token: &str,
    limit: usize,
    lease: Duration,
) -> SqlResult<Vec<Leased>> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    match pool {
        #[cfg(feature = "postgres")]
        SqlPool::Postgres(p) => {
            let mut tx = p.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(LEASE_LOCK)
                .execute(&mut *tx)
                .await?;
            // One instant for the whole statement (`clock_timestamp()` moves while it runs:
            // a lease expiring between the check of a row and that of its key's blocker let
            // a later row of the key go ahead of an earlier one).
            let now = "(extract(epoch FROM statement_timestamp()) * 1000)::bigint";
            let due = DUE.replace(":now", now).replace(":limit", "$1");
            let sql = format!(
                "UPDATE sourceflow_outbox SET leased_until = {now} + $2, lease_token = $3,
                     attempts = attempts + 1
                 WHERE id IN ({due}) {RETURNING}"
            );
            let rows: Vec<sqlx::postgres::PgRow> = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(limit)
                .bind(millis(lease))
                .bind(token)
                .fetch_all(&mut *tx)
                .await?;
            tx.commit().await?;
            // RETURNING follows the plan, not `id`: send in `id` order.
            let mut out: Vec<Leased> = rows.iter().map(read).collect::<SqlResult<_>>()?;
            out.sort_by_key(|l| l.id);
            Ok(out)
        }
        #[cfg(feature = "sqlite")]
        SqlPool::Sqlite(p) => {
            let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
            let due = DUE.replace(":now", "?4").replace(":limit", "?1");
            let sql = format!(
                "UPDATE sourceflow_outbox SET leased_until = ?4 + ?2, lease_token = ?3,
                     attempts = attempts + 1
                 WHERE id IN ({due}) {RETURNING}"
            );
            let rows: Vec<sqlx::sqlite::SqliteRow> = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(limit)
                .bind(millis(lease))
                .bind(token)
                .bind(now_millis())
                .fetch_all(&mut *tx)
                .await?;
            tx.commit().await?;
            // SQLite returns the updated rows in no particular order.
            let mut out: Vec<Leased> = rows.iter().map(read).collect::<SqlResult<_>>()?;
            out.sort_by_key(|l| l.id);
            Ok(out)
        }
    }
}

/// A leased row, from either database's row type.
fn read<'r, R>(r: &'r R) -> SqlResult<Leased>
where
    R: sqlx::Row,
    &'r str: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(Leased {
        id: r.try_get("id")?,
        row: Row {
            message_id: r.try_get("message_id")?,
            kind: kind_of(&r.try_get::<String, _>("kind")?),
            wire_name: r.try_get("wire_name")?,
            destination: r.try_get("destination")?,
            body: r.try_get("body")?,
            attributes: r.try_get("attributes")?,
            group_id: r.try_get("group_id")?,
            dedup_id: r.try_get("dedup_id")?,
            delay_ms: r.try_get("delay_ms")?,
            ordering_key: r.try_get("ordering_key")?,
        },
    })
}

/// Deletes the rows the broker accepted (still under this relay's lease).
pub(crate) async fn delete_sent(pool: &SqlPool, token: &str, ids: &[i64]) -> SqlResult<()> {
    if ids.is_empty() {
        return Ok(());
    }
    match pool {
        #[cfg(feature = "postgres")]
        SqlPool::Postgres(p) => {
            sqlx::query("DELETE FROM sourceflow_outbox WHERE lease_token = $1 AND id = ANY($2)")
                .bind(token)
                .bind(ids)
                .execute(p)
                .await?;
        }
        #[cfg(feature = "sqlite")]
        SqlPool::Sqlite(p) => {
            let list = serde_json::to_string(ids).unwrap_or_else(|_| "[]".into());
            sqlx::query(
                "DELETE FROM sourceflow_outbox
                 WHERE lease_token = ?1 AND id IN (SELECT value FROM json_each(?2))",
            )
            .bind(token)
            .bind(list)
            .execute(p)
            .await?;
        }
    }
    Ok(())
}

/// Gives rows that were not sent back, due again after `backoff` (their ordering keys wait
/// meanwhile), with the reason.
pub(crate) async fn back_off(
    pool: &SqlPool,
    token: &str,
    ids: &[i64],
    backoff: Duration,
    error: &str,
) -> SqlResult<()> {
    if ids.is_empty() {
        return Ok(());
    }
    match pool {
        #[cfg(feature = "postgres")]
        SqlPool::Postgres(p) => {
            sqlx::query(
                "UPDATE sourceflow_outbox SET lease_token = NULL, last_error = $4,
                     leased_until = (extract(epoch FROM clock_timestamp()) * 1000)::bigint + $3
                 WHERE lease_token = $1 AND id = ANY($2)",
            )
            .bind(token)
            .bind(ids)
            .bind(millis(backoff))
            .bind(error)
            .execute(p)
            .await?;
        }
        #[cfg(feature = "sqlite")]
        SqlPool::Sqlite(p) => {
            let list = serde_json::to_string(ids).unwrap_or_else(|_| "[]".into());
            sqlx::query(
                "UPDATE sourceflow_outbox SET lease_token = NULL, last_error = ?4,
                     leased_until = ?5 + ?3
                 WHERE lease_token = ?1 AND id IN (SELECT value FROM json_each(?2))",
            )
            .bind(token)
            .bind(list)
            .bind(millis(backoff))
            .bind(error)
            .bind(now_millis())
            .execute(p)
            .await?;
        }
    }
    Ok(())
}

/// Deletes the ordering keys no row uses any more (PostgreSQL; SQLite keeps none).
pub(crate) async fn prune_keys(pool: &SqlPool) -> SqlResult<u64> {
    match pool {
        #[cfg(feature = "postgres")]
        SqlPool::Postgres(p) => Ok(sqlx::query(
            "DELETE FROM sourceflow_outbox_keys k WHERE NOT EXISTS (
                 SELECT 1 FROM sourceflow_outbox o WHERE o.ordering_key = k.ordering_key)",
        )
        .execute(p)
        .await?
        .rows_affected()),
        #[cfg(feature = "sqlite")]
        SqlPool::Sqlite(_) => Ok(0),
    }
}

/// Rows waiting to be sent (sent rows are deleted).
pub(crate) async fn backlog(pool: &SqlPool) -> SqlResult<i64> {
    let q = "SELECT count(*) FROM sourceflow_outbox";
    match pool {
        #[cfg(feature = "postgres")]
        SqlPool::Postgres(p) => sqlx::query_scalar(q).fetch_one(p).await,
        #[cfg(feature = "sqlite")]
        SqlPool::Sqlite(p) => sqlx::query_scalar(q).fetch_one(p).await,
    }
}
