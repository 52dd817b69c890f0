// Transactions are opened on the idempotency store's database: PostgreSQL or SQLite.
use sourceflow::Tx;

pub struct Oracle;

#[sourceflow::command(queue = "orders")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    pub order_id: u64,
}

#[sourceflow::handler]
async fn create_order(_cmd: CreateOrder, _tx: &mut Tx<Oracle>) -> sourceflow::Result<()> {
    Ok(())
}

fn main() {}
