// Events are raised, not sent.
use sourceflow::Context;

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

#[sourceflow::handler]
async fn create_order(cmd: CreateOrder, ctx: &Context) -> sourceflow::Result<()> {
    ctx.send(OrderCreated { order_id: cmd.order_id }).await
}

fn main() {}
