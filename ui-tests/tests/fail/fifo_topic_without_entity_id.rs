// An event on a FIFO topic needs an #[entity_id] for its MessageGroupId.
#[sourceflow::event(topic = "order-events.fifo")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrderCreated {
    pub order_id: u64,
}

fn main() {}
