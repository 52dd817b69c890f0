//! What a transactional handler saves on PostgreSQL: messages per second and durable
//! commits per message of a handler that writes one row, (a) today's way — the claim, the
//! handler's own write and the completion, each its own commit — and (b) in the message's
//! transaction (`&mut Tx<Postgres>`): claim, write and completion in one commit. Both on the
//! embedded transport, in one run, on a database of their own.
//!
//! ```text
//! eval "$(tests/support/postgres.sh start)"
//! cargo bench -p sourceflow --features postgres --bench transactional
//! ```
//!
//! Commits are PostgreSQL's own count (`pg_stat_database.xact_commit` of the bench's
//! database, read before and after each run, less the bench's own polls); the time runs
//! from the consumer's start (the messages wait in the queue) to the last effect, so it
//! includes the start-up (migrations checked, listeners started) on both paths. `SOURCEFLOW_BENCH_MESSAGES` sets the number
//! of messages (default 2,000); concurrency 16.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sourceflow::tx::Postgres;
use sourceflow::{command, handler, State, Tx};
use sqlx::PgPool;

#[path = "../../tests/common/postgres.rs"]
mod postgres;

#[command(queue = "bench-plain", name = "bench.Plain.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Plain {
    n: u32,
}

#[command(queue = "bench-tx", name = "bench.Transactional.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Transactional {
    n: u32,
}

/// Today's way: the handler's write commits on its own.
#[handler]
async fn plain(cmd: Plain, State(pool): State<PgPool>) -> sourceflow::Result<()> {
    sqlx::query("INSERT INTO bench_effects (n) VALUES ($1)")
        .bind(i64::from(cmd.n))
        .execute(&pool)
        .await
        .map_err(sourceflow::Error::other)?;
    Ok(())
}

/// In the message's transaction.
#[handler]
async fn transactional(cmd: Transactional, tx: &mut Tx<Postgres>) -> sourceflow::Result<()> {
    sqlx::query("INSERT INTO bench_effects (n) VALUES ($1)")
        .bind(i64::from(cmd.n))
        .execute(&mut **tx)
        .await
        .map_err(sourceflow::Error::other)?;
    Ok(())
}

/// The database's commit count. Read on a connection of its own, closed at once: a backend
/// flushes its statistics when it exits, while an idle pooled one may keep them for up to
/// 10 s, which is why every run also closes its pool before the count is read.
async fn commits(url: &str) -> i64 {
    use sqlx::Connection;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connection");
    let n = sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&mut conn)
    .await
    .expect("xact_commit");
    conn.close().await.expect("close");
    n
}

async fn effects(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM bench_effects")
        .fetch_one(pool)
        .await
        .expect("count")
}

struct Figures {
    rate: f64,
    commits_per_message: f64,
}

async fn run(url: &str, messages: u32, transactional_path: bool) -> Figures {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(24)
        .connect(url)
        .await
        .expect("connect");
    sqlx::query("TRUNCATE bench_effects")
        .execute(&pool)
        .await
        .expect("truncate");
    // The messages wait in the queue before the consumer starts: only processing is timed.
    let transport = sourceflow::MemoryTransport::new();
    let sender = sourceflow::builder()
        .service("bench-sender")
        .transport(transport.clone())
        .handlers(|_| false)
        .without_idempotency()
        .start()
        .await
        .expect("sender");
    for n in 0..messages {
        match transactional_path {
            true => sender.send(Transactional { n }).await.map(|_| ()),
            false => sender.send(Plain { n }).await.map(|_| ()),
        }
        .expect("send");
    }
    let before = commits(url).await;
    let started = Instant::now();
    let app = sourceflow::builder()
        .service(if transactional_path {
            "bench-tx"
        } else {
            "bench-plain"
        })
        .transport(transport)
        .handlers(move |h| {
            h.name
                == if transactional_path {
                    "transactional"
                } else {
                    "plain"
                }
        })
        .postgres(pool.clone())
        .without_outbox_relay()
        .state(pool.clone())
        .concurrency(16)
        .start()
        .await
        .expect("start");
    // Each poll is a commit of its own (an autocommit SELECT): counted, and taken off.
    let mut polls = 0u32;
    while {
        polls += 1;
        effects(&pool).await < i64::from(messages)
    } {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    app.shutdown().await.expect("shutdown");
    sender.shutdown().await.expect("shutdown");
    pool.close().await;
    let after = commits(url).await;
    Figures {
        rate: f64::from(messages) / elapsed.as_secs_f64(),
        commits_per_message: (after - before - i64::from(polls)) as f64 / f64::from(messages),
    }
}

#[tokio::main]
async fn main() {
    let Ok(url) = std::env::var("SOURCEFLOW_TEST_POSTGRES_URL") else {
        eprintln!("set SOURCEFLOW_TEST_POSTGRES_URL: eval \"$(tests/support/postgres.sh start)\"");
        std::process::exit(2);
    };
    let messages: u32 = std::env::var("SOURCEFLOW_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let url = postgres::fresh_database(&url, "sf_bench").await;
    let pool = PgPool::connect(&url).await.expect("connect");
    sqlx::query("CREATE TABLE bench_effects (n BIGINT NOT NULL)")
        .execute(&pool)
        .await
        .expect("table");
    pool.close().await;
    println!("{messages} messages, concurrency 16, PostgreSQL (fsync on), embedded transport\n");
    println!("{:<44} {:>10} {:>16}", "path", "msg/s", "commits/msg");
    let mut rows = Vec::new();
    for round in 0..2 {
        for tx in [false, true] {
            let f = run(&url, messages, tx).await;
            let label = match tx {
                false => "claim, handler's write, complete (today)",
                true => "one transaction (&mut Tx<Postgres>)",
            };
            println!(
                "{:<44} {:>10.0} {:>16.2}   (round {})",
                label,
                f.rate,
                f.commits_per_message,
                round + 1
            );
            rows.push((tx, f));
        }
    }
    let mean = |tx: bool, f: fn(&Figures) -> f64| {
        let v: Vec<f64> = rows
            .iter()
            .filter(|(t, _)| *t == tx)
            .map(|(_, r)| f(r))
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    println!(
        "\nratio transactional / today: {:.2}x messages per second, {:.2}x commits per message",
        mean(true, |f| f.rate) / mean(false, |f| f.rate),
        mean(true, |f| f.commits_per_message) / mean(false, |f| f.commits_per_message),
    );
    let server = std::env::var("SOURCEFLOW_TEST_POSTGRES_URL").unwrap_or_default();
    if let (Ok(admin), Some((_, name))) = (PgPool::connect(&server).await, url.rsplit_once('/')) {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name}")))
            .execute(&admin)
            .await;
    }
}
