// sourceflow filters on the message type itself.
#[sourceflow::event(topic = "order-events")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrderCreated {
    pub order_id: u64,
}

#[sourceflow::handler(filter = r#"{"sourceflow.type": ["OrderCreated"]}"#)]
async fn project(_evt: OrderCreated) {}

fn main() {}
