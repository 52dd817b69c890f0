// The handle outside handlers follows the same rule: commands are sent, not raised.
#[sourceflow::command(queue = "orders")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    pub order_id: u64,
}

async fn endpoint(app: sourceflow::Handle) -> sourceflow::Result<String> {
    app.raise(CreateOrder { order_id: 1 }).await
}

fn main() {
    let _ = endpoint;
}
