//! The transactional outbox's relay through a broker outage and its own death: a caller
//! commits 1,100 orders with `outbox::send` (100 of them rolled back on purpose) while the
//! relay runs in a process of its own; the emulator is paused (SIGSTOP) for 8 s a third of
//! the way, and later the relay process is SIGKILLed once and restarted. Every committed order's command is
//! delivered, each customer's in commit order on a FIFO queue, none of a rolled-back
//! transaction, and the outbox ends empty. The consumer runs without idempotency: a
//! repeated or missing command shows.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::*;

const ORDERS: u32 = 1_100;
const CUSTOMERS: u32 = 20;

#[command(queue = "relay-orders.fifo", name = "faults.relay.PlaceOrder.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlaceOrder {
    #[entity_id]
    pub customer: String,
    pub n: u32,
}

fn rolled_back(n: u32) -> bool {
    n % 11 == 5
}

pub mod consumer {
    use super::*;
    pub const MODULE: &str = module_path!();

    /// Per customer, the order numbers in arrival order.
    #[derive(Clone, Default)]
    pub struct Seen(pub Arc<Mutex<HashMap<String, Vec<u32>>>>);

    #[handler]
    async fn place(cmd: PlaceOrder, State(seen): State<Seen>) -> sourceflow::Result<()> {
        seen.0
            .lock()
            .expect("seen")
            .entry(cmd.customer)
            .or_default()
            .push(cmd.n);
        Ok(())
    }
}

/// A module without handlers: a service of it only relays.
pub mod relay_only {
    pub const MODULE: &str = module_path!();
}

fn relay_settings() -> sourceflow::outbox::RelaySettings {
    sourceflow::outbox::RelaySettings {
        poll_interval: Duration::from_millis(100),
        // Short, so that the killed relay's rows are taken over within the test.
        lease: Duration::from_secs(4),
        ..Default::default()
    }
}

/// The relay process (a child of the relay test): relays until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the relay process of the outbox relay test"]
async fn outbox_relay_process() {
    let (Ok(prefix), Ok(db)) = (std::env::var("RELAY_PREFIX"), std::env::var("RELAY_DB")) else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_env_filter("sourceflow=warn")
        .with_writer(std::io::stderr)
        .try_init();
    let pool = sqlx::PgPool::connect(&db).await.expect("postgres");
    let _relay = sourceflow::builder()
        .service("relay")
        .prefix(prefix)
        .transport(impatient().await)
        .handlers(|h| h.module_path == relay_only::MODULE)
        .postgres(pool)
        .outbox_relay(relay_settings())
        .start()
        .await
        .expect("relay");
    tokio::time::sleep(Duration::from_secs(300)).await;
}

fn spawn_relay(p: &str, db: &str, log: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--ignored",
            "--exact",
            "relay::outbox_relay_process",
            "--nocapture",
        ])
        .env("RELAY_PREFIX", p)
        .env("RELAY_DB", db)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("relay process")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_relay_survives_a_broker_pause_and_its_own_death() {
    if !enabled() {
        return;
    }
    let pid = std::fs::read_to_string(
        std::env::var("SOURCEFLOW_TEST_EMULATOR_PIDFILE")
            .expect("SOURCEFLOW_TEST_EMULATOR_PIDFILE"),
    )
    .expect("emulator pid")
    .trim()
    .to_string();
    let server = postgres::server_url().expect("SOURCEFLOW_TEST_POSTGRES_URL");
    let db = postgres::fresh_database(&server, "sf_relay").await;
    let pool = sqlx::PgPool::connect(&db).await.expect("connect");
    // The store's migrations create the outbox table.
    sourceflow::idempotency::PostgresIdempotencyStore::from_pool(pool.clone())
        .await
        .expect("migrations");
    sqlx::query("CREATE TABLE relay_orders (customer TEXT NOT NULL, n BIGINT NOT NULL)")
        .execute(&pool)
        .await
        .expect("table");

    let p = prefix();
    let seen = consumer::Seen::default();
    let consumer = sourceflow::builder()
        .service("relay-consumer")
        .prefix(&p)
        .transport(impatient().await)
        .handlers(|h| h.module_path == consumer::MODULE)
        .state(seen.clone())
        .without_idempotency()
        .receive_wait(Duration::from_secs(1))
        .start()
        .await
        .expect("consumer");
    let outbox = sourceflow::outbox::Outbox::new(Naming::new(p.clone()));
    let log = std::env::temp_dir().join(format!("sourceflow-relay-{p}.log"));
    let mut relay = spawn_relay(&p, &db, &log);
    let mut paused = None;
    let mut killed = false;
    for n in 0..ORDERS {
        if n == ORDERS / 3 {
            run("kill", &["-STOP", &pid]);
            paused = Some((Paused(pid.clone()), tokio::time::Instant::now()));
            eprintln!("emulator paused");
        }
        if let Some((_, since)) = &paused {
            if since.elapsed() >= Duration::from_secs(8) {
                paused = None; // SIGCONT
                eprintln!("emulator resumed");
            }
        }
        if n >= 2 * ORDERS / 3 && paused.is_none() && !killed {
            killed = true;
            relay.kill().expect("kill relay");
            let _ = relay.wait();
            eprintln!("relay killed");
            relay = spawn_relay(&p, &db, &log);
        }
        let customer = format!("c{}", n % CUSTOMERS);
        let mut tx = pool.begin().await.expect("begin");
        sqlx::query("INSERT INTO relay_orders (customer, n) VALUES ($1, $2)")
            .bind(&customer)
            .bind(i64::from(n))
            .execute(&mut *tx)
            .await
            .expect("insert");
        outbox
            .send(&mut tx, PlaceOrder { customer, n })
            .await
            .expect("outbox send");
        match rolled_back(n) {
            true => tx.rollback().await.expect("rollback"),
            false => tx.commit().await.expect("commit"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(paused);
    let committed = (0..ORDERS).filter(|n| !rolled_back(*n)).count();
    assert_eq!(committed, 1_000);
    let count = || {
        seen.0
            .lock()
            .expect("seen")
            .values()
            .map(Vec::len)
            .sum::<usize>()
    };
    eventually("every committed order's command", || async {
        count() >= committed
    })
    .await;
    let backlog = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM sourceflow_outbox")
            .fetch_one(&pool)
            .await
            .expect("backlog")
    };
    eventually("an empty outbox", || async { backlog().await == 0 }).await;
    // Longer than a lease: a row sent but not deleted would go again.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let _ = relay.kill();
    let _ = relay.wait();
    let relay_log = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(
        relay_log.contains("outbox relay: the broker did not take every message"),
        "the pause was felt by the relay:\n{relay_log}"
    );
    let seen = seen.0.lock().expect("seen").clone();
    assert_eq!(
        seen.values().map(Vec::len).sum::<usize>(),
        committed,
        "each committed order once"
    );
    for c in 0..CUSTOMERS {
        let want: Vec<u32> = (0..ORDERS)
            .filter(|n| n % CUSTOMERS == c && !rolled_back(*n))
            .collect();
        assert_eq!(
            seen.get(&format!("c{c}")),
            Some(&want),
            "customer c{c}: in commit order, none rolled back"
        );
    }
    let t = consumer.transport();
    let queue = consumer.naming().resource("relay-orders.fifo");
    assert_eq!(depth(&*t, &Naming::dead_letter(&queue)).await, 0);
    consumer.shutdown().await.expect("shutdown");
}
