// A queue name cannot be empty.
#[sourceflow::command(queue = "")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    pub order_id: u64,
}

fn main() {}
