// A handler writes in its transaction: `&mut`, not `&`.
use sourceflow::tx::Postgres;
use sourceflow::Tx;

#[sourceflow::command(queue = "orders")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    pub order_id: u64,
}

#[sourceflow::handler]
async fn create_order(_cmd: CreateOrder, _tx: &Tx<Postgres>) -> sourceflow::Result<()> {
    Ok(())
}

fn main() {}
