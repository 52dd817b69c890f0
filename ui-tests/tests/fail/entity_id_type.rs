// An entity id becomes a MessageGroupId: a float cannot.
#[sourceflow::command(queue = "prices.fifo")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct UpdatePrice {
    #[entity_id]
    pub price: f64,
}

fn main() {}
