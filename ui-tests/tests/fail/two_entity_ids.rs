// Only one field can be the entity id.
#[sourceflow::command(queue = "orders.fifo")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    #[entity_id]
    pub order_id: u64,
    #[entity_id]
    pub customer_id: u64,
}

fn main() {}
