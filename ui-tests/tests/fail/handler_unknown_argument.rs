// A typo in a #[handler] argument is caught.
#[sourceflow::event(topic = "order-events")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrderCreated {
    pub order_id: u64,
}

#[sourceflow::handler(queu = "billing-order-events")]
async fn bill(_evt: OrderCreated) {}

fn main() {}
