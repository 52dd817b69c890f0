//! Idempotent processing: the same message delivered many times, to several competing
//! instances, has its effect once; an in-progress duplicate waits; a reused id with another
//! payload is refused.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::idempotency::{IdempotencyStore, MemoryIdempotencyStore};
use sourceflow::naming::Naming;
use sourceflow::{command, handler, SendOptions, State};

use crate::harness::{dlq_reason, eventually, Harness};

#[command(queue = "idem-payments", name = "tests.CapturePayment.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CapturePayment {
    payment_id: u64,
    cents: u64,
    slow_ms: u64,
}

#[derive(Clone, Default)]
struct Ledger {
    captures: Arc<AtomicU32>,
    cents: Arc<AtomicU32>,
}

mod plain {
    use super::*;
    pub const MODULE: &str = module_path!();

    #[handler]
    async fn capture(cmd: CapturePayment, State(l): State<Ledger>) -> sourceflow::Result<()> {
        tokio::time::sleep(Duration::from_millis(cmd.slow_ms)).await;
        l.captures.fetch_add(1, Ordering::SeqCst);
        l.cents.fetch_add(cmd.cents as u32, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_deliveries_to_four_instances_have_one_effect() {
    let h = Harness::new().await;
    let ledger = Ledger::default();
    let store: Arc<dyn IdempotencyStore> = Arc::new(MemoryIdempotencyStore::new());
    let mut instances = Vec::new();
    for _ in 0..4 {
        instances.push(
            h.service("idem", plain::MODULE)
                .state(ledger.clone())
                .idempotency_arc(store.clone())
                .concurrency(5)
                .start()
                .await
                .expect("start"),
        );
    }
    let id = uuid::Uuid::new_v4().to_string();
    let cmd = CapturePayment {
        payment_id: 1,
        cents: 500,
        slow_ms: 20,
    };
    // The producer re-sends the same message 20 times (a standard queue does not dedupe).
    let sends = (0..20).map(|i| {
        let app = instances[i % 4].clone();
        let cmd = cmd.clone();
        let id = id.clone();
        async move {
            app.send_with(cmd, SendOptions::new().message_id(id))
                .await
                .expect("send")
        }
    });
    futures_util::future::join_all(sends).await;
    let queue = instances[0].queue_of::<CapturePayment>();
    eventually("all 20 deliveries acknowledged", || async {
        let stats: u64 = instances
            .iter()
            .map(|i| i.idempotency_stats().expect("stats").duplicates)
            .sum();
        stats == 19
    })
    .await;
    assert_eq!(
        ledger.captures.load(Ordering::SeqCst),
        1,
        "the effect happened once"
    );
    assert_eq!(ledger.cents.load(Ordering::SeqCst), 500);
    let unique: u64 = instances
        .iter()
        .map(|i| i.idempotency_stats().expect("stats").unique)
        .sum();
    assert_eq!(unique, 1);
    h.assert_empty(&queue, Duration::from_millis(300)).await;
    h.assert_empty(&Naming::dead_letter(&queue), Duration::from_millis(100))
        .await;
    assert_eq!(store.size().await.expect("size"), 1);
    for app in instances {
        app.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_progress_duplicate_is_deferred_then_acknowledged() {
    let h = Harness::new().await;
    let ledger = Ledger::default();
    let app = h
        .service("idem-defer", plain::MODULE)
        .state(ledger.clone())
        .start()
        .await
        .expect("start");
    let id = uuid::Uuid::new_v4().to_string();
    let cmd = CapturePayment {
        payment_id: 2,
        cents: 100,
        slow_ms: 1500,
    };
    app.send_with(cmd.clone(), SendOptions::new().message_id(id.clone()))
        .await
        .expect("send");
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.send_with(cmd, SendOptions::new().message_id(id))
        .await
        .expect("send duplicate");
    eventually(
        "the duplicate was deferred while the original ran",
        || async { app.idempotency_stats().expect("stats").deferred >= 1 },
    )
    .await;
    assert_eq!(
        ledger.captures.load(Ordering::SeqCst),
        0,
        "the original is still running"
    );
    eventually(
        "the duplicate is acknowledged after the original completes",
        || async { app.idempotency_stats().expect("stats").duplicates == 1 },
    )
    .await;
    assert_eq!(ledger.captures.load(Ordering::SeqCst), 1);
    h.assert_empty(
        &app.queue_of::<CapturePayment>(),
        Duration::from_millis(300),
    )
    .await;
    app.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_id_with_another_payload_goes_to_the_dlq() {
    let h = Harness::new().await;
    let ledger = Ledger::default();
    let app = h
        .service("idem-mismatch", plain::MODULE)
        .state(ledger.clone())
        .start()
        .await
        .expect("start");
    let id = uuid::Uuid::new_v4().to_string();
    app.send_with(
        CapturePayment {
            payment_id: 3,
            cents: 100,
            slow_ms: 0,
        },
        SendOptions::new().message_id(id.clone()),
    )
    .await
    .expect("send");
    eventually("first handled", || async {
        ledger.captures.load(Ordering::SeqCst) == 1
    })
    .await;
    app.send_with(
        CapturePayment {
            payment_id: 3,
            cents: 999_999,
            slow_ms: 0,
        },
        SendOptions::new().message_id(id.clone()),
    )
    .await
    .expect("send");
    let dlq = Naming::dead_letter(&app.queue_of::<CapturePayment>());
    let dead = h.drain(&dlq, 1).await;
    assert_eq!(dead.len(), 1);
    let reason = dlq_reason(&dead[0]).expect("reason");
    assert!(
        reason.contains(&id) && reason.contains("different payload"),
        "{reason}"
    );
    assert!(
        dead[0].body.contains("999999"),
        "the refused message is kept whole"
    );
    assert_eq!(
        ledger.cents.load(Ordering::SeqCst),
        100,
        "the second payload never ran"
    );
    assert_eq!(app.idempotency_stats().expect("stats").mismatches, 1);
    app.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_key_catches_resends_under_new_ids() {
    let h = Harness::new().await;
    let ledger = Ledger::default();
    let app = h
        .service("idem-business", plain::MODULE)
        .state(ledger.clone())
        .idempotency_key_for::<CapturePayment, _>(|c| c.payment_id)
        .start()
        .await
        .expect("start");
    let capture = |cents| CapturePayment {
        payment_id: 77,
        cents,
        slow_ms: 0,
    };
    // The producer retries the same payment three times, minting a new id each time.
    for _ in 0..3 {
        app.send(capture(250)).await.expect("send");
    }
    eventually("the re-sends are recognised", || async {
        app.idempotency_stats().expect("stats").duplicates == 2
    })
    .await;
    assert_eq!(ledger.captures.load(Ordering::SeqCst), 1, "captured once");

    // Another payment id is another operation.
    app.send(CapturePayment {
        payment_id: 78,
        cents: 1,
        slow_ms: 0,
    })
    .await
    .expect("send");
    eventually("the other payment ran", || async {
        ledger.captures.load(Ordering::SeqCst) == 2
    })
    .await;

    // The same payment id with another amount is refused, whole, with the reason.
    app.send(capture(999_999)).await.expect("send");
    let dlq = Naming::dead_letter(&app.queue_of::<CapturePayment>());
    let dead = h.drain(&dlq, 1).await;
    assert_eq!(dead.len(), 1);
    let reason = dlq_reason(&dead[0]).expect("reason");
    assert!(
        reason.contains("idem-business:tests.CapturePayment.v1:77")
            && reason.contains("different payload"),
        "{reason}"
    );
    assert_eq!(
        ledger.cents.load(Ordering::SeqCst),
        251,
        "the refused amount never ran"
    );

    // A payload without the key's field cannot be keyed: moved aside with the reason.
    let queue = app.queue_of::<CapturePayment>();
    h.send_raw(
        &queue,
        r#"{"v":1,"type":"tests.CapturePayment.v1","id":"no-key","payload":{"cents":5}}"#,
        &[(sourceflow::envelope::attr::TYPE, "tests.CapturePayment.v1")],
        None,
    )
    .await;
    let dead = h.drain(&dlq, 1).await;
    assert_eq!(dead.len(), 1);
    let reason = dlq_reason(&dead[0]).expect("reason");
    assert!(
        reason.contains("needed for its idempotency key") && reason.contains("payment_id"),
        "{reason}"
    );
    app.shutdown().await.expect("shutdown");
}

// ---- durable stores: a database row as the side effect, restarts ---------------------------

#[cfg(any(feature = "sqlite", feature = "postgres", feature = "dynamodb"))]
mod durable {
    use super::*;
    use sourceflow::Handle;

    #[command(queue = "idem-db-ledger", name = "tests.PostEntry.v1")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct PostEntry {
        pub entry: String,
    }

    /// The side effect: a counter row per entry in the store's own database.
    #[derive(Clone)]
    pub enum Effects {
        #[cfg(feature = "sqlite")]
        Sqlite(sqlx::SqlitePool),
        #[cfg(feature = "postgres")]
        Postgres(sqlx::PgPool),
        /// An item per entry with a counter attribute, in a table next to the claims.
        #[cfg(feature = "dynamodb")]
        DynamoDb {
            client: aws_sdk_dynamodb::Client,
            table: String,
        },
    }

    impl Effects {
        async fn setup(&self) {
            let ddl = "CREATE TABLE IF NOT EXISTS test_effects (entry TEXT PRIMARY KEY, n BIGINT NOT NULL)";
            match self {
                #[cfg(feature = "sqlite")]
                Effects::Sqlite(p) => {
                    sqlx::query(ddl).execute(p).await.expect("ddl");
                }
                #[cfg(feature = "postgres")]
                Effects::Postgres(p) => {
                    // Concurrent `CREATE TABLE IF NOT EXISTS` can race in PostgreSQL's
                    // catalog; the loser retries and finds the table.
                    for attempt in 0.. {
                        match sqlx::query(ddl).execute(p).await {
                            Ok(_) => break,
                            Err(e) if attempt < 5 => {
                                let _ = e;
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            Err(e) => panic!("ddl: {e}"),
                        }
                    }
                }
                #[cfg(feature = "dynamodb")]
                Effects::DynamoDb { client, table } => {
                    // A table like the claims' one (string key `id`), made by the store.
                    sourceflow::idempotency::DynamoDbIdempotencyStore::open(
                        client.clone(),
                        table,
                        sourceflow::transport::aws::ProvisionMode::Create,
                    )
                    .await
                    .expect("effects table");
                }
            }
        }

        async fn bump(&self, entry: &str) -> sourceflow::Result<()> {
            let sql = "INSERT INTO test_effects (entry, n) VALUES ($1, 1) ON CONFLICT (entry) DO UPDATE SET n = test_effects.n + 1";
            match self {
                #[cfg(feature = "sqlite")]
                Effects::Sqlite(p) => sqlx::query(sql)
                    .bind(entry)
                    .execute(p)
                    .await
                    .map(|_| ())
                    .map_err(sourceflow::Error::other),
                #[cfg(feature = "postgres")]
                Effects::Postgres(p) => sqlx::query(sql)
                    .bind(entry)
                    .execute(p)
                    .await
                    .map(|_| ())
                    .map_err(sourceflow::Error::other),
                #[cfg(feature = "dynamodb")]
                Effects::DynamoDb { client, table } => {
                    use aws_sdk_dynamodb::types::AttributeValue;
                    client
                        .update_item()
                        .table_name(table)
                        .key("id", AttributeValue::S(entry.into()))
                        .update_expression("ADD n :one")
                        .expression_attribute_values(":one", AttributeValue::N("1".into()))
                        .send()
                        .await
                        .map(|_| ())
                        .map_err(|e| {
                            sourceflow::Error::other(
                                aws_sdk_dynamodb::error::DisplayErrorContext(e).to_string(),
                            )
                        })
                }
            }
        }

        pub async fn count(&self, entry: &str) -> i64 {
            let sql = "SELECT n FROM test_effects WHERE entry = $1";
            let n: Option<i64> = match self {
                #[cfg(feature = "sqlite")]
                Effects::Sqlite(p) => sqlx::query_scalar(sql)
                    .bind(entry)
                    .fetch_optional(p)
                    .await
                    .expect("count"),
                #[cfg(feature = "postgres")]
                Effects::Postgres(p) => sqlx::query_scalar(sql)
                    .bind(entry)
                    .fetch_optional(p)
                    .await
                    .expect("count"),
                #[cfg(feature = "dynamodb")]
                Effects::DynamoDb { client, table } => {
                    use aws_sdk_dynamodb::types::AttributeValue;
                    let _ = sql;
                    let item = client
                        .get_item()
                        .table_name(table)
                        .key("id", AttributeValue::S(entry.into()))
                        .consistent_read(true)
                        .send()
                        .await
                        .expect("count")
                        .item;
                    item.and_then(|i| match i.get("n") {
                        Some(AttributeValue::N(n)) => n.parse().ok(),
                        _ => None,
                    })
                }
            };
            n.unwrap_or(0)
        }
    }

    #[handler]
    async fn post_entry(cmd: PostEntry, State(fx): State<Effects>) -> sourceflow::Result<()> {
        // Slow enough that duplicates overlap with the original.
        tokio::time::sleep(Duration::from_millis(30)).await;
        fx.bump(&cmd.entry).await
    }

    async fn instances(
        h: &Harness,
        store: Arc<dyn IdempotencyStore>,
        fx: &Effects,
        n: usize,
    ) -> Vec<Handle> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(
                h.service("idem-db", module_path!())
                    .state(fx.clone())
                    .idempotency_arc(store.clone())
                    .concurrency(5)
                    .start()
                    .await
                    .expect("start"),
            );
        }
        out
    }

    /// The same message delivered 20 times across 4 competing instances changes the row once.
    pub async fn twenty_deliveries_one_row_update(store: Arc<dyn IdempotencyStore>, fx: Effects) {
        fx.setup().await;
        let h = Harness::new().await;
        let apps = instances(&h, store, &fx, 4).await;
        let entry = uuid::Uuid::new_v4().to_string();
        let id = uuid::Uuid::new_v4().to_string();
        let sends = (0..20).map(|i| {
            let app = apps[i % 4].clone();
            let cmd = PostEntry {
                entry: entry.clone(),
            };
            let id = id.clone();
            async move {
                app.send_with(cmd, SendOptions::new().message_id(id))
                    .await
                    .expect("send")
            }
        });
        futures_util::future::join_all(sends).await;
        eventually("all 20 deliveries acknowledged", || async {
            apps.iter()
                .map(|a| a.idempotency_stats().expect("stats").duplicates)
                .sum::<u64>()
                == 19
        })
        .await;
        assert_eq!(
            fx.count(&entry).await,
            1,
            "the row was updated exactly once"
        );
        h.assert_empty(&apps[0].queue_of::<PostEntry>(), Duration::from_millis(200))
            .await;
        for a in apps {
            a.shutdown().await.expect("shutdown");
        }
    }

    /// A restarted service (new process state, same database) does not reprocess.
    pub async fn restart_does_not_reprocess(
        connect: impl Fn() -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Arc<dyn IdempotencyStore>>>,
        >,
        fx: Effects,
    ) {
        fx.setup().await;
        let h = Harness::new().await;
        let entry = uuid::Uuid::new_v4().to_string();
        let id = uuid::Uuid::new_v4().to_string();
        let first = instances(&h, connect().await, &fx, 1).await.remove(0);
        first
            .send_with(
                PostEntry {
                    entry: entry.clone(),
                },
                SendOptions::new().message_id(id.clone()),
            )
            .await
            .expect("send");
        eventually("handled once", || async { fx.count(&entry).await == 1 }).await;
        first.shutdown().await.expect("shutdown");
        drop(first);

        let second = instances(&h, connect().await, &fx, 1).await.remove(0);
        second
            .send_with(
                PostEntry {
                    entry: entry.clone(),
                },
                SendOptions::new().message_id(id),
            )
            .await
            .expect("send again");
        eventually("the re-delivery is recognised", || async {
            second.idempotency_stats().expect("stats").duplicates == 1
        })
        .await;
        assert_eq!(
            fx.count(&entry).await,
            1,
            "not processed again after the restart"
        );
        second.shutdown().await.expect("shutdown");
    }
}

#[cfg(feature = "sqlite")]
fn sqlite_url() -> String {
    let path = std::env::temp_dir().join(format!("sourceflow-idem-{}.db", uuid::Uuid::new_v4()));
    format!("sqlite://{}?mode=rwc", path.display())
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_twenty_deliveries_one_row_update() {
    let store = sourceflow::idempotency::SqliteIdempotencyStore::connect(&sqlite_url())
        .await
        .expect("sqlite");
    let fx = durable::Effects::Sqlite(store.pool().clone());
    durable::twenty_deliveries_one_row_update(Arc::new(store), fx).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_survives_a_restart() {
    let url = sqlite_url();
    let fx_store = sourceflow::idempotency::SqliteIdempotencyStore::connect(&url)
        .await
        .expect("sqlite");
    let fx = durable::Effects::Sqlite(fx_store.pool().clone());
    durable::restart_does_not_reprocess(
        move || {
            let url = url.clone();
            Box::pin(async move {
                Arc::new(
                    sourceflow::idempotency::SqliteIdempotencyStore::connect(&url)
                        .await
                        .expect("reconnect"),
                ) as Arc<dyn IdempotencyStore>
            })
        },
        fx,
    )
    .await;
}

#[cfg(feature = "postgres")]
fn postgres_url() -> Option<String> {
    crate::postgres::server_url()
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_twenty_deliveries_one_row_update() {
    let Some(url) = postgres_url() else { return };
    let store = sourceflow::idempotency::PostgresIdempotencyStore::connect(&url)
        .await
        .expect("postgres");
    let fx = durable::Effects::Postgres(store.pool().clone());
    durable::twenty_deliveries_one_row_update(Arc::new(store), fx).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_survives_a_restart() {
    let Some(url) = postgres_url() else { return };
    let fx_store = sourceflow::idempotency::PostgresIdempotencyStore::connect(&url)
        .await
        .expect("postgres");
    let fx = durable::Effects::Postgres(fx_store.pool().clone());
    durable::restart_does_not_reprocess(
        move || {
            let url = url.clone();
            Box::pin(async move {
                Arc::new(
                    sourceflow::idempotency::PostgresIdempotencyStore::connect(&url)
                        .await
                        .expect("reconnect"),
                ) as Arc<dyn IdempotencyStore>
            })
        },
        fx,
    )
    .await;
}

#[cfg(feature = "dynamodb")]
#[path = "../common/dynamodb.rs"]
mod dynamodb;

/// The claims' table and the effects' table, on the DynamoDB emulator.
#[cfg(feature = "dynamodb")]
async fn dynamodb_store(
    client: &aws_sdk_dynamodb::Client,
    test: &str,
) -> (
    sourceflow::idempotency::DynamoDbIdempotencyStore,
    durable::Effects,
) {
    let store = sourceflow::idempotency::DynamoDbIdempotencyStore::open(
        client.clone(),
        &dynamodb::table(test),
        sourceflow::transport::aws::ProvisionMode::Create,
    )
    .await
    .expect("dynamodb");
    let fx = durable::Effects::DynamoDb {
        client: client.clone(),
        table: dynamodb::table(&format!("{test}-effects")),
    };
    (store, fx)
}

#[cfg(feature = "dynamodb")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_store_twenty_deliveries_one_row_update() {
    let Some(endpoint) = dynamodb::endpoint("dynamodb_store_twenty_deliveries_one_row_update")
    else {
        return;
    };
    let client = dynamodb::client(&endpoint);
    let (store, fx) = dynamodb_store(&client, "twenty").await;
    let table = store.table().to_string();
    durable::twenty_deliveries_one_row_update(Arc::new(store), fx.clone()).await;
    dynamodb::drop_table(&client, &table).await;
}

#[cfg(feature = "dynamodb")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_store_survives_a_restart() {
    let Some(endpoint) = dynamodb::endpoint("dynamodb_store_survives_a_restart") else {
        return;
    };
    let client = dynamodb::client(&endpoint);
    let (store, fx) = dynamodb_store(&client, "restart").await;
    let table = store.table().to_string();
    durable::restart_does_not_reprocess(
        move || {
            let table = table.clone();
            let endpoint = endpoint.clone();
            Box::pin(async move {
                // A new process: a new client on the same table.
                Arc::new(
                    sourceflow::idempotency::DynamoDbIdempotencyStore::open(
                        dynamodb::client(&endpoint),
                        &table,
                        sourceflow::transport::aws::ProvisionMode::Validate,
                    )
                    .await
                    .expect("reconnect"),
                ) as Arc<dyn IdempotencyStore>
            })
        },
        fx,
    )
    .await;
    drop(store);
}
