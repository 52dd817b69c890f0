// The FIFO suffix is lower-case `.fifo`.
#[sourceflow::command(queue = "orders.FIFO")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    #[entity_id]
    pub order_id: u64,
}

fn main() {}
