// The context is lent to the handler: `&Context`, not `Context` or `&mut Context`.
use sourceflow::Context;

#[sourceflow::command(queue = "orders")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    pub order_id: u64,
}

#[sourceflow::handler]
async fn create_order(_cmd: CreateOrder, _ctx: Context) -> sourceflow::Result<()> {
    Ok(())
}

fn main() {}
