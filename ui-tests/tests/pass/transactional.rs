// A transactional handler: its transaction with the context and state, in any order.
use sourceflow::tx::Postgres;
use sourceflow::{Context, State, Tx};

#[sourceflow::command(queue = "orders")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    pub order_id: u64,
}

#[sourceflow::event(topic = "order-events")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrderCreated {
    pub order_id: u64,
}

#[derive(Clone)]
pub struct Prices;

#[sourceflow::handler]
async fn create_order(
    cmd: CreateOrder,
    ctx: &Context,
    tx: &mut Tx<Postgres>,
    State(_prices): State<Prices>,
) -> sourceflow::Result<()> {
    let _conn: &mut sqlx::PgConnection = tx;
    ctx.raise(OrderCreated { order_id: cmd.order_id }).await
}

#[sourceflow::handler]
async fn project(_evt: OrderCreated, _tx: &mut sqlx::Transaction<'_, Postgres>) -> sourceflow::Result<()> {
    Ok(())
}

fn main() {}
