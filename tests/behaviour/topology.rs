//! Topology that evolves across deploys: a handler added to, then removed from, a topic the
//! service is already subscribed to. Every start succeeds and the subscription's filter
//! follows — on SNS a second `Subscribe` with another filter policy is refused, so the
//! bootstrapper corrects the existing subscription instead. A subscription the service no
//! longer needs is reported, and removed only by `prune`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::topology::Finding;
use sourceflow::{event, handler, State};

use crate::harness::{eventually, Harness};

#[event(topic = "topology-order-events", name = "tests.OrderPlaced.topo.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub n: u32,
}

#[event(topic = "topology-order-events", name = "tests.OrderRefunded.topo.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderRefunded {
    pub n: u32,
}

#[event(topic = "topology-audit-events", name = "tests.Audited.topo.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Audited {
    pub n: u32,
}

/// What each handler saw: `(type, n)`.
#[derive(Clone, Default)]
pub struct Seen(pub Arc<Mutex<Vec<(&'static str, u32)>>>);

impl Seen {
    fn of(&self, ty: &str) -> Vec<u32> {
        let seen = self.0.lock().expect("seen");
        seen.iter()
            .filter(|(t, _)| *t == ty)
            .map(|(_, n)| *n)
            .collect()
    }
}

#[handler]
async fn on_placed(evt: OrderPlaced, State(s): State<Seen>) -> sourceflow::Result<()> {
    s.0.lock().expect("seen").push(("placed", evt.n));
    Ok(())
}

#[handler]
async fn on_refunded(evt: OrderRefunded, State(s): State<Seen>) -> sourceflow::Result<()> {
    s.0.lock().expect("seen").push(("refunded", evt.n));
    Ok(())
}

#[handler]
async fn on_audited(evt: Audited, State(s): State<Seen>) -> sourceflow::Result<()> {
    s.0.lock().expect("seen").push(("audited", evt.n));
    Ok(())
}

/// One deploy of the service with exactly the handlers named.
async fn deploy(h: &Harness, seen: &Seen, handlers: &'static [&'static str]) -> sourceflow::Handle {
    h.service("topology", module_path!())
        .handlers(move |r| r.module_path == module_path!() && handlers.contains(&r.name))
        .state(seen.clone())
        .start()
        .await
        .unwrap_or_else(|e| panic!("a deploy with {handlers:?} must start: {e}"))
}

/// Raises one of each type with `n`, and waits until what should arrive has.
async fn raise_both(app: &sourceflow::Handle, seen: &Seen, n: u32, refunds_arrive: bool) {
    app.raise(OrderPlaced { n }).await.expect("raise");
    app.raise(OrderRefunded { n }).await.expect("raise");
    eventually("the placed order arrives", || async {
        seen.of("placed").contains(&n)
    })
    .await;
    if refunds_arrive {
        eventually("the refund arrives", || async {
            seen.of("refunded").contains(&n)
        })
        .await;
    } else {
        // Time for a wrongly delivered refund to be handled (or dead-lettered).
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_and_removing_a_handler_on_a_subscribed_topic_moves_the_filter() {
    let h = Harness::new().await;
    let seen = Seen::default();

    let first = deploy(&h, &seen, &["on_placed"]).await;
    let queue = first.subscriber_queue_of::<OrderPlaced>();
    raise_both(&first, &seen, 1, false).await;
    first.shutdown().await.expect("shutdown");

    // The same topic and queue, a second type: the subscription's filter must grow.
    let second = deploy(&h, &seen, &["on_placed", "on_refunded"]).await;
    raise_both(&second, &seen, 2, true).await;
    second.shutdown().await.expect("shutdown");

    // Back to one type: the filter shrinks, refunds stop arriving.
    let third = deploy(&h, &seen, &["on_placed"]).await;
    raise_both(&third, &seen, 3, false).await;
    assert_eq!(seen.of("placed"), vec![1, 2, 3]);
    assert_eq!(
        seen.of("refunded"),
        vec![2],
        "refunds arrive only while a handler needs them"
    );
    let dlq = sourceflow::naming::Naming::dead_letter(&queue);
    h.assert_empty(&dlq, Duration::from_millis(300)).await;
    assert!(
        third.inspect().await.expect("inspect").is_empty(),
        "nothing differs after the third deploy: {:?}",
        third.inspect().await
    );
    third.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_no_handler_needs_is_reported_and_pruned_never_removed_at_startup() {
    let h = Harness::new().await;
    let seen = Seen::default();
    let first = deploy(&h, &seen, &["on_placed", "on_audited"]).await;
    first.shutdown().await.expect("shutdown");

    // The audit handler is gone: its queue's subscription stays until pruned.
    let second = deploy(&h, &seen, &["on_placed"]).await;
    let audit_topic = second.topic_of::<Audited>();
    let audit_queue = second.subscriber_queue_of::<Audited>();
    let findings = second.inspect().await.expect("inspect");
    assert_eq!(
        findings,
        vec![Finding::Stale {
            topic: audit_topic.clone(),
            queue: audit_queue.clone(),
        }],
        "exactly the stale subscription"
    );
    // Startup did not remove it: audit events still reach the old queue.
    second.raise(Audited { n: 1 }).await.expect("raise");
    eventually("the stale subscription still delivers", || async {
        matches!(h.transport.queue_depth(&audit_queue).await, Ok(Some(d)) if d.total() == 1)
            || !matches!(h.transport.queue_depth(&audit_queue).await, Ok(Some(_)))
    })
    .await;

    let removed = second.prune().await.expect("prune");
    assert_eq!(removed, vec![(audit_topic, audit_queue.clone())]);
    assert!(second.inspect().await.expect("inspect").is_empty());
    h.drain(&audit_queue, 1).await;
    second.raise(Audited { n: 2 }).await.expect("raise");
    h.assert_empty(&audit_queue, Duration::from_millis(1500))
        .await;
    second.shutdown().await.expect("shutdown");
}
