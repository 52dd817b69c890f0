//! Idempotent processing: the same message delivered many times, to several competing
//! instances, has its effect once; an in-progress duplicate waits; a reused id with another
//! payload is refused.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::idempotency::{IdempotencyStore, MemoryIdempotencyStore};
use sourceflow::naming::Naming;
use sourceflow::{command, handler, SendOptions, State};

use crate::harness::{dlq_reason, eventually, Harness};

#[command(queue = "idem-payments", name = "tests.CapturePayment.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CapturePayment {
    payment_id: u64,
    cents: u64,
    slow_ms: u64,
}

#[derive(Clone, Default)]
struct Ledger {
    captures: Arc<AtomicU32>,
    cents: Arc<AtomicU32>,
}

#[handler]
async fn capture(cmd: CapturePayment, State(l): State<Ledger>) -> sourceflow::Result<()> {
    tokio::time::sleep(Duration::from_millis(cmd.slow_ms)).await;
    l.captures.fetch_add(1, Ordering::SeqCst);
    l.cents.fetch_add(cmd.cents as u32, Ordering::SeqCst);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_deliveries_to_four_instances_have_one_effect() {
    let h = Harness::new().await;
    let ledger = Ledger::default();
    let store: Arc<dyn IdempotencyStore> = Arc::new(MemoryIdempotencyStore::new());
    let mut instances = Vec::new();
    for _ in 0..4 {
        instances.push(
            h.service("idem", module_path!())
                .state(ledger.clone())
                .idempotency_arc(store.clone())
                .concurrency(5)
                .start()
                .await
                .expect("start"),
        );
    }
    let id = uuid::Uuid::new_v4().to_string();
    let cmd = CapturePayment {
        payment_id: 1,
        cents: 500,
        slow_ms: 20,
    };
    // The producer re-sends the same message 20 times (a standard queue does not dedupe).
    let sends = (0..20).map(|i| {
        let app = instances[i % 4].clone();
        let cmd = cmd.clone();
        let id = id.clone();
        async move {
            app.send_with(cmd, SendOptions::new().message_id(id))
                .await
                .expect("send")
        }
    });
    futures_util::future::join_all(sends).await;
    let queue = instances[0].queue_of::<CapturePayment>();
    eventually("all 20 deliveries acknowledged", || async {
        let stats: u64 = instances
            .iter()
            .map(|i| i.idempotency_stats().expect("stats").duplicates)
            .sum();
        stats == 19
    })
    .await;
    assert_eq!(
        ledger.captures.load(Ordering::SeqCst),
        1,
        "the effect happened once"
    );
    assert_eq!(ledger.cents.load(Ordering::SeqCst), 500);
    let unique: u64 = instances
        .iter()
        .map(|i| i.idempotency_stats().expect("stats").unique)
        .sum();
    assert_eq!(unique, 1);
    h.assert_empty(&queue, Duration::from_millis(300)).await;
    h.assert_empty(&Naming::dead_letter(&queue), Duration::from_millis(100))
        .await;
    assert_eq!(store.size().await.expect("size"), 1);
    for app in instances {
        app.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_progress_duplicate_is_deferred_then_acknowledged() {
    let h = Harness::new().await;
    let ledger = Ledger::default();
    let app = h
        .service("idem-defer", module_path!())
        .state(ledger.clone())
        .start()
        .await
        .expect("start");
    let id = uuid::Uuid::new_v4().to_string();
    let cmd = CapturePayment {
        payment_id: 2,
        cents: 100,
        slow_ms: 1500,
    };
    app.send_with(cmd.clone(), SendOptions::new().message_id(id.clone()))
        .await
        .expect("send");
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.send_with(cmd, SendOptions::new().message_id(id))
        .await
        .expect("send duplicate");
    eventually(
        "the duplicate was deferred while the original ran",
        || async { app.idempotency_stats().expect("stats").deferred >= 1 },
    )
    .await;
    assert_eq!(
        ledger.captures.load(Ordering::SeqCst),
        0,
        "the original is still running"
    );
    eventually(
        "the duplicate is acknowledged after the original completes",
        || async { app.idempotency_stats().expect("stats").duplicates == 1 },
    )
    .await;
    assert_eq!(ledger.captures.load(Ordering::SeqCst), 1);
    h.assert_empty(
        &app.queue_of::<CapturePayment>(),
        Duration::from_millis(300),
    )
    .await;
    app.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_id_with_another_payload_goes_to_the_dlq() {
    let h = Harness::new().await;
    let ledger = Ledger::default();
    let app = h
        .service("idem-mismatch", module_path!())
        .state(ledger.clone())
        .start()
        .await
        .expect("start");
    let id = uuid::Uuid::new_v4().to_string();
    app.send_with(
        CapturePayment {
            payment_id: 3,
            cents: 100,
            slow_ms: 0,
        },
        SendOptions::new().message_id(id.clone()),
    )
    .await
    .expect("send");
    eventually("first handled", || async {
        ledger.captures.load(Ordering::SeqCst) == 1
    })
    .await;
    app.send_with(
        CapturePayment {
            payment_id: 3,
            cents: 999_999,
            slow_ms: 0,
        },
        SendOptions::new().message_id(id.clone()),
    )
    .await
    .expect("send");
    let dlq = Naming::dead_letter(&app.queue_of::<CapturePayment>());
    let dead = h.drain(&dlq, 1).await;
    assert_eq!(dead.len(), 1);
    let reason = dlq_reason(&dead[0]).expect("reason");
    assert!(
        reason.contains(&id) && reason.contains("different payload"),
        "{reason}"
    );
    assert!(
        dead[0].body.contains("999999"),
        "the refused message is kept whole"
    );
    assert_eq!(
        ledger.cents.load(Ordering::SeqCst),
        100,
        "the second payload never ran"
    );
    assert_eq!(app.idempotency_stats().expect("stats").mismatches, 1);
    app.shutdown().await.expect("shutdown");
}
