//! The SQLite and PostgreSQL idempotency stores: the conformance suite, one winner per key
//! under a race (in one pool and across four pools on one database), restart survival and
//! batched cleanup of expired records.
//!
//! SQLite runs on a file in the temporary directory. PostgreSQL runs when
//! `SOURCEFLOW_TEST_POSTGRES_URL` is set (`eval "$(tests/support/postgres.sh start)"`); each
//! test works in a schema of its own. Without the URL the PostgreSQL tests are skipped,
//! unless `SOURCEFLOW_TEST_REQUIRE_POSTGRES=1`, which makes them fail.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use sourceflow::idempotency::{
    conformance, IdempotencyStore, PostgresIdempotencyStore, SqliteIdempotencyStore,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

#[path = "common/store_checks.rs"]
mod store_checks;
use store_checks::{
    assert_after_restart, cleans_up_in_batches, completed_and_in_progress, one_winner_per_key,
};

fn unique(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!("{name}_{}_{nanos}", std::process::id())
}

// ---------------------------------------------------------------------------------------
// SQLite

/// A database file in the temporary directory, removed (with its WAL files) on drop.
struct SqliteFile {
    path: PathBuf,
}

impl SqliteFile {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("sourceflow-{}.db", unique(name)));
        SqliteFile { path }
    }

    fn url(&self) -> String {
        format!("sqlite://{}?mode=rwc", self.path.display())
    }

    async fn open(&self) -> SqliteIdempotencyStore {
        SqliteIdempotencyStore::connect(&self.url())
            .await
            .expect("open the SQLite store")
    }
}

impl Drop for SqliteFile {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = self.path.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_conforms() {
    let file = SqliteFile::new("conforms");
    let store = file.open().await;
    assert_eq!(store.name(), "sqlite");
    conformance::run(&store, "t").await;
    conformance::race(Arc::new(store), "race").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_survives_a_restart() {
    let file = SqliteFile::new("restart");
    let store = file.open().await;
    let in_progress = completed_and_in_progress(&store).await;
    store.pool().close().await;
    drop(store);

    let store = file.open().await;
    assert_after_restart(&store, in_progress).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_cleans_up_in_batches() {
    let file = SqliteFile::new("cleanup");
    let store = Arc::new(file.open().await);
    let insert = |from: i64, to: i64| {
        let pool = store.pool().clone();
        async move {
            sqlx::query(
                "WITH RECURSIVE n(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM n WHERE i < ?2)
                 INSERT INTO sourceflow_idempotency (key, payload_hash, state, expires_at, created_at)
                 SELECT 'expired:' || i, 'h', 'completed', 1, 1 FROM n",
            )
            .bind(from)
            .bind(to)
            .execute(&pool)
            .await
            .expect("insert expired rows");
        }
    };
    let count = || {
        let store = store.clone();
        async move { store.size().await.expect("size") }
    };
    cleans_up_in_batches(store.clone(), insert, count).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_one_winner_across_pools() {
    let file = SqliteFile::new("pools");
    // Four stores open the new file at once (WAL switch and migrations race too).
    let url = file.url();
    let opens = (0..4).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { SqliteIdempotencyStore::connect(&url).await })
    });
    let mut stores: Vec<Arc<dyn IdempotencyStore>> = Vec::new();
    for open in opens {
        stores.push(Arc::new(open.await.expect("task").expect("open")));
    }
    one_winner_per_key(stores).await;
}

// ---------------------------------------------------------------------------------------
// PostgreSQL

/// The test database's URL; `None` (the test is skipped) when it is not configured.
fn postgres_url(test: &str) -> Option<String> {
    match std::env::var("SOURCEFLOW_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("SOURCEFLOW_TEST_REQUIRE_POSTGRES").as_deref() == Ok("1") => panic!(
            "SOURCEFLOW_TEST_REQUIRE_POSTGRES=1 but SOURCEFLOW_TEST_POSTGRES_URL is not set: \
             start PostgreSQL with `eval \"$(tests/support/postgres.sh start)\"`"
        ),
        _ => {
            eprintln!(
                "{test}: skipped (SOURCEFLOW_TEST_POSTGRES_URL is not set; \
                 `eval \"$(tests/support/postgres.sh start)\"` to run it)"
            );
            None
        }
    }
}

/// A schema of its own in the test database, so that tests running at the same time do not
/// see each other's records. Dropped by [`PgSchema::drop`] at the end of a passing test.
struct PgSchema {
    url: String,
    name: String,
}

impl PgSchema {
    async fn create(url: String, test: &str) -> Self {
        let name = unique(test);
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .expect("connect to the test database");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA \"{name}\"")))
            .execute(&admin)
            .await
            .expect("create the test schema");
        admin.close().await;
        PgSchema { url, name }
    }

    async fn open(&self) -> PostgresIdempotencyStore {
        let options = PgConnectOptions::from_str(&self.url)
            .expect("test database URL")
            .options([("search_path", self.name.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .expect("connect to the test database");
        PostgresIdempotencyStore::from_pool(pool)
            .await
            .expect("open the PostgreSQL store")
    }

    async fn drop(self) {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.url)
            .await
            .expect("connect to the test database");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA \"{}\" CASCADE",
            self.name
        )))
        .execute(&admin)
        .await
        .expect("drop the test schema");
        admin.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_conforms() {
    let Some(url) = postgres_url("postgres_conforms") else {
        return;
    };
    let schema = PgSchema::create(url, "conforms").await;
    let store = schema.open().await;
    assert_eq!(store.name(), "postgres");
    conformance::run(&store, "t").await;
    conformance::race(Arc::new(store), "race").await;
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_survives_a_restart() {
    let Some(url) = postgres_url("postgres_survives_a_restart") else {
        return;
    };
    let schema = PgSchema::create(url, "restart").await;
    let store = schema.open().await;
    let in_progress = completed_and_in_progress(&store).await;
    store.pool().close().await;
    drop(store);

    let store = schema.open().await;
    assert_after_restart(&store, in_progress).await;
    store.pool().close().await;
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cleans_up_in_batches() {
    let Some(url) = postgres_url("postgres_cleans_up_in_batches") else {
        return;
    };
    let schema = PgSchema::create(url, "cleanup").await;
    let store = Arc::new(schema.open().await);
    let insert = |from: i64, to: i64| {
        let pool = store.pool().clone();
        async move {
            sqlx::query(
                "INSERT INTO sourceflow_idempotency (key, payload_hash, state, expires_at, created_at)
                 SELECT 'expired:' || i, 'h', 'completed', 1, 1 FROM generate_series($1, $2) AS i",
            )
            .bind(from)
            .bind(to)
            .execute(&pool)
            .await
            .expect("insert expired rows");
        }
    };
    let count = || {
        let store = store.clone();
        async move { store.size().await.expect("size") }
    };
    cleans_up_in_batches(store.clone(), insert, count).await;
    store.pool().close().await;
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_one_winner_across_pools() {
    let Some(url) = postgres_url("postgres_one_winner_across_pools") else {
        return;
    };
    let schema = PgSchema::create(url, "pools").await;
    // Four stores migrate at once (serialized by the migrator's advisory lock).
    let (a, b, c, d) = tokio::join!(schema.open(), schema.open(), schema.open(), schema.open());
    let pools = [
        a.pool().clone(),
        b.pool().clone(),
        c.pool().clone(),
        d.pool().clone(),
    ];
    one_winner_per_key(vec![Arc::new(a), Arc::new(b), Arc::new(c), Arc::new(d)]).await;
    for p in pools {
        p.close().await;
    }
    schema.drop().await;
}
