//! Listener liveness: busy is not dead, stuck is.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::health::Status;
use sourceflow::{command, handler, State};

use crate::harness::{eventually, Faulty, Harness};

#[command(queue = "liveness-reports")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LongReport {
    id: u32,
}

#[derive(Clone, Default)]
struct Started(Arc<AtomicU32>);

#[handler]
async fn long_report(_cmd: LongReport, State(s): State<Started>) -> sourceflow::Result<()> {
    s.0.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(5)).await;
    Ok(())
}

/// Every handler slot held by a long handler: the poller waits for a slot and does not
/// poll, but the heartbeat runs, so the listener is healthy (busy), for far longer than
/// the liveness bound of one poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_whose_slots_are_all_held_by_heartbeating_handlers_is_healthy() {
    let h = Harness::new().await;
    let started = Started::default();
    let app = h
        .service("liveness-busy", module_path!())
        .state(started.clone())
        .concurrency(1)
        .visibility_timeout(Duration::from_secs(2))
        .liveness_slack(Duration::from_secs(1))
        .start()
        .await
        .expect("start");
    let name = format!("listener {}", app.queue_of::<LongReport>());
    app.send(LongReport { id: 1 }).await.expect("send");
    eventually("the long handler started", || async {
        started.0.load(Ordering::SeqCst) == 1
    })
    .await;
    // Through the handler's 5 s and past its end, while the listener polls again.
    let mut busy_seen = false;
    for _ in 0..28 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let report = app.health().await;
        let check = report.check(&name).expect("listener check").clone();
        assert_eq!(check.status, Status::Healthy, "busy is not dead: {check:?}");
        busy_seen |= check.detail.starts_with("busy");
    }
    assert!(busy_seen, "the check says the listener is busy");
    app.shutdown().await.expect("shutdown");
}

/// A loop whose receive never returns (and whose slots are free) is stuck: unhealthy once
/// the bound has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_listener_turns_unhealthy() {
    let h = Harness::new().await;
    let transport = Faulty::new(h.transport.clone());
    let app = h
        .service("liveness-stuck", module_path!())
        .transport(transport.clone())
        .state(Started::default())
        .liveness_slack(Duration::from_secs(1))
        .start()
        .await
        .expect("start");
    let name = format!("listener {}", app.queue_of::<LongReport>());
    transport.hang_receive.store(true, Ordering::SeqCst);
    eventually("the stuck listener is unhealthy", || async {
        let report = app.health().await;
        report
            .check(&name)
            .is_some_and(|c| c.status == Status::Unhealthy)
    })
    .await;
    transport.hang_receive.store(false, Ordering::SeqCst);
    let stop = tokio::time::timeout(Duration::from_secs(20), app.shutdown()).await;
    assert!(
        stop.is_ok(),
        "shutdown is bounded even with a receive that never returns"
    );
}

// ---- concurrency 1: a backlog drains without waiting out a long poll -------------------

mod serial {
    use super::*;
    pub const MODULE: &str = module_path!();

    #[command(queue = "liveness-serial", name = "tests.SerialStep.v1")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Step {
        pub n: u32,
    }

    #[derive(Clone, Default)]
    pub struct Done(pub Arc<AtomicU32>);

    #[handler]
    async fn step(_cmd: Step, State(d): State<Done>) -> sourceflow::Result<()> {
        d.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// With one handler slot, the poller receives a batch ahead; it must not then sit in a long
/// poll on the drained queue holding the only slot while the units it received wait for
/// it (they did, for the whole 20 s receive wait, before the poller waited for their slots
/// itself). The receive wait here is 20 s; the backlog must drain well before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_slot_a_backlog_drains_without_waiting_out_a_long_poll() {
    let h = Harness::new().await;
    let done = serial::Done::default();
    let app = h
        .service("liveness-serial", serial::MODULE)
        .concurrency(1)
        .receive_wait(Duration::from_secs(20))
        .state(done.clone())
        .start()
        .await
        .expect("start");
    const N: u32 = 25;
    for n in 0..N {
        app.send(serial::Step { n }).await.expect("send");
    }
    let started = tokio::time::Instant::now();
    while done.0.load(Ordering::SeqCst) < N {
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "{} of {N} handled after {:?}: units wait behind a long poll",
            done.0.load(Ordering::SeqCst),
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    app.shutdown().await.expect("shutdown");
}
