// A numeric condition compares with a number, not a string.
#[sourceflow::event(topic = "order-events")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrderCreated {
    pub order_id: u64,
}

#[sourceflow::handler(filter = r#"{"amount": [{"numeric": [">=", "100"]}]}"#)]
async fn project(_evt: OrderCreated) {}

fn main() {}
