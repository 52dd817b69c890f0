// A `.` is only allowed in the `.fifo` suffix.
#[sourceflow::command(queue = "orders.v1.fifo")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    #[entity_id]
    pub order_id: u64,
}

fn main() {}
