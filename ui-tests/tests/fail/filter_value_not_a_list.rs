// Every key of a filter policy takes a list of conditions (SNS refuses a bare value).
#[sourceflow::event(topic = "order-events")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrderCreated {
    pub order_id: u64,
}

#[sourceflow::handler(filter = r#"{"region": "eu-west-1"}"#)]
async fn project(_evt: OrderCreated) {}

fn main() {}
