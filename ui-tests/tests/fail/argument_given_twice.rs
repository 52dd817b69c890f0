// Each argument is given once: a command has one queue.
#[sourceflow::command(queue = "orders", queue = "orders-v2")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    pub order_id: u64,
}

fn main() {}
