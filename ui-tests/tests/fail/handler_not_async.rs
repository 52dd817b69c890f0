// Handlers are awaited: they must be `async fn`.
#[sourceflow::command(queue = "orders")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    pub order_id: u64,
}

#[sourceflow::handler]
fn create_order(_cmd: CreateOrder) -> sourceflow::Result<()> {
    Ok(())
}

fn main() {}
