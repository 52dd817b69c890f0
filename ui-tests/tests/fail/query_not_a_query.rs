// `Handle::query` takes a #[query] type; a command is sent instead.
#[sourceflow::command(queue = "orders")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    pub order_id: u64,
}

async fn ask(app: sourceflow::Handle) -> sourceflow::Result<()> {
    app.query(CreateOrder { order_id: 1 }).await?;
    Ok(())
}

fn main() {
    let _ = ask;
}
