// An entity id travels in clear, so it cannot be #[sensitive].
#[sourceflow::command(queue = "cards.fifo", encrypt)]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StoreCard {
    #[entity_id]
    #[sensitive(card)]
    pub card_number: String,
}

fn main() {}
