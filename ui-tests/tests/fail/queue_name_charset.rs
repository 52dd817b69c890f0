// SQS queue names allow letters, digits, `-` and `_` only.
#[sourceflow::command(queue = "orders/v1")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    pub order_id: u64,
}

fn main() {}
