// One message, one transaction.
use sourceflow::tx::Postgres;
use sourceflow::Tx;

#[sourceflow::command(queue = "orders")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    pub order_id: u64,
}

#[sourceflow::handler]
async fn create_order(
    _cmd: CreateOrder,
    _a: &mut Tx<Postgres>,
    _b: &mut Tx<Postgres>,
) -> sourceflow::Result<()> {
    Ok(())
}

fn main() {}
