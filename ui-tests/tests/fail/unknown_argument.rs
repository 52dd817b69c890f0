// A typo in an argument is caught.
#[sourceflow::command(queu = "orders")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    pub order_id: u64,
}

fn main() {}
