// A handler's filter is an SNS filter policy, checked when it compiles.
#[sourceflow::event(topic = "order-events")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrderCreated {
    pub order_id: u64,
}

#[sourceflow::handler(filter = r#"{"region": [{"regex": "eu-.*"}]}"#)]
async fn project(_evt: OrderCreated) {}

fn main() {}
