// A numeric range is a lower bound then a higher upper bound, as SNS requires.
#[sourceflow::event(topic = "order-events")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrderCreated {
    pub order_id: u64,
}

#[sourceflow::handler(filter = r#"{"amount": [{"numeric": [">", 100, "<=", 10]}]}"#)]
async fn project(_evt: OrderCreated) {}

fn main() {}
