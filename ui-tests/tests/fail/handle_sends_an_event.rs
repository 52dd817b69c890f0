// The handle outside handlers follows the same rule: events are raised.
#[sourceflow::event(topic = "order-events")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrderCreated {
    pub order_id: u64,
}

async fn endpoint(app: sourceflow::Handle) -> sourceflow::Result<String> {
    app.send(OrderCreated { order_id: 1 }).await
}

fn main() {
    let _ = endpoint;
}
