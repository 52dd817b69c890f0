// 77 characters: over the 80-character SQS limit once `-dlq` is added.
#[sourceflow::command(queue = "a-queue-name-that-is-much-too-long-for-sqs-once-the-dead-letter-suffix-is-on1")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    pub order_id: u64,
}

fn main() {}
