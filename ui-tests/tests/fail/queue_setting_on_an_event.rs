// An event has no queue of its own: its handlers' subscriber queues take settings.
#[sourceflow::event(topic = "order-events", visibility_timeout = 60)]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrderCreated {
    pub order_id: u64,
}

fn main() {}
