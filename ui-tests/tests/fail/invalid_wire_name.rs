// Wire names are stable identifiers without spaces.
#[sourceflow::command(queue = "orders", name = "Create Order")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    pub order_id: u64,
}

fn main() {}
