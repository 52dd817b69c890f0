// The first argument must be a #[command] or #[event] type.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NotAMessage {
    pub order_id: u64,
}

#[sourceflow::handler]
async fn create_order(_cmd: NotAMessage) -> sourceflow::Result<()> {
    Ok(())
}

fn main() {}
