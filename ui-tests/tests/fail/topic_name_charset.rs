// SNS topic names allow letters, digits, `-` and `_` only.
#[sourceflow::event(topic = "order events")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrderCreated {
    pub order_id: u64,
}

fn main() {}
