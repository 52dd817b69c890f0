// A queue-level delay would hold back every group of a FIFO queue.
#[sourceflow::command(queue = "orders.fifo", delay = 30)]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    #[entity_id]
    pub order_id: u64,
}

fn main() {}
