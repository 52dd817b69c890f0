//! Transactional handlers under SIGKILL: 2,000 commands whose handler increments a counter
//! row and inserts an effect row in its transaction, two consumer processes, one of them
//! SIGKILLed every ~2 s (often while a handler waits between its writes and the commit: a
//! fail point pauses there) and restarted. Every command's effect must be there exactly
//! once — none lost, none doubled — with nothing left in any outbox and nothing
//! dead-lettered. On SQLite and on PostgreSQL, against the emulator.
//!
//! Nothing masks a duplicate: the effect rows have no unique key, and the counter counts
//! every committed run.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::*;

/// The commands sent.
const JOBS: u32 = 2_000;

/// How long a run may take before it fails.
const DEADLINE: Duration = Duration::from_secs(240);

macro_rules! chaos_consumer {
    ($m:ident, $db:ty, $queue:literal, $topic:literal, $counter:literal, $effect:literal) => {
        pub mod $m {
            use super::*;
            use sourceflow::Tx;

            pub const MODULE: &str = module_path!();

            pub const QUEUE: &str = $queue;

            #[command(queue = $queue, name = $queue)]
            #[derive(Debug, Clone, Serialize, Deserialize)]
            pub struct Apply {
                pub job: u32,
            }

            #[event(topic = $topic, name = $topic)]
            #[derive(Debug, Clone, Serialize, Deserialize)]
            pub struct Applied {
                pub job: u32,
            }

            #[handler]
            async fn apply(cmd: Apply, tx: &mut Tx<$db>, ctx: &Context) -> sourceflow::Result<()> {
                sqlx::query($counter)
                    .execute(&mut **tx)
                    .await
                    .map_err(sourceflow::Error::other)?;
                sqlx::query($effect)
                    .bind(i64::from(cmd.job))
                    .execute(&mut **tx)
                    .await
                    .map_err(sourceflow::Error::other)?;
                ctx.raise(Applied { job: cmd.job }).await
            }
        }
    };
}

chaos_consumer!(
    sqlite_jobs,
    sqlx::Sqlite,
    "chaos-sqlite-jobs",
    "chaos-sqlite-applied",
    "UPDATE chaos_counter SET n = n + 1 WHERE id = 1",
    "INSERT INTO chaos_effects (job) VALUES (?1)"
);
chaos_consumer!(
    postgres_jobs,
    sqlx::Postgres,
    "chaos-postgres-jobs",
    "chaos-postgres-applied",
    "UPDATE chaos_counter SET n = n + 1 WHERE id = 1",
    "INSERT INTO chaos_effects (job) VALUES ($1)"
);

/// The consumer process (a child of the chaos tests): serves until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the consumer process of the chaos tests"]
async fn chaos_consumer_process() {
    let (Ok(prefix), Ok(db)) = (std::env::var("CHAOS_PREFIX"), std::env::var("CHAOS_DB")) else {
        return;
    };
    let pause = std::env::var("CHAOS_PAUSE").unwrap_or_default();
    fail::cfg("sourceflow::before-commit", &pause).expect("fail point");
    let _ = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_env_filter("sourceflow=warn")
        .with_writer(std::io::stderr)
        .try_init();
    let module = match db.starts_with("sqlite") {
        true => sqlite_jobs::MODULE,
        false => postgres_jobs::MODULE,
    };
    let store: Arc<dyn IdempotencyStore> = match db.starts_with("sqlite") {
        true => Arc::new(
            sourceflow::idempotency::SqliteIdempotencyStore::connect(&db)
                .await
                .expect("sqlite"),
        ),
        false => Arc::new(
            sourceflow::idempotency::PostgresIdempotencyStore::connect(&db)
                .await
                .expect("postgres"),
        ),
    };
    let _app = sourceflow::builder()
        .service("chaos")
        .prefix(prefix)
        .transport(aws().await)
        .handlers(move |h| h.module_path == module)
        .idempotency_arc(store)
        .concurrency(8)
        // Short, so that a killed process's messages come back quickly.
        .visibility_timeout(Duration::from_secs(4))
        .receive_wait(Duration::from_secs(1))
        .start()
        .await
        .expect("consumer");
    tokio::time::sleep(DEADLINE).await;
}

/// The database of one run: its URL and a pool to check it with.
enum ChaosDb {
    Sqlite(String, sqlx::SqlitePool),
    Postgres(String, sqlx::PgPool),
}

impl ChaosDb {
    fn url(&self) -> &str {
        match self {
            ChaosDb::Sqlite(u, _) | ChaosDb::Postgres(u, _) => u,
        }
    }

    async fn scalar(&self, sql: &'static str) -> i64 {
        match self {
            ChaosDb::Sqlite(_, p) => sqlx::query_scalar(sql).fetch_one(p).await.expect(sql),
            ChaosDb::Postgres(_, p) => sqlx::query_scalar(sql).fetch_one(p).await.expect(sql),
        }
    }

    async fn setup(&self) {
        for sql in [
            "CREATE TABLE chaos_counter (id INTEGER PRIMARY KEY, n BIGINT NOT NULL)",
            "INSERT INTO chaos_counter (id, n) VALUES (1, 0)",
            "CREATE TABLE chaos_effects (job BIGINT NOT NULL)",
        ] {
            match self {
                ChaosDb::Sqlite(_, p) => sqlx::query(sql).execute(p).await.map(|_| ()),
                ChaosDb::Postgres(_, p) => sqlx::query(sql).execute(p).await.map(|_| ()),
            }
            .expect(sql);
        }
    }
}

fn spawn_consumer(p: &str, db: &ChaosDb, pause: &str, log: &std::path::Path) -> Child {
    let log = std::fs::File::create(log).expect("log file");
    Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--ignored",
            "--exact",
            "chaos::chaos_consumer_process",
            "--nocapture",
        ])
        .env("CHAOS_PREFIX", p)
        .env("CHAOS_DB", db.url())
        .env("CHAOS_PAUSE", pause)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("consumer process")
}

/// Sends the jobs, kills and restarts consumers until every effect is in, then checks.
async fn chaos(db: ChaosDb, pause: &str) {
    let p = prefix();
    db.setup().await;
    let sender = sourceflow::builder()
        .service("chaos-producer")
        .prefix(&p)
        .transport(aws().await)
        .handlers(|_| false)
        .without_idempotency()
        .start()
        .await
        .expect("producer");
    let logs: Vec<std::path::PathBuf> = (0..2)
        .map(|i| std::env::temp_dir().join(format!("sourceflow-chaos-{p}-{i}.log")))
        .collect();
    let mut children: Vec<Child> = logs
        .iter()
        .map(|l| spawn_consumer(&p, &db, pause, l))
        .collect();
    let sqlite = matches!(db, ChaosDb::Sqlite(..));
    let sending = {
        let sender = sender.clone();
        tokio::spawn(async move {
            let mut sends = futures_util::stream::iter(0..JOBS)
                .map(|job| {
                    let sender = sender.clone();
                    async move {
                        loop {
                            match send_job(&sender, job, sqlite).await {
                                Ok(()) => break,
                                Err(e) => {
                                    eprintln!("send of job {job} failed, repeating: {e}");
                                    tokio::time::sleep(Duration::from_millis(200)).await;
                                }
                            }
                        }
                    }
                })
                .buffer_unordered(32);
            while sends.next().await.is_some() {}
        })
    };
    let started = Instant::now();
    let mut kills = 0u32;
    let mut paused_at_kill = 0usize;
    loop {
        tokio::time::sleep(Duration::from_millis(1_500 + fastrand::u64(..1_000))).await;
        let done = db
            .scalar("SELECT count(DISTINCT job) FROM chaos_effects")
            .await;
        if done >= i64::from(JOBS) {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{done} of {JOBS} effects after {DEADLINE:?}"
        );
        let i = fastrand::usize(..2);
        children[i].kill().expect("kill");
        let _ = children[i].wait();
        kills += 1;
        paused_at_kill += pauses_in(&logs[i]);
        children[i] = spawn_consumer(&p, &db, pause, &logs[i]);
    }
    sending.await.expect("producer");
    // Time for a duplicate run to show: longer than the visibility timeout.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    let effects = db.scalar("SELECT count(*) FROM chaos_effects").await;
    let distinct = db
        .scalar("SELECT count(DISTINCT job) FROM chaos_effects")
        .await;
    let counter = db.scalar("SELECT n FROM chaos_counter WHERE id = 1").await;
    let waiting = db
        .scalar("SELECT count(*) FROM sourceflow_idempotency WHERE outbox IS NOT NULL")
        .await;
    let relayed = db.scalar("SELECT count(*) FROM sourceflow_outbox").await;
    println!(
        "chaos on {}: {JOBS} jobs, {kills} kills, {paused_at_kill} handler(s) paused before their commit in killed processes, {:.1} s",
        if matches!(db, ChaosDb::Sqlite(..)) { "SQLite" } else { "PostgreSQL" },
        started.elapsed().as_secs_f64()
    );
    assert!(kills >= 3, "only {kills} kills: the run proves little");
    assert_eq!(distinct, i64::from(JOBS), "lost effects");
    assert_eq!(
        effects,
        i64::from(JOBS),
        "{} effects applied twice",
        effects - distinct
    );
    assert_eq!(
        counter,
        i64::from(JOBS),
        "the counter counted a run twice (or lost one)"
    );
    assert_eq!(waiting, 0, "events left undispatched in completed records");
    assert_eq!(relayed, 0, "rows left in the outbox");
    let t = sender.transport();
    let queue = sender.naming().resource(match sqlite {
        true => sqlite_jobs::QUEUE,
        false => postgres_jobs::QUEUE,
    });
    assert_eq!(
        depth(&*t, &Naming::dead_letter(&queue)).await,
        0,
        "dead-lettered jobs"
    );
    sender.shutdown().await.expect("shutdown");
    for l in logs {
        let _ = std::fs::remove_file(l);
    }
}

async fn send_job(sender: &sourceflow::Handle, job: u32, sqlite: bool) -> sourceflow::Result<()> {
    // Pinned ids: a repeated send after a failure is the same message.
    let opts = SendOptions::new().message_id(format!("chaos-job-{job}"));
    match sqlite {
        true => sender.send_with(sqlite_jobs::Apply { job }, opts).await,
        false => sender.send_with(postgres_jobs::Apply { job }, opts).await,
    }
    .map(|_| ())
}

/// Fail-point pauses logged by a consumer process (each one a handler that waited between
/// its writes and its commit).
fn pauses_in(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("pausing at a fail point"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_sqlite_consumers_apply_every_effect_exactly_once() {
    if !enabled() {
        return;
    }
    let (path, url) = sqlite_file(&format!("sourceflow-chaos-{}", fastrand::u64(..)));
    let store = sourceflow::idempotency::SqliteIdempotencyStore::connect(&url)
        .await
        .expect("sqlite");
    chaos(ChaosDb::Sqlite(url, store.pool().clone()), "1%return(800)").await;
    let _ = std::fs::remove_file(path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_postgres_consumers_apply_every_effect_exactly_once() {
    if !enabled() {
        return;
    }
    let server = postgres::server_url().expect("SOURCEFLOW_TEST_POSTGRES_URL");
    let url = postgres::fresh_database(&server, "sf_chaos").await;
    let store = sourceflow::idempotency::PostgresIdempotencyStore::connect(&url)
        .await
        .expect("postgres");
    chaos(
        ChaosDb::Postgres(url, store.pool().clone()),
        "4%return(1000)",
    )
    .await;
}
