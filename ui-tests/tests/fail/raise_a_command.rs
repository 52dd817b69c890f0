// Commands are sent, not raised.
use sourceflow::Context;

#[sourceflow::command(queue = "payments")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ProcessPayment {
    pub order_id: u64,
}

#[sourceflow::event(topic = "order-events")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrderCreated {
    pub order_id: u64,
}

#[sourceflow::handler]
async fn request_payment(evt: OrderCreated, ctx: &Context) -> sourceflow::Result<()> {
    ctx.raise(ProcessPayment { order_id: evt.order_id }).await
}

fn main() {}
