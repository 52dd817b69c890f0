// A command handler returns `()` or `Result<(), E>`: one that returns a value answers a #[query].
#[sourceflow::command(queue = "orders")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    pub order_id: u64,
}

#[sourceflow::handler]
async fn create_order(cmd: CreateOrder) -> u64 {
    cmd.order_id
}

fn main() {}
