// `#[sensitive]` masks fully, as a card or as an e-mail address; nothing else.
#[sourceflow::command(queue = "payments")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ProcessPayment {
    pub order_id: u64,
    #[sensitive(cvv)]
    pub cvv: String,
}

fn main() {}
