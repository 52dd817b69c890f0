//! The SQLite and PostgreSQL idempotency stores: the conformance suite, one winner per key
//! under a race (in one pool and across four pools on one database), restart survival and
//! batched cleanup of expired records.
//!
//! SQLite runs on a file in the temporary directory. PostgreSQL runs when
//! `SOURCEFLOW_TEST_POSTGRES_URL` is set (`eval "$(tests/support/postgres.sh start)"`); each
//! test works in a schema of its own. Without the URL the PostgreSQL tests are skipped,
//! unless `SOURCEFLOW_TEST_REQUIRE_POSTGRES=1`, which makes them fail.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sourceflow::idempotency::conformance::{self, Backdate};
use sourceflow::idempotency::sql::{ACQUIRE_TIMEOUT, MIGRATIONS_TABLE};
use sourceflow::idempotency::{
    Claim, IdempotencyStore, PostgresIdempotencyStore, SqliteIdempotencyStore,
};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

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

/// The migrations the first release shipped (0001 alone), copied to a directory of their
/// own, to make a database as that release left it.
struct FirstRelease {
    dir: PathBuf,
}

impl FirstRelease {
    fn new(db: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("sourceflow-{}", unique(&format!("{db}-0001"))));
        std::fs::create_dir_all(&dir).expect("create the migrations directory");
        let name = "0001_idempotency.sql";
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(db)
            .join(name);
        std::fs::copy(shipped, dir.join(name)).expect("copy the first migration");
        FirstRelease { dir }
    }

    async fn migrator(&self) -> sqlx::migrate::Migrator {
        let mut migrator = sqlx::migrate::Migrator::new(self.dir.clone())
            .await
            .expect("read the first migration");
        migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
        migrator
    }
}

impl Drop for FirstRelease {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the first release left in its table: a claim whose worker died, and a completion
/// whose outbox was not dispatched.
const FIRST_RELEASE_ROWS: &str = "
    INSERT INTO sourceflow_idempotency (key, payload_hash, state, token, lease_until, created_at)
    VALUES ('crashed', 'h', 'in_progress', 'dead-worker', 1, 1);
    INSERT INTO sourceflow_idempotency (key, payload_hash, state, expires_at, outbox, created_at)
    VALUES ('done', 'h', 'completed', 9000000000000, '[\"o\"]', 1);";

/// Records a migration applied by a later release than this one (`checksum`: a byte string
/// in the database's SQL).
fn later_release(checksum: &str) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(format!(
        "INSERT INTO _sourceflow_migrations
             (version, description, success, checksum, execution_time)
         VALUES (9999, 'from a later release', TRUE, {checksum}, 0)"
    ))
}

/// After the upgrade: the first release's records read as before, the dead worker's claim
/// counts its attempt, and every migration is recorded once.
async fn assert_upgraded(store: &dyn IdempotencyStore, versions: Vec<i64>) {
    assert_eq!(
        versions,
        [1, 2, 3],
        "0001 kept as applied, 0002 and 0003 (the outbox) applied after it"
    );
    match store.claim("crashed", "h", Duration::from_secs(30)).await {
        Ok(Claim::Acquired { attempt, .. }) => assert_eq!(attempt, 2, "the dead worker's attempt"),
        other => panic!("crashed: {other:?}"),
    }
    assert_eq!(
        store
            .claim("done", "h", Duration::from_secs(30))
            .await
            .expect("claim"),
        Claim::Completed {
            undispatched: Some("[\"o\"]".into())
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_upgrades_a_database_of_the_first_release() {
    let file = SqliteFile::new("upgrade");
    let first = FirstRelease::new("sqlite");
    let options = SqliteConnectOptions::from_str(&file.url()).expect("url");
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .expect("open the file");
    first.migrator().await.run(&pool).await.expect("apply 0001");
    sqlx::raw_sql(FIRST_RELEASE_ROWS)
        .execute(&pool)
        .await
        .expect("rows");
    pool.close().await;

    let store = file.open().await;
    let versions =
        sqlx::query_scalar("SELECT version FROM _sourceflow_migrations ORDER BY version")
            .fetch_all(store.pool())
            .await
            .expect("versions");
    assert_upgraded(&store, versions).await;

    // A later release's migration does not stop this one from opening the file (a rolling
    // deploy, a rollback).
    sqlx::raw_sql(later_release("X'00'"))
        .execute(store.pool())
        .await
        .expect("later migration");
    store.pool().close().await;
    file.open().await.pool().close().await;
}

fn millis_ago(ago: Duration) -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis();
    i64::try_from(now - ago.as_millis()).expect("a time in milliseconds")
}

/// Ages a record by writing its lease directly (by the process clock, as the store does).
struct SqliteClock(sqlx::SqlitePool);

#[async_trait::async_trait]
impl Backdate for SqliteClock {
    async fn lease_ran_out(&self, key: &str, ago: Duration) {
        let done = sqlx::query(
            "UPDATE sourceflow_idempotency SET lease_until = ?2
             WHERE key = ?1 AND state = 'in_progress'",
        )
        .bind(key)
        .bind(millis_ago(ago))
        .execute(&self.0)
        .await
        .expect("backdate");
        assert_eq!(done.rows_affected(), 1, "{key} is in progress");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_conforms() {
    let file = SqliteFile::new("conforms");
    let store = file.open().await;
    assert_eq!(store.name(), "sqlite");
    assert_eq!(
        store.pool().options().get_acquire_timeout(),
        ACQUIRE_TIMEOUT
    );
    conformance::run(&store, "t", &SqliteClock(store.pool().clone())).await;
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
                 INSERT INTO sourceflow_idempotency
                     (key, payload_hash, state, token, lease_until, expires_at, created_at)
                 SELECT 'expired:' || i, 'h',
                        CASE i % 2 WHEN 0 THEN 'completed' ELSE 'in_progress' END,
                        CASE i % 2 WHEN 0 THEN NULL ELSE 'dead-worker' END,
                        CASE i % 2 WHEN 0 THEN NULL ELSE 1 END,
                        CASE i % 2 WHEN 0 THEN 1 ELSE NULL END,
                        1
                 FROM n",
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

    /// A pool whose connections work in the schema.
    async fn pool(&self) -> PgPool {
        let options = PgConnectOptions::from_str(&self.url)
            .expect("test database URL")
            .options([("search_path", self.name.as_str())]);
        PgPoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .expect("connect to the test database")
    }

    async fn open(&self) -> PostgresIdempotencyStore {
        PostgresIdempotencyStore::from_pool(self.pool().await)
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

/// Ages a record by writing its lease directly (by the server's clock, as the store does).
struct PostgresClock(sqlx::PgPool);

#[async_trait::async_trait]
impl Backdate for PostgresClock {
    async fn lease_ran_out(&self, key: &str, ago: Duration) {
        let done = sqlx::query(
            "UPDATE sourceflow_idempotency
             SET lease_until = (extract(epoch FROM clock_timestamp()) * 1000)::bigint - $2
             WHERE key = $1 AND state = 'in_progress'",
        )
        .bind(key)
        .bind(i64::try_from(ago.as_millis()).expect("milliseconds"))
        .execute(&self.0)
        .await
        .expect("backdate");
        assert_eq!(done.rows_affected(), 1, "{key} is in progress");
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
    conformance::run(&store, "t", &PostgresClock(store.pool().clone())).await;
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
                "INSERT INTO sourceflow_idempotency
                     (key, payload_hash, state, token, lease_until, expires_at, created_at)
                 SELECT 'expired:' || i, 'h',
                        CASE i % 2 WHEN 0 THEN 'completed' ELSE 'in_progress' END,
                        CASE i % 2 WHEN 0 THEN NULL ELSE 'dead-worker' END,
                        CASE i % 2 WHEN 0 THEN NULL ELSE 1 END,
                        CASE i % 2 WHEN 0 THEN 1 ELSE NULL END,
                        1
                 FROM generate_series($1::bigint, $2::bigint) AS i",
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_upgrades_a_database_of_the_first_release() {
    let Some(url) = postgres_url("postgres_upgrades_a_database_of_the_first_release") else {
        return;
    };
    let schema = PgSchema::create(url, "upgrade").await;
    let first = FirstRelease::new("postgres");
    let pool = schema.pool().await;
    first.migrator().await.run(&pool).await.expect("apply 0001");
    sqlx::raw_sql(FIRST_RELEASE_ROWS)
        .execute(&pool)
        .await
        .expect("rows");
    pool.close().await;

    let store = schema.open().await;
    let versions =
        sqlx::query_scalar("SELECT version FROM _sourceflow_migrations ORDER BY version")
            .fetch_all(store.pool())
            .await
            .expect("versions");
    assert_upgraded(&store, versions).await;

    // A later release's migration does not stop this one from starting (a rolling deploy,
    // a rollback).
    sqlx::raw_sql(later_release("'\\x00'::bytea"))
        .execute(store.pool())
        .await
        .expect("later migration");
    store.pool().close().await;
    schema.open().await.pool().close().await;
    schema.drop().await;
}

/// A TCP proxy to the database that can be cut, as a network outage would.
struct Proxy {
    addr: std::net::SocketAddr,
    accept: tokio::task::JoinHandle<()>,
    connections: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let connections = Arc::new(std::sync::Mutex::new(Vec::new()));
        let open = connections.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let relay = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                open.lock().expect("connections").push(relay);
            }
        });
        Proxy {
            addr,
            accept,
            connections,
        }
    }

    /// Closes the listening port and every connection through it.
    async fn cut(self) {
        self.accept.abort();
        let _ = self.accept.await;
        let relays: Vec<_> = self
            .connections
            .lock()
            .expect("connections")
            .drain(..)
            .collect();
        for relay in relays {
            relay.abort();
            let _ = relay.await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_fails_fast_when_the_database_is_unreachable() {
    let Some(url) = postgres_url("postgres_fails_fast_when_the_database_is_unreachable") else {
        return;
    };
    let schema = PgSchema::create(url.clone(), "outage").await;
    let options = PgConnectOptions::from_str(&url).expect("test database URL");
    let server = format!("{}:{}", options.get_host(), options.get_port());
    let proxy = Proxy::start(server.clone()).await;
    assert!(url.contains(&server), "{url} names {server}");
    let separator = if url.contains('?') { '&' } else { '?' };
    let proxied = format!(
        "{}{separator}options=-c%20search_path%3D{}",
        url.replacen(&server, &proxy.addr.to_string(), 1),
        schema.name
    );
    let store = PostgresIdempotencyStore::connect(&proxied)
        .await
        .expect("connect through the proxy");
    assert_eq!(
        store.pool().options().get_acquire_timeout(),
        ACQUIRE_TIMEOUT
    );
    assert!(matches!(
        store
            .claim("before", "h", store_checks::LEASE)
            .await
            .expect("claim"),
        Claim::Acquired { .. }
    ));

    proxy.cut().await;
    let bound = ACQUIRE_TIMEOUT + Duration::from_secs(3);
    let started = Instant::now();
    let error = store
        .claim("during", "h", store_checks::LEASE)
        .await
        .expect_err("the database is unreachable");
    let took = started.elapsed();
    assert!(
        took < bound,
        "a claim failed after {took:?}, not within {bound:?}"
    );
    let message = error.to_string();
    assert!(
        message.starts_with("claim on the postgres idempotency store failed: "),
        "{message}"
    );
    assert!(!message.contains('\n'), "one line: {message}");

    let started = Instant::now();
    let error = PostgresIdempotencyStore::connect(&proxied)
        .await
        .expect_err("the database is unreachable");
    let took = started.elapsed();
    assert!(
        took < bound,
        "connect failed after {took:?}, not within {bound:?}"
    );
    assert!(
        error
            .to_string()
            .starts_with("connect on the postgres idempotency store failed: "),
        "{error}"
    );
    store.pool().close().await;
    schema.drop().await;
}
