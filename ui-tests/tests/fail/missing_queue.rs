// A command must say which queue it goes to.
#[sourceflow::command]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    pub order_id: u64,
}

fn main() {}
