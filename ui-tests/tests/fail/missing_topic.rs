// An event must say which topic it goes to.
#[sourceflow::event(name = "orders.OrderCreated.v1")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrderCreated {
    pub order_id: u64,
}

fn main() {}
