// After the message, a handler takes only `&Context` and `State<T>`.
#[sourceflow::command(queue = "orders")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    pub order_id: u64,
}

#[sourceflow::handler]
async fn create_order(_cmd: CreateOrder, _retries: u32) -> sourceflow::Result<()> {
    Ok(())
}

fn main() {}
