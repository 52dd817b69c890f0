// A command on a FIFO queue needs an #[entity_id] for its MessageGroupId.
#[sourceflow::command(queue = "orders.fifo")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    pub order_id: u64,
}

fn main() {}
