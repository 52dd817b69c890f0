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
    assert_eq!(report.abandoned, 0, "nothing had to be abandoned");
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
    // A visibility timeout longer than the test's patience: only a hand-back brings the
    // abandoned messages back in time.
    let first = h
        .service("shutdown-deadline", module_path!())
        .state(jobs.clone())
        .concurrency(3)
        .visibility_timeout(Duration::from_secs(300))
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
        report.abandoned, 3,
        "abandoned messages were handed back: {report:?}"
    );

    jobs.stuck.store(false, Ordering::SeqCst);
    let second = h
        .service("shutdown-deadline", module_path!())
        .state(jobs.clone())
        .visibility_timeout(Duration::from_secs(300))
        .start()
        .await
        .expect("restart");
    eventually("the returned jobs are done", || async {
        jobs.done_count() == 3
    })
    .await;
    second.shutdown().await.expect("shutdown");
}

mod in_flight_receive {
    use super::*;

    pub const MODULE: &str = module_path!();

    #[command(queue = "shutdown-late")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Late {
        pub id: u32,
    }

    #[derive(Clone, Default)]
    pub struct Seen(pub Arc<Mutex<Vec<u32>>>);

    #[handler]
    async fn late(cmd: Late, State(s): State<Seen>) -> sourceflow::Result<()> {
        s.0.lock().expect("lock").push(cmd.id);
        Ok(())
    }
}

/// SQS keeps an abandoned long poll alive and hands it what arrives: a listener that
/// dropped its receive at shutdown would leave such a message invisible for the whole
/// visibility timeout. The receive in flight is awaited and what it got handed back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_taken_by_the_receive_in_flight_at_shutdown_is_handed_back() {
    use in_flight_receive::{Late, Seen, MODULE};
    let h = Harness::new().await;
    let seen = Seen::default();
    let service = |seen: Seen| {
        h.service("shutdown-late", MODULE)
            .state(seen)
            .concurrency(1)
            // Longer than the test's patience: only a hand-back brings the message back.
            .visibility_timeout(Duration::from_secs(300))
            .receive_wait(Duration::from_secs(3))
    };
    let first = service(Seen::default()).start().await.expect("start");
    let queue = first.queue_of::<Late>();
    // Let the listener's long poll begin on an empty queue.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopping = tokio::spawn({
        let first = first.clone();
        async move { first.shutdown().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Sent while the stopping listener's receive is still waiting on the broker.
    let body = serde_json::json!({"id": 7});
    h.send_raw(
        &queue,
        &format!(
            r#"{{"v":1,"type":"Late","id":"{}","payload":{body}}}"#,
            uuid::Uuid::new_v4()
        ),
        &[("sourceflow.type", "Late")],
        None,
    )
    .await;
    let report = stopping.await.expect("join").expect("shutdown");
    if let Ok(Some(depth)) = h.transport.queue_depth(&queue).await {
        assert_eq!(
            depth.in_flight, 0,
            "nothing is invisible because of the stopped process: {depth:?} ({report:?})"
        );
    }
    let second = service(seen.clone()).start().await.expect("restart");
    eventually(
        "the late message is handled by the next instance",
        || async { seen.0.lock().expect("lock").len() == 1 },
    )
    .await;
    assert_eq!(*seen.0.lock().expect("lock"), vec![7]);
    second.shutdown().await.expect("shutdown");
}

/// A poller receives a whole batch even when fewer handlers can start; what waits for a
/// slot is held invisible, so at shutdown it must be handed back at once, untouched — not
/// left for the visibility timeout (300 s here, past the test's patience).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_received_ahead_and_waiting_for_a_slot_are_handed_back_at_shutdown() {
    let h = Harness::new().await;
    let jobs = Jobs::default();
    let service = || {
        h.service("shutdown-ahead", module_path!())
            .state(jobs.clone())
            .concurrency(1)
            .visibility_timeout(Duration::from_secs(300))
    };
    // A first start provisions the queue; then ten jobs wait in it, sent in one call, so
    // that the next start's first receive takes them all with one slot free.
    let provisioned = service().start().await.expect("provision");
    let queue = provisioned.queue_of::<Job>();
    provisioned.shutdown().await.expect("shutdown");
    let batch = (0..10)
        .map(|id| sourceflow::envelope::encode(&Job { id }, Default::default()).expect("encode"))
        .collect();
    h.transport.send(&queue, batch).await.expect("send");
    let first = service().start().await.expect("start");
    eventually("a job started", || async {
        !jobs.started.lock().expect("lock").is_empty()
    })
    .await;
    let report = first.shutdown().await.expect("shutdown");
    assert_eq!(report.abandoned, 0, "{report:?}");
    assert!(
        report.returned >= 1,
        "what waited for a slot was handed back: {report:?}"
    );
    let second = service().start().await.expect("restart");
    eventually("all 10 jobs done", || async { jobs.done_count() == 10 }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let done = jobs.done.lock().expect("lock").clone();
    assert!(done.values().all(|n| *n == 1), "a job ran twice: {done:?}");
    second.shutdown().await.expect("shutdown");
}
