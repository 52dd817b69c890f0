// SNS takes five keys; sourceflow adds the type, which leaves four for a handler.
#[sourceflow::event(topic = "order-events")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrderCreated {
    pub order_id: u64,
}

#[sourceflow::handler(filter = r#"{"a": ["x"], "b": ["x"], "c": ["x"], "d": ["x"], "e": ["x"]}"#)]
async fn project(_evt: OrderCreated) {}

fn main() {}
