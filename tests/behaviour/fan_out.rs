//! Every service that handles an event gets it once; instances of one service compete.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::event;

use crate::harness::{eventually, Harness};

#[event(topic = "fanout-order-events")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderShipped {
    #[entity_id]
    order_id: u64,
}

#[event(topic = "fanout-order-events")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderCancelled {
    order_id: u64,
}

#[derive(Clone, Default)]
pub struct Count(pub Arc<AtomicU32>);

impl Count {
    fn get(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }
}

mod billing {
    use super::{Count, OrderShipped};
    use sourceflow::{handler, State};

    pub const MODULE: &str = module_path!();

    #[handler]
    async fn bill(_evt: OrderShipped, State(c): State<Count>) -> sourceflow::Result<()> {
        c.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

mod shipping {
    use super::{Count, OrderCancelled, OrderShipped};
    use sourceflow::{handler, State};

    pub const MODULE: &str = module_path!();

    #[handler]
    async fn ship(_evt: OrderShipped, State(c): State<Count>) -> sourceflow::Result<()> {
        c.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    #[derive(Clone, Default)]
    pub struct Cancelled(pub Count);

    #[handler]
    async fn cancel(_evt: OrderCancelled, State(c): State<Cancelled>) -> sourceflow::Result<()> {
        c.0 .0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_gets_each_event_once() {
    let h = Harness::new().await;
    let billed = Count::default();
    let shipped = Count::default();
    let cancelled = shipping::Cancelled::default();
    // Two instances of billing compete on one queue; shipping runs once.
    let billing_a = h
        .service("billing", billing::MODULE)
        .state(billed.clone())
        .start()
        .await
        .expect("billing a");
    let billing_b = h
        .service("billing", billing::MODULE)
        .state(billed.clone())
        .start()
        .await
        .expect("billing b");
    let shipping = h
        .service("shipping", shipping::MODULE)
        .state(shipped.clone())
        .state(cancelled.clone())
        .start()
        .await
        .expect("shipping");

    assert_ne!(
        billing_a.subscriber_queue_of::<OrderShipped>(),
        shipping.subscriber_queue_of::<OrderShipped>(),
        "each service has its own subscriber queue"
    );
    for order_id in 0..25 {
        billing_a
            .raise(OrderShipped { order_id })
            .await
            .expect("raise");
    }
    for order_id in 0..3 {
        shipping
            .raise(OrderCancelled { order_id })
            .await
            .expect("raise");
    }
    eventually("billing and shipping saw 25 each", || async {
        billed.get() >= 25 && shipped.get() >= 25 && cancelled.0.get() >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        billed.get(),
        25,
        "billing (two instances) handled each event once"
    );
    assert_eq!(shipped.get(), 25, "shipping handled each event once");
    assert_eq!(cancelled.0.get(), 3);
    // Billing does not handle OrderCancelled: its subscription filters it out, so nothing
    // reached its queue or its dead-letter queue.
    let billing_queue = billing_a.subscriber_queue_of::<OrderShipped>();
    h.assert_empty(
        &sourceflow::naming::Naming::dead_letter(&billing_queue),
        Duration::from_millis(200),
    )
    .await;
    for app in [billing_a, billing_b, shipping] {
        app.shutdown().await.expect("shutdown");
    }
}
