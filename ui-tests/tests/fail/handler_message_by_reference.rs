// The handler owns the message: take it by value.
#[sourceflow::command(queue = "orders")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    pub order_id: u64,
}

#[sourceflow::handler]
async fn create_order(_cmd: &CreateOrder) -> sourceflow::Result<()> {
    Ok(())
}

fn main() {}
