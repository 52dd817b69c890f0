// Commands are sent to a queue, not published to a topic.
#[sourceflow::command(topic = "orders")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    pub order_id: u64,
}

fn main() {}
