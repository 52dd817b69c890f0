//! FIFO deduplication: a retried send (same message id) is dropped within the window; two
//! distinct commands with equal content are not.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::{command, handler, SendOptions, State};

use crate::harness::{eventually, Harness};

#[command(queue = "dedup-inbox.fifo")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Deposit {
    #[entity_id]
    account: String,
    cents: u64,
}

#[derive(Clone, Default)]
struct Total(Arc<AtomicU32>);

#[handler]
async fn deposit(cmd: Deposit, State(t): State<Total>) -> sourceflow::Result<()> {
    t.0.fetch_add(cmd.cents as u32, Ordering::SeqCst);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_fifo_send_is_dropped_within_the_window() {
    let h = Harness::new().await;
    let total = Total::default();
    let app = h
        .service("dedup", module_path!())
        .state(total.clone())
        // The broker's deduplication is under test: idempotency would hide a duplicate
        // delivery (same message id) by acknowledging it.
        .without_idempotency()
        .start()
        .await
        .expect("start");
    let cmd = Deposit {
        account: "acc-1".into(),
        cents: 100,
    };
    let pinned = uuid::Uuid::new_v4().to_string();
    // A producer retries the same send three times (same message id).
    for _ in 0..3 {
        let id = app
            .send_with(cmd.clone(), SendOptions::new().message_id(pinned.clone()))
            .await
            .expect("send");
        assert_eq!(id, pinned);
    }
    // Two distinct deposits with equal content are both real.
    app.send(cmd.clone()).await.expect("send");
    app.send(cmd.clone()).await.expect("send");
    eventually("three deposits", || async {
        total.0.load(Ordering::SeqCst) >= 300
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        total.0.load(Ordering::SeqCst),
        300,
        "the retried send was deduplicated"
    );
    app.shutdown().await.expect("shutdown");
}
