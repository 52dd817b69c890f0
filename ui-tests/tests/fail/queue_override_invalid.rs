// A subscriber queue override must be a valid queue name too.
#[sourceflow::event(topic = "order-events")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrderCreated {
    pub order_id: u64,
}

#[sourceflow::handler(queue = "billing order events")]
async fn bill(_evt: OrderCreated) {}

fn main() {}
