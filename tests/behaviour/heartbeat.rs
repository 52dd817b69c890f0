//! A handler that runs longer than the visibility timeout keeps its message: the listener's
//! heartbeat extends the visibility, so it is not delivered a second time (idempotency is
//! off, so a second delivery would run the handler again).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::naming::Naming;
use sourceflow::{command, handler, State};

use crate::harness::{eventually, Harness};

#[command(queue = "heartbeat-reports")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BuildReport {
    id: u32,
}

#[derive(Clone, Default)]
struct Runs {
    started: Arc<AtomicU32>,
    finished: Arc<AtomicU32>,
}

#[handler]
async fn build_report(_cmd: BuildReport, State(r): State<Runs>) -> sourceflow::Result<()> {
    r.started.fetch_add(1, Ordering::SeqCst);
    // Three visibility timeouts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    r.finished.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_handler_keeps_its_message_invisible() {
    let h = Harness::new().await;
    let runs = Runs::default();
    let app = h
        .service("heartbeat", module_path!())
        .state(runs.clone())
        .visibility_timeout(Duration::from_secs(1))
        // Idempotency would acknowledge a redelivery as a duplicate and hide a broken
        // heartbeat; without it a redelivery runs the handler a second time.
        .without_idempotency()
        .start()
        .await
        .expect("start");
    app.send(BuildReport { id: 1 }).await.expect("send");
    eventually("the report is built", || async {
        runs.finished.load(Ordering::SeqCst) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        runs.started.load(Ordering::SeqCst),
        1,
        "the message was delivered again while its handler was running"
    );
    h.assert_empty(&app.queue_of::<BuildReport>(), Duration::from_millis(200))
        .await;
    h.assert_empty(
        &Naming::dead_letter(&app.queue_of::<BuildReport>()),
        Duration::from_millis(200),
    )
    .await;
    app.shutdown().await.expect("shutdown");
}
