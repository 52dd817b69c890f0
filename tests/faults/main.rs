//! Fault tests, from outside: the idempotency store stopped and restarted while messages
//! flow, the broker paused (SIGSTOP) and resumed, a worker process SIGKILLed after its
//! effect and before its delete, or between the send and the delete of a message held
//! back (not due yet).
//!
//! They stop PostgreSQL and pause the emulator on purpose, so `tests/run.sh` gives this
//! binary a second emulator and a second PostgreSQL of its own (beside the AWS suite on
//! the first ones) and runs it one test at a time:
//!
//! ```text
//! eval "$(tests/support/emulator.sh start)"; eval "$(tests/support/postgres.sh start)"
//! SOURCEFLOW_TEST_FAULTS=1 cargo test -p sourceflow --all-features --test faults -- --test-threads=1
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::idempotency::IdempotencyStore;
use sourceflow::naming::Naming;
use sourceflow::transport::aws::AwsTransport;
use sourceflow::transport::Transport;
use sourceflow::{command, event, handler, Context, SendOptions, State};

/// How long any expectation may take.
const PATIENCE: Duration = Duration::from_secs(180);

#[path = "../common/emulator.rs"]
mod emulator;

fn enabled() -> bool {
    emulator::enabled(
        "SOURCEFLOW_TEST_FAULTS",
        "tests/run.sh does, running this binary alone",
    )
}

/// Log lines of this process (sourceflow at `warn` and up), to count what the faults did.
fn logs() -> Arc<Mutex<String>> {
    static LOGS: std::sync::OnceLock<Arc<Mutex<String>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs: Arc<Mutex<String>> = Arc::default();
        let sink = logs.clone();
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_env_filter(
                std::env::var("FAULTS_LOG")
                    .ok()
                    .filter(|f| f.contains('='))
                    .unwrap_or_else(|| "sourceflow=warn".into()),
            )
            .with_writer(move || Sink(sink.clone()))
            .try_init();
        logs
    })
    .clone()
}

struct Sink(Arc<Mutex<String>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::env::var_os("FAULTS_LOG").is_some() {
            eprint!("{}", String::from_utf8_lossy(buf));
        }
        self.0
            .lock()
            .expect("logs")
            .push_str(&String::from_utf8_lossy(buf));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Lines of the captured log that contain `needle`.
fn log_lines(needle: &str) -> usize {
    logs()
        .lock()
        .expect("logs")
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

fn prefix() -> String {
    format!("flt{}", fastrand::u32(..) % 1_000_000)
}

async fn aws() -> AwsTransport {
    AwsTransport::from_env().await.expect("AWS transport")
}

/// Polls `check` until it holds; panics naming `what` after [`PATIENCE`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Messages in a queue, by state (the emulator counts exactly).
async fn depth(t: &dyn Transport, queue: &str) -> usize {
    t.queue_depth(queue)
        .await
        .expect("depth")
        .expect("the AWS transport counts")
        .total()
}

/// A SQLite database file `{name}.db` under the temporary directory, created on first
/// connect: its path (to remove it after) and its URL.
fn sqlite_file(name: &str) -> (std::path::PathBuf, String) {
    let path = std::env::temp_dir().join(format!("{name}.db"));
    let url = format!("sqlite://{}?mode=rwc", path.display());
    (path, url)
}

fn run(cmd: &str, args: &[&str]) {
    let status = std::process::Command::new(cmd)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(status.success(), "{cmd} {args:?} failed: {status}");
}

mod chaos;
#[path = "../common/postgres.rs"]
mod postgres;
mod relay;

// ---- 1,000 messages through an outage -------------------------------------------------

mod flow {
    use super::*;

    pub const MODULE: &str = module_path!();

    #[command(queue = "faults-jobs", name = "faults.Job.v1")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Job {
        pub id: u32,
    }

    /// How often each job's handler ran, and when handlers ran.
    #[derive(Clone, Default)]
    pub struct Handled(
        pub Arc<Mutex<HashMap<u32, u32>>>,
        pub Arc<Mutex<Vec<std::time::Instant>>>,
    );

    impl Handled {
        pub fn distinct(&self) -> usize {
            self.0.lock().expect("handled").len()
        }

        /// The longest stretch without any handler run.
        pub fn longest_gap(&self) -> Duration {
            let times = self.1.lock().expect("times");
            times
                .windows(2)
                .map(|w| w[1] - w[0])
                .max()
                .unwrap_or_default()
        }
    }

    #[handler]
    async fn job(cmd: Job, State(h): State<Handled>) -> sourceflow::Result<()> {
        *h.0.lock().expect("handled").entry(cmd.id).or_default() += 1;
        h.1.lock().expect("times").push(std::time::Instant::now());
        Ok(())
    }
}

const JOBS: u32 = 1_000;

/// A transport whose calls give up quickly (one retry, 3 s per attempt), so that a broker
/// that stops answering makes receives, deletes and heartbeats fail instead of wait.
async fn impatient() -> AwsTransport {
    let cfg = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(2))
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(2))
                .operation_attempt_timeout(Duration::from_secs(3))
                .build(),
        )
        .load()
        .await;
    AwsTransport::from_sdk_config(&cfg)
}

/// Sends 1,000 jobs over ~10 s through `transport` while `disturb` runs (from 2 s in), then
/// checks that every job was handled exactly once and that nothing went to the
/// dead-letter queue.
async fn flow_survives<F, Fut>(
    transport: AwsTransport,
    store: Option<Arc<dyn IdempotencyStore>>,
    disturb: F,
) where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let p = prefix();
    logs();
    let handled = flow::Handled::default();
    let mut worker = sourceflow::builder()
        .service("faults")
        .prefix(&p)
        .transport(transport.clone())
        .handlers(|h| h.module_path == flow::MODULE)
        .state(handled.clone())
        .concurrency(20)
        .receive_wait(Duration::from_secs(1));
    if let Some(store) = store {
        worker = worker.idempotency_arc(store);
    }
    let worker = worker.start().await.expect("worker");
    let sender = sourceflow::builder()
        .service("faults-client")
        .prefix(&p)
        .transport(transport)
        .handlers(|_| false)
        .start()
        .await
        .expect("sender");
    let run = p.clone();
    let producing = tokio::spawn(async move {
        for id in 0..JOBS {
            // A send that fails is repeated under the same message id, as a producer should.
            let options = SendOptions::new().message_id(format!("{run}-job-{id}"));
            while let Err(e) = sender.send_with(flow::Job { id }, options.clone()).await {
                eprintln!("send of job {id} failed, repeating it: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sender
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    disturb().await;
    let sender = producing.await.expect("producer");
    let t = worker.transport();
    let queue = worker.queue_of::<flow::Job>();
    let dlq = Naming::dead_letter(&queue);
    eventually("every job handled", || async {
        let dead = depth(&*t, &dlq).await;
        assert_eq!(dead, 0, "{dead} healthy jobs were dead-lettered");
        handled.distinct() == JOBS as usize
    })
    .await;
    // Time for a duplicate run to show.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let gap = handled.longest_gap();
    assert!(
        gap >= Duration::from_secs(15),
        "the outage was felt: handling stopped for {gap:?}"
    );
    let counts = handled.0.lock().expect("handled").clone();
    let twice: Vec<(u32, u32)> = counts.into_iter().filter(|(_, n)| *n != 1).collect();
    assert!(twice.is_empty(), "jobs not handled exactly once: {twice:?}");
    assert_eq!(depth(&*t, &dlq).await, 0, "no job was dead-lettered");
    eventually("the queue is empty", || async {
        depth(&*t, &queue).await == 0
    })
    .await;
    worker.shutdown().await.expect("shutdown");
    sender.shutdown().await.expect("shutdown");
}

/// The idempotency store (PostgreSQL) is stopped for 30 s while 1,000 jobs flow: claims
/// fail, messages go back with an infrastructure backoff that spends none of their
/// attempts, completions the store refuses are retried in place; afterwards every job has
/// run exactly once and nothing is in the dead-letter queue. (Before the delivery core
/// was rebuilt, the same run dead-lettered 127 healthy messages.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idempotency_store_down_for_30_s_dead_letters_nothing() {
    if !enabled() {
        return;
    }
    let url = std::env::var("SOURCEFLOW_TEST_POSTGRES_URL").expect("SOURCEFLOW_TEST_POSTGRES_URL");
    // A pool that gives up on a connection within 1 s: claims fail fast during the outage,
    // so messages come back several times (each return is a receive for the broker).
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(1))
        .connect(&url)
        .await
        .expect("pool");
    let store = sourceflow::idempotency::PostgresIdempotencyStore::from_pool(pool)
        .await
        .expect("store");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/support/postgres.sh");
    flow_survives(aws().await, Some(Arc::new(store)), || async {
        run(script, &["stop"]);
        eprintln!("PostgreSQL stopped");
        tokio::time::sleep(Duration::from_secs(30)).await;
        run(script, &["start"]);
        eprintln!("PostgreSQL started again");
    })
    .await;
    assert!(
        log_lines("idempotency store `postgres` unavailable") > 0,
        "the outage was felt: claims failed while the store was down"
    );
}

/// Resumes the paused emulator however the test ends.
struct Paused(String);

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0])
            .status();
    }
}

/// The broker (the emulator process) is paused with SIGSTOP for 20 s while 1,000 jobs flow
/// (idempotency in memory, the default), with SDK calls that give up after 3 s: receives,
/// deletes and heartbeats fail meanwhile; every job runs exactly once and nothing is
/// dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_paused_for_20_s_dead_letters_nothing() {
    if !enabled() {
        return;
    }
    let pidfile = std::env::var("SOURCEFLOW_TEST_EMULATOR_PIDFILE")
        .expect("SOURCEFLOW_TEST_EMULATOR_PIDFILE (tests/support/emulator.sh exports it)");
    let pid = std::fs::read_to_string(&pidfile)
        .expect("emulator pid")
        .trim()
        .to_string();
    flow_survives(impatient().await, None, || async {
        run("kill", &["-STOP", &pid]);
        let paused = Paused(pid.clone());
        eprintln!("emulator paused");
        tokio::time::sleep(Duration::from_secs(20)).await;
        drop(paused);
        eprintln!("emulator resumed");
    })
    .await;
    assert!(
        log_lines("receive failed") > 0,
        "the pause was felt: receives failed while the broker did not answer"
    );
}

// ---- a worker killed after its effect --------------------------------------------------

mod crash {
    use super::*;

    pub const MODULE: &str = module_path!();

    #[command(queue = "faults-ship", name = "faults.Ship.v1")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Ship {
        pub parcel: u32,
    }

    #[event(topic = "faults-shipped", name = "faults.Shipped.v1")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Shipped {
        pub parcel: u32,
    }

    /// The effect is outbox-only: the event it raises.
    #[handler]
    async fn ship(cmd: Ship, ctx: &Context) -> sourceflow::Result<()> {
        ctx.raise(Shipped { parcel: cmd.parcel }).await
    }

    /// The worker, with idempotency off or with its claims in SQLite at `db`.
    pub async fn worker(prefix: &str, db: Option<&str>) -> sourceflow::Handle {
        let b = sourceflow::builder()
            .service("faults-shipper")
            .prefix(prefix)
            .transport(aws().await)
            .handlers(|h| h.module_path == MODULE)
            // Short, so that the killed worker's message comes back quickly.
            .visibility_timeout(Duration::from_secs(2))
            .receive_wait(Duration::from_secs(1))
            // A message delayed longer than this waits in hops of it (sent again each time).
            .native_delay_cap(REDELAY_HOP);
        let b = match db {
            None => b.without_idempotency(),
            Some(url) => b.idempotency(
                sourceflow::idempotency::SqliteIdempotencyStore::connect(url)
                    .await
                    .expect("store"),
            ),
        };
        b.start().await.expect("worker")
    }
}

mod downstream {
    use super::*;

    pub const MODULE: &str = module_path!();

    /// The ids of every delivery of the event (duplicates included).
    #[derive(Clone, Default)]
    pub struct Deliveries(pub Arc<Mutex<Vec<String>>>);

    impl Deliveries {
        pub fn all(&self) -> Vec<String> {
            self.0.lock().expect("deliveries").clone()
        }
    }

    #[handler]
    async fn shipped(
        _evt: crash::Shipped,
        ctx: &Context,
        State(d): State<Deliveries>,
    ) -> sourceflow::Result<()> {
        d.0.lock()
            .expect("deliveries")
            .push(ctx.message_id().to_string());
        Ok(())
    }
}

/// The longest native delay of the crash tests' services: a longer delay is waited out
/// in hops, the message sent again delayed by at most this each time.
const REDELAY_HOP: Duration = Duration::from_secs(1);

/// Runs only as the child process of the crash tests: a worker that pauses at the fail
/// point `FAULTS_FAIL_POINT` (by default after its effect was committed and dispatched,
/// before the delete) until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the worker process of the crash tests"]
async fn crash_worker_process() {
    let Ok(prefix) = std::env::var("FAULTS_PREFIX") else {
        return;
    };
    let db = std::env::var("FAULTS_DB").ok();
    let point =
        std::env::var("FAULTS_FAIL_POINT").unwrap_or_else(|_| "sourceflow::before-delete".into());
    fail::cfg(point, "return(120000)").expect("fail point");
    let _worker = crash::worker(&prefix, db.as_deref()).await;
    tokio::time::sleep(Duration::from_secs(150)).await;
}

/// The downstream service that records every delivery of the event (no idempotency: a
/// duplicate is counted), also the sender of the commands (delayed in hops like the workers).
async fn observer(p: &str, deliveries: &downstream::Deliveries) -> sourceflow::Handle {
    sourceflow::builder()
        .service("faults-observer")
        .prefix(p)
        .transport(aws().await)
        .handlers(|h| h.module_path == downstream::MODULE)
        .state(deliveries.clone())
        // Every delivery counts: nothing may hide a duplicate.
        .without_idempotency()
        .receive_wait(Duration::from_secs(1))
        .native_delay_cap(REDELAY_HOP)
        .start()
        .await
        .expect("observer")
}

/// Starts the worker process that pauses at `point` (see [`crash_worker_process`]).
fn crash_worker_child(p: &str, db: Option<&str>, point: &str) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--ignored",
            "--exact",
            "crash_worker_process",
            "--nocapture",
        ])
        .env("FAULTS_PREFIX", p)
        .env("FAULTS_FAIL_POINT", point)
        .envs(db.map(|d| ("FAULTS_DB", d)))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("worker process")
}

/// Kills a worker process after its effect (the event it raised went out) and before it
/// deleted the message, then lets a replacement take the message: returns the deliveries
/// the downstream service saw, and the replacement.
async fn kill_after_the_effect(p: &str, db: Option<&str>) -> (Vec<String>, sourceflow::Handle) {
    let deliveries = downstream::Deliveries::default();
    let observer = observer(p, &deliveries).await;
    let mut child = crash_worker_child(p, db, "sourceflow::before-delete");
    observer
        .send(crash::Ship { parcel: 1 })
        .await
        .expect("send");
    eventually("the effect is visible downstream", || async {
        deliveries.all().len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        deliveries.all().len(),
        1,
        "the worker is paused before its delete"
    );
    // SIGKILL: no delete, no release, no hand-back.
    child.kill().expect("kill");
    let _ = child.wait();
    let replacement = crash::worker(p, db).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    observer.shutdown().await.expect("shutdown");
    (deliveries.all(), replacement)
}

/// Kills a worker process between the two steps of holding back a message not due yet:
/// it sent the delayed copy and has not deleted the copy it received, so two copies of one
/// message id are on the queue. A replacement takes both through their remaining hops to
/// the due time; returns the deliveries downstream once the queue is empty, and the
/// replacement.
async fn kill_between_redelay_send_and_delete(
    p: &str,
    db: Option<&str>,
) -> (Vec<String>, sourceflow::Handle) {
    let deliveries = downstream::Deliveries::default();
    let observer = observer(p, &deliveries).await;
    let mut child = crash_worker_child(p, db, "sourceflow::after-redelay-send");
    let later = SendOptions::new().delay(Duration::from_secs(8));
    observer
        .send_with(crash::Ship { parcel: 2 }, later)
        .await
        .expect("send");
    let queue = observer.queue_of::<crash::Ship>();
    let t = observer.transport();
    let depth_now = || async {
        let d = t.queue_depth(&queue).await.ok().flatten();
        d.map_or(0, |d| d.total())
    };
    eventually("the worker sent the delayed copy and paused", || async {
        depth_now().await == 2
    })
    .await;
    // SIGKILL: the copy it received is neither deleted nor handed back.
    child.kill().expect("kill");
    let _ = child.wait();
    assert!(deliveries.all().is_empty(), "not due yet: nothing ran");
    let replacement = crash::worker(p, db).await;
    eventually("the message ran at its due time", || async {
        !deliveries.all().is_empty()
    })
    .await;
    eventually("both copies are settled", || async {
        depth_now().await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(depth(&*t, &Naming::dead_letter(&queue)).await, 0);
    observer.shutdown().await.expect("shutdown");
    (deliveries.all(), replacement)
}

/// Without idempotency the redelivered message runs its handler again: the effect is
/// visible twice (with the same derived event id). This is what the next test's
/// guarantee is measured against.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_after_its_effect_repeats_it_without_idempotency() {
    if !enabled() {
        return;
    }
    let p = prefix();
    let (deliveries, replacement) = kill_after_the_effect(&p, None).await;
    assert_eq!(
        deliveries.len(),
        2,
        "the effect happened twice: {deliveries:?}"
    );
    assert_eq!(
        deliveries[0], deliveries[1],
        "the re-run derived the same event id"
    );
    let queue = replacement.queue_of::<crash::Ship>();
    let t = replacement.transport();
    eventually("the message is done", || async {
        depth(&*t, &queue).await == 0
    })
    .await;
    replacement.shutdown().await.expect("shutdown");
}

/// With the claims in SQLite the redelivery of a message whose effect was committed and
/// dispatched is acknowledged as a duplicate: the effect is visible once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_after_its_effect_does_not_repeat_it_with_idempotency() {
    if !enabled() {
        return;
    }
    let p = prefix();
    let (path, db) = sqlite_file(&format!("sourceflow-faults-{p}"));
    let (deliveries, replacement) = kill_after_the_effect(&p, Some(&db)).await;
    assert_eq!(
        deliveries.len(),
        1,
        "the effect happened once: {deliveries:?}"
    );
    let stats = replacement.idempotency_stats().expect("stats");
    assert_eq!(
        stats.duplicates, 1,
        "the redelivery was recognised: {stats:?}"
    );
    let queue = replacement.queue_of::<crash::Ship>();
    let t = replacement.transport();
    eventually("the message is done", || async {
        depth(&*t, &queue).await == 0
    })
    .await;
    assert_eq!(depth(&*t, &Naming::dead_letter(&queue)).await, 0);
    replacement.shutdown().await.expect("shutdown");
    let _ = std::fs::remove_file(&path);
}

/// Without idempotency both copies of a message killed mid-redelay run the handler: the
/// effect is visible twice (same event id). The control for the next test: the kill did
/// leave two copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_redelay_leaves_two_copies_without_idempotency() {
    if !enabled() {
        return;
    }
    let p = prefix();
    let (deliveries, replacement) = kill_between_redelay_send_and_delete(&p, None).await;
    assert_eq!(deliveries.len(), 2, "two copies, two runs: {deliveries:?}");
    assert_eq!(deliveries[0], deliveries[1], "one message id");
    replacement.shutdown().await.expect("shutdown");
}

/// With the claims in SQLite the second copy left by a worker killed mid-redelay is
/// acknowledged as a duplicate: the handler's effect is visible once, nothing dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_redelay_runs_the_message_once_with_idempotency() {
    if !enabled() {
        return;
    }
    let p = prefix();
    let (path, db) = sqlite_file(&format!("sourceflow-faults-{p}"));
    let (deliveries, replacement) = kill_between_redelay_send_and_delete(&p, Some(&db)).await;
    assert_eq!(
        deliveries.len(),
        1,
        "the effect happened once: {deliveries:?}"
    );
    let stats = replacement.idempotency_stats().expect("stats");
    assert_eq!(
        stats.duplicates, 1,
        "the second copy was recognised: {stats:?}"
    );
    replacement.shutdown().await.expect("shutdown");
    let _ = std::fs::remove_file(&path);
}
