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
    eventually("listener still running", || async { !app.is_shut_down() }).await;
    app.shutdown().await.expect("shutdown");
}
