//! After the receive limit, a failing message lands in the dead-letter queue, intact.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::envelope;
use sourceflow::naming::Naming;
use sourceflow::{command, handler, State};

use crate::harness::{dlq_reason, eventually, Harness};

#[command(queue = "dlq-payments.fifo", name = "tests.ChargeCard.v1")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ChargeCard {
    #[entity_id]
    order_id: u64,
    amount_cents: u64,
    note: String,
}

#[derive(Clone, Default)]
struct Count(Arc<AtomicU32>);

#[handler]
async fn charge(_cmd: ChargeCard, State(c): State<Count>) -> sourceflow::Result<()> {
    c.0.fetch_add(1, Ordering::SeqCst);
    Err(sourceflow::Error::other("card declined"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_goes_to_dlq_after_max_receive_count_with_body_intact() {
    let h = Harness::new().await;
    let count = Count::default();
    let app = h
        .service("dlq", module_path!())
        // This module only, not the redrive submodule below.
        .handlers(|r| r.module_path == module_path!())
        .state(count.clone())
        .max_receive_count(3)
        .start()
        .await
        .expect("start");
    let cmd = ChargeCard {
        order_id: 42,
        amount_cents: 1999,
        note: "ünïcode ✓ and \"quotes\"".into(),
    };
    let id = app.send(cmd.clone()).await.expect("send");
    let dlq = Naming::dead_letter(&app.queue_of::<ChargeCard>());
    let dead = h.drain(&dlq, 1).await;
    assert_eq!(dead.len(), 1, "exactly one message in the DLQ");
    assert_eq!(
        count.0.load(Ordering::SeqCst),
        3,
        "handled exactly max_receive_count times"
    );

    let m = &dead[0];
    let env = envelope::decode(&m.body, &m.attributes).expect("DLQ body is the original envelope");
    assert_eq!(env.id, id);
    assert_eq!(env.wire_name, "tests.ChargeCard.v1");
    let payload: ChargeCard = serde_json::from_str(env.payload.get()).expect("payload");
    assert_eq!(payload, cmd);
    assert_eq!(m.group_id.as_deref(), Some("42"), "FIFO group id kept");
    let reason = dlq_reason(m).expect("reason attribute");
    assert!(reason.contains("card declined"), "reason: {reason}");
    assert!(reason.contains("3 times"), "reason: {reason}");

    // Nothing else happens to it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count.0.load(Ordering::SeqCst), 3);
    h.assert_empty(&app.queue_of::<ChargeCard>(), Duration::from_millis(200))
        .await;
    // The listener goes on: a message sent after the poison is handled.
    app.send(ChargeCard {
        order_id: 43,
        amount_cents: 1,
        note: "after".into(),
    })
    .await
    .expect("send");
    eventually("the next message is handled", || async {
        count.0.load(Ordering::SeqCst) >= 4
    })
    .await;
    app.shutdown().await.expect("shutdown");
}

mod redrive {
    use super::*;
    use std::sync::atomic::AtomicBool;

    pub const MODULE: &str = module_path!();

    #[command(queue = "dlq-redrive.fifo", name = "tests.Reconcile.v1")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Reconcile {
        #[entity_id]
        pub account: String,
        pub step: u32,
    }

    #[derive(Clone, Default)]
    pub struct Switch {
        pub broken: Arc<AtomicBool>,
        pub done: Arc<std::sync::Mutex<Vec<(String, u32)>>>,
    }

    #[handler]
    async fn reconcile(cmd: Reconcile, State(s): State<Switch>) -> sourceflow::Result<()> {
        if s.broken.load(Ordering::SeqCst) {
            return Err(sourceflow::Error::other("ledger offline"));
        }
        s.done.lock().expect("done").push((cmd.account, cmd.step));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_redriven_to_their_queue_with_group_ids() {
    let h = Harness::new().await;
    let switch = redrive::Switch::default();
    switch.broken.store(true, Ordering::SeqCst);
    let app = h
        .service("redrive", redrive::MODULE)
        .state(switch.clone())
        .max_receive_count(1)
        .start()
        .await
        .expect("start");
    let queue = app.queue_of::<redrive::Reconcile>();
    for step in 0..3 {
        app.send(redrive::Reconcile {
            account: "acc-9".into(),
            step,
        })
        .await
        .expect("send");
    }
    let dlq = Naming::dead_letter(&queue);
    eventually("all three dead-lettered", || async {
        match h.transport.queue_depth(&dlq).await {
            Ok(Some(d)) => d.total() == 3,
            // Transports that cannot count: wait for the listener to give up instead.
            _ => true,
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    switch.broken.store(false, Ordering::SeqCst);
    let moved = app.redrive(&queue).await.expect("redrive");
    assert_eq!(moved, 3);
    eventually("the redriven messages are handled", || async {
        switch.done.lock().expect("done").len() == 3
    })
    .await;
    let done = switch.done.lock().expect("done").clone();
    assert_eq!(
        done,
        vec![
            ("acc-9".to_string(), 0),
            ("acc-9".to_string(), 1),
            ("acc-9".to_string(), 2)
        ],
        "same group, same order"
    );
    h.assert_empty(&dlq, Duration::from_millis(200)).await;
    app.shutdown().await.expect("shutdown");
}
