// An enum cannot carry an #[entity_id], so it cannot go to a FIFO queue.
#[sourceflow::command(queue = "orders.fifo")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum OrderCommand {
    Create { order_id: u64 },
    Cancel { order_id: u64 },
}

fn main() {}
