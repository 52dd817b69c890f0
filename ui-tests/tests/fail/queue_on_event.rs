// Events are published to topics, not sent to queues.
#[sourceflow::event(queue = "order-events")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrderCreated {
    pub order_id: u64,
}

fn main() {}
