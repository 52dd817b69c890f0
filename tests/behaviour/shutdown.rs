//! Graceful shutdown finishes what is in flight and loses nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::{command, handler, State};

use crate::harness::{eventually, Harness};

#[command(queue = "shutdown-jobs")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: u32,
}

#[derive(Clone, Default)]
struct Jobs {
    started: Arc<Mutex<Vec<u32>>>,
    done: Arc<Mutex<HashMap<u32, u32>>>,
    /// While set, jobs take far longer than the shutdown deadline.
    stuck: Arc<AtomicBool>,
}

impl Jobs {
    fn done_count(&self) -> usize {
        self.done.lock().expect("lock").len()
    }
}

#[handler]
async fn job(cmd: Job, State(j): State<Jobs>) -> sourceflow::Result<()> {
    j.started.lock().expect("lock").push(cmd.id);
    let wait = if j.stuck.load(Ordering::SeqCst) {
        30_000
    } else {
        100
    };
    tokio::time::sleep(Duration::from_millis(wait)).await;
    *j.done.lock().expect("lock").entry(cmd.id).or_default() += 1;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_work_and_loses_nothing() {
    let h = Harness::new().await;
    let jobs = Jobs::default();
    let first = h
        .service("shutdown", module_path!())
        .state(jobs.clone())
        .concurrency(4)
        .start()
        .await
        .expect("start");
    for id in 0..30 {
        first.send(Job { id }).await.expect("send");
    }
    eventually("some jobs started", || async {
        jobs.started.lock().expect("lock").len() >= 2
    })
    .await;
    let report = first.shutdown().await.expect("shutdown");
    let done_at_stop = jobs.done_count();
    assert!(
        report.finished >= 1,
        "in-flight jobs finished during the drain: {report:?}"
    );
    assert!(done_at_stop < 30, "shutdown happened mid-way");
    assert_eq!(report.returned, 0, "nothing had to be abandoned");
    assert!(
        first.send(Job { id: 99 }).await.is_err(),
        "a shut-down handle refuses to send"
    );

    // A new instance picks up the rest; every job is done exactly once.
    let second = h
        .service("shutdown", module_path!())
        .state(jobs.clone())
        .concurrency(8)
        .start()
        .await
        .expect("restart");
    eventually("all 30 jobs done", || async { jobs.done_count() == 30 }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let done = jobs.done.lock().expect("lock").clone();
    assert_eq!(done.len(), 30);
    assert!(done.values().all(|n| *n == 1), "a job ran twice: {done:?}");
    second.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_deadline_returns_unfinished_messages_to_the_queue() {
    let h = Harness::new().await;
    let jobs = Jobs::default();
    jobs.stuck.store(true, Ordering::SeqCst);
    let first = h
        .service("shutdown-deadline", module_path!())
        .state(jobs.clone())
        .concurrency(3)
        .shutdown_timeout(Duration::from_millis(300))
        .start()
        .await
        .expect("start");
    for id in 0..3 {
        first.send(Job { id }).await.expect("send");
    }
    eventually("three stuck jobs started", || async {
        jobs.started.lock().expect("lock").len() == 3
    })
    .await;
    let report = first.shutdown().await.expect("shutdown");
    assert_eq!(report.finished, 0);
    assert_eq!(
        report.returned, 3,
        "abandoned messages were handed back: {report:?}"
    );

    jobs.stuck.store(false, Ordering::SeqCst);
    let second = h
        .service("shutdown-deadline", module_path!())
        .state(jobs.clone())
        .start()
        .await
        .expect("restart");
    eventually("the returned jobs are done", || async {
        jobs.done_count() == 3
    })
    .await;
    second.shutdown().await.expect("shutdown");
}
