//! What idempotency costs per message: claim + complete on each store, next to the path
//! without idempotency (which still derives the key and hashes the payload), in one run.
//!
//! ```text
//! eval "$(tests/support/postgres.sh start)"   # optional: adds the PostgreSQL row
//! eval "$(tests/support/moto.sh start)"       # optional: adds the DynamoDB row (moto server)
//! cargo bench -p sourceflow --features sqlite,postgres,dynamodb --bench idempotency
//! ```
//!
//! Each row: one task claims and completes `messages` new keys one after another (latency
//! per message: median and p99), then 8 tasks do the same concurrently (throughput).
//! `SOURCEFLOW_BENCH_MESSAGES` sets the number of messages for the database stores.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sourceflow::idempotency::{
    key, payload_hash, Claim, DynamoDbIdempotencyStore, IdempotencyStore, MemoryIdempotencyStore,
    PostgresIdempotencyStore, SqliteIdempotencyStore, DEFAULT_TTL,
};
use sourceflow::transport::aws::ProvisionMode;

#[path = "../../tests/common/dynamodb.rs"]
mod dynamodb;

const PAYLOAD: &str = r#"{"order_id":1234567,"customer_id":"c-98765","lines":[{"sku":"A-100","qty":2,"price":"19.99"},{"sku":"B-200","qty":1,"price":"5.00"}],"currency":"EUR","note":"leave at the door"}"#;
const LEASE: Duration = Duration::from_secs(30);
const TASKS: usize = 8;

/// The work done per message with idempotency off: none. With it on: the key, the hash,
/// the claim and the completion.
async fn one(store: Option<&dyn IdempotencyStore>, run: &str, i: usize) {
    let id = format!("{run}-{i}");
    let k = key("bench", "orders.OrderPlaced", &id);
    let h = payload_hash(PAYLOAD);
    let Some(store) = store else {
        black_box((k, h));
        return;
    };
    match store.claim(&k, &h, LEASE).await.expect("claim") {
        Claim::Acquired { token, .. } => {
            let done = store
                .complete(&k, &token, DEFAULT_TTL, None)
                .await
                .expect("complete");
            assert!(done, "complete");
        }
        other => panic!("a new key must be acquired, got {other:?}"),
    }
}

struct Row {
    store: &'static str,
    messages: usize,
    median: Duration,
    p99: Duration,
    mean: Duration,
    sequential_rate: f64,
    concurrent_rate: f64,
}

async fn measure(
    name: &'static str,
    store: Option<Arc<dyn IdempotencyStore>>,
    messages: usize,
) -> Row {
    let run = format!("{name}-{}", unique());
    // Warm up: connections, prepared statements, caches.
    for i in 0..messages / 10 + 10 {
        one(store.as_deref(), &format!("{run}-warm"), i).await;
    }
    let mut samples = Vec::with_capacity(messages);
    let started = Instant::now();
    for i in 0..messages {
        let t = Instant::now();
        one(store.as_deref(), &run, i).await;
        samples.push(t.elapsed());
    }
    let sequential = started.elapsed();

    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let store = store.clone();
            let run = format!("{run}-c{t}");
            tokio::spawn(async move {
                for i in 0..messages / TASKS {
                    one(store.as_deref(), &run, i).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let concurrent = started.elapsed();

    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    Row {
        store: name,
        messages,
        median: at(0.5),
        p99: at(0.99),
        mean: sequential / messages as u32,
        sequential_rate: messages as f64 / sequential.as_secs_f64(),
        concurrent_rate: (messages / TASKS * TASKS) as f64 / concurrent.as_secs_f64(),
    }
}

fn unique() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!("{}_{nanos}", std::process::id())
}

fn micros(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let db_messages: usize = std::env::var("SOURCEFLOW_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let mut rows = Vec::new();

    rows.push(measure("none (key + hash only)", None, 100_000).await);
    rows.push(
        measure(
            "memory",
            Some(Arc::new(MemoryIdempotencyStore::new())),
            100_000,
        )
        .await,
    );

    let file = std::env::temp_dir().join(format!("sourceflow-bench-{}.db", unique()));
    let sqlite = SqliteIdempotencyStore::connect(&format!("sqlite://{}?mode=rwc", file.display()))
        .await
        .expect("open SQLite");
    rows.push(
        measure(
            "sqlite (file, WAL, synchronous=FULL)",
            Some(Arc::new(sqlite.clone())),
            db_messages,
        )
        .await,
    );
    sqlite.pool().close().await;
    for suffix in ["", "-wal", "-shm"] {
        let mut p = file.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }

    match std::env::var("SOURCEFLOW_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => {
            // A schema of its own: the bench leaves the database's other schemas (and their
            // migration state) as they were.
            let schema = format!("bench_{}", unique());
            let admin = sqlx::PgPool::connect(&url)
                .await
                .expect("connect to PostgreSQL");
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
                .execute(&admin)
                .await
                .expect("create the bench schema");
            let separator = if url.contains('?') { '&' } else { '?' };
            let pg = PostgresIdempotencyStore::connect(&format!(
                "{url}{separator}options=-c%20search_path%3D{schema}"
            ))
            .await
            .expect("connect to PostgreSQL");
            rows.push(
                measure(
                    "postgres (loopback TCP)",
                    Some(Arc::new(pg.clone())),
                    db_messages,
                )
                .await,
            );
            pg.pool().close().await;
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA \"{schema}\" CASCADE"
            )))
            .execute(&admin)
            .await
            .expect("drop the bench schema");
            admin.close().await;
        }
        _ => eprintln!(
            "postgres: skipped (set SOURCEFLOW_TEST_POSTGRES_URL, e.g. with \
             `eval \"$(tests/support/postgres.sh start)\"`)"
        ),
    }

    // On the emulator: the row measures moto's Python process as much as the store, and
    // says nothing of DynamoDB's own latency (single-digit milliseconds within a region).
    if let Some(endpoint) = dynamodb::endpoint("dynamodb") {
        let client = dynamodb::client(&endpoint);
        let table = dynamodb::table("bench");
        let store = DynamoDbIdempotencyStore::open(client.clone(), &table, ProvisionMode::Create)
            .await
            .expect("open DynamoDB");
        rows.push(
            measure(
                "dynamodb (moto server, loopback HTTP)",
                Some(Arc::new(store)),
                db_messages,
            )
            .await,
        );
        dynamodb::drop_table(&client, &table).await;
    }

    println!("\nclaim + complete per message (1 task: latency; {TASKS} tasks: throughput)\n");
    println!(
        "| {:<38} | {:>8} | {:>10} | {:>10} | {:>10} | {:>13} | {:>13} |",
        "store",
        "messages",
        "median µs",
        "p99 µs",
        "mean µs",
        "msg/s 1 task",
        format!("msg/s {TASKS} tasks")
    );
    println!(
        "|{:-<40}|{:->10}|{:->12}|{:->12}|{:->12}|{:->15}|{:->15}|",
        "", "", "", "", "", "", ""
    );
    for r in rows {
        println!(
            "| {:<38} | {:>8} | {:>10} | {:>10} | {:>10} | {:>13.0} | {:>13.0} |",
            r.store,
            r.messages,
            micros(r.median),
            micros(r.p99),
            micros(r.mean),
            r.sequential_rate,
            r.concurrent_rate
        );
    }
}
