//! Transactional handlers (`&mut Tx<DB>`, see `sourceflow::tx`): the handler's writes, the
//! message's claim and what it raises commit together; a failure rolls all of it back and
//! still spends an attempt; a duplicate of a committed message runs nothing. The same
//! tests on SQLite and on PostgreSQL (its server from `tests/support/postgres.sh`).
//!
//! Nothing here may be masked by the store's ordinary idempotency: the effects are counted
//! in the handler's own table, in its transaction, and the event consumer runs without
//! idempotency so that every delivery it gets is counted.

#![cfg(any(feature = "sqlite", feature = "postgres"))]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::harness::{eventually, Harness};

/// How many times the handler ran, per message.
#[derive(Clone, Default)]
pub struct Runs(Arc<Mutex<HashMap<String, u32>>>);

impl Runs {
    pub fn bump(&self, id: &str) -> u32 {
        let mut m = self.0.lock().expect("runs");
        let n = m.entry(id.to_string()).or_default();
        *n += 1;
        *n
    }
    pub fn of(&self, id: &str) -> u32 {
        self.0.lock().expect("runs").get(id).copied().unwrap_or(0)
    }
}

/// The suite for one database: `$db` the sqlx database, `$pool` its pool type, `$p1..` its
/// placeholders.
macro_rules! transactional_suite {
    ($m:ident, $db:ty, $pool:ty, $queue:literal, $topic:literal, $insert:literal, $count:literal, $runs_of:literal) => {
        pub mod $m {
            use super::*;
            use serde::{Deserialize, Serialize};
            use sourceflow::{command, event, handler, Context, State, Tx};

            pub const MODULE: &str = module_path!();

            #[command(queue = $queue, name = $queue)]
            #[derive(Debug, Clone, Serialize, Deserialize)]
            pub struct Record {
                pub test: String,
                pub id: String,
                /// Runs that fail (after writing) before one succeeds.
                pub fail_times: u32,
            }

            #[event(topic = $topic, name = $topic)]
            #[derive(Debug, Clone, Serialize, Deserialize)]
            pub struct Recorded {
                pub id: String,
            }

            #[handler]
            async fn record(
                cmd: Record,
                tx: &mut Tx<$db>,
                ctx: &Context,
                State(runs): State<Runs>,
            ) -> sourceflow::Result<()> {
                let run = runs.bump(&cmd.id);
                sqlx::query($insert)
                    .bind(&cmd.test)
                    .bind(&cmd.id)
                    .bind(i64::from(run))
                    .execute(&mut **tx)
                    .await
                    .map_err(sourceflow::Error::other)?;
                ctx.raise(Recorded { id: cmd.id.clone() }).await?;
                if run <= cmd.fail_times {
                    return Err(sourceflow::Error::other("refused after writing"));
                }
                Ok(())
            }

            pub mod consumer {
                use super::*;
                pub const MODULE: &str = module_path!();

                #[handler]
                async fn recorded(
                    evt: Recorded,
                    State(runs): State<Runs>,
                ) -> sourceflow::Result<()> {
                    runs.bump(&evt.id);
                    Ok(())
                }
            }

            pub async fn effects(pool: &$pool, test: &str, id: &str) -> i64 {
                sqlx::query_scalar($count)
                    .bind(test)
                    .bind(id)
                    .fetch_one(pool)
                    .await
                    .expect("count effects")
            }

            pub async fn runs_written(pool: &$pool, test: &str, id: &str) -> Vec<i64> {
                sqlx::query_scalar($runs_of)
                    .bind(test)
                    .bind(id)
                    .fetch_all(pool)
                    .await
                    .expect("runs written")
            }

            /// A failure rolls back the handler's writes and its raised event, and spends an
            /// attempt: a message failing twice commits once, on its third run; one that
            /// always fails is dead-lettered after exactly `max_receive_count` runs, with
            /// nothing written. A duplicate of a committed message runs nothing.
            pub async fn writes_commit_once(h: &Harness, store: sourceflow::Builder, pool: $pool) {
                let test = h.prefix.clone();
                let runs = Runs::default();
                let seen = Runs::default();
                let consumer = h
                    .service("tx-consumer", consumer::MODULE)
                    .without_idempotency()
                    .state(seen.clone())
                    .start()
                    .await
                    .expect("consumer");
                let app = store
                    .state(runs.clone())
                    .max_receive_count(3)
                    .start()
                    .await
                    .expect("start");
                let opts =
                    |id: &str| sourceflow::SendOptions::new().message_id(format!("{test}-{id}"));
                for (id, fail_times) in [("ok", 0), ("twice", 2), ("never", 99)] {
                    let cmd = Record {
                        test: test.clone(),
                        id: id.into(),
                        fail_times,
                    };
                    app.send_with(cmd, opts(id)).await.expect("send");
                }
                let dlq = sourceflow::naming::Naming::dead_letter(&app.queue_of::<Record>());
                let dead = h.drain(&dlq, 1).await;
                assert_eq!(dead.len(), 1, "the always-failing message is dead-lettered");
                eventually("the two good messages committed", || async {
                    effects(&pool, &test, "ok").await == 1
                        && effects(&pool, &test, "twice").await == 1
                })
                .await;
                eventually("their events", || async {
                    seen.of("ok") >= 1 && seen.of("twice") >= 1
                })
                .await;
                // Duplicates of committed messages (same id, same payload; even one arriving
                // while the first delivery's event is still going out): the handler does not
                // run again and the event is not sent again.
                for (id, fail_times) in [("ok", 0), ("twice", 2)] {
                    let cmd = Record {
                        test: test.clone(),
                        id: id.into(),
                        fail_times,
                    };
                    app.send_with(cmd, opts(id)).await.expect("resend");
                }
                tokio::time::sleep(Duration::from_secs(3)).await;
                assert_eq!(
                    app.idempotency_stats().expect("stats").duplicates,
                    2,
                    "both resends were recognised as duplicates"
                );
                assert_eq!(
                    runs.of("ok"),
                    1,
                    "a duplicate of a committed message ran the handler"
                );
                assert_eq!(runs.of("twice"), 3);
                assert_eq!(
                    runs.of("never"),
                    3,
                    "every rolled-back run spent an attempt"
                );
                assert_eq!(
                    runs_written(&pool, &test, "twice").await,
                    vec![3],
                    "only the committed run's write is there"
                );
                assert_eq!(
                    effects(&pool, &test, "never").await,
                    0,
                    "a dead-lettered message wrote nothing"
                );
                assert_eq!(seen.of("ok"), 1, "one event per committed message");
                assert_eq!(seen.of("twice"), 1, "a failed run's event was not sent");
                assert_eq!(seen.of("never"), 0);
                app.shutdown().await.expect("shutdown");
                consumer.shutdown().await.expect("shutdown");
            }

            /// A transactional handler needs its database's store: any other is refused at
            /// start, with a message that names the handler and the fix.
            pub async fn another_store_is_refused(h: &Harness) {
                let err = h
                    .service("tx-wrong-store", MODULE)
                    .state(Runs::default())
                    .idempotency(sourceflow::idempotency::MemoryIdempotencyStore::new())
                    .start()
                    .await
                    .expect_err("a memory store cannot open a transaction");
                let text = err.to_string();
                assert!(
                    text.contains("record") && text.contains("takes `Tx<"),
                    "{text}"
                );
                assert!(text.contains("the store is `memory`"), "{text}");
            }
        }
    };
}

const TABLE_SQLITE: &str = "CREATE TABLE IF NOT EXISTS tx_effects (test TEXT NOT NULL, id TEXT NOT NULL, run INTEGER NOT NULL)";
const TABLE_POSTGRES: &str = "CREATE TABLE IF NOT EXISTS tx_effects (test TEXT NOT NULL, id TEXT NOT NULL, run BIGINT NOT NULL)";

#[cfg(feature = "sqlite")]
transactional_suite!(
    sqlite,
    sqlx::Sqlite,
    sqlx::SqlitePool,
    "tx-sqlite-records",
    "tx-sqlite-recorded",
    "INSERT INTO tx_effects (test, id, run) VALUES (?1, ?2, ?3)",
    "SELECT count(*) FROM tx_effects WHERE test = ?1 AND id = ?2",
    "SELECT run FROM tx_effects WHERE test = ?1 AND id = ?2 ORDER BY run"
);

#[cfg(feature = "postgres")]
transactional_suite!(
    postgres,
    sqlx::Postgres,
    sqlx::PgPool,
    "tx-postgres-records",
    "tx-postgres-recorded",
    "INSERT INTO tx_effects (test, id, run) VALUES ($1, $2, $3)",
    "SELECT count(*) FROM tx_effects WHERE test = $1 AND id = $2",
    "SELECT run FROM tx_effects WHERE test = $1 AND id = $2 ORDER BY run"
);

#[cfg(feature = "sqlite")]
async fn sqlite_pool() -> sqlx::SqlitePool {
    let store = crate::harness::fresh_sqlite("tx").await;
    let pool = store.pool().clone();
    sqlx::query(TABLE_SQLITE)
        .execute(&pool)
        .await
        .expect("table");
    pool
}

#[cfg(feature = "postgres")]
async fn postgres_pool() -> Option<sqlx::PgPool> {
    let url = crate::postgres::server_url()?;
    let pool = sqlx::PgPool::connect(&url).await.expect("postgres");
    sqlx::query(TABLE_POSTGRES)
        .execute(&pool)
        .await
        .expect("table");
    Some(pool)
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_writes_claim_and_events_commit_once() {
    let h = Harness::new().await;
    let pool = sqlite_pool().await;
    let app = h.service("tx-sqlite", sqlite::MODULE).sqlite(pool.clone());
    sqlite::writes_commit_once(&h, app, pool).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_handler_refuses_another_store() {
    sqlite::another_store_is_refused(&Harness::new().await).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_writes_claim_and_events_commit_once() {
    let Some(pool) = postgres_pool().await else {
        return;
    };
    let h = Harness::new().await;
    let app = h
        .service("tx-postgres", postgres::MODULE)
        .postgres(pool.clone());
    postgres::writes_commit_once(&h, app, pool).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_handler_refuses_another_store() {
    postgres::another_store_is_refused(&Harness::new().await).await;
}
