// Server-side encryption is "sqs", "kms:<key>" or "none".
#[sourceflow::command(queue = "payments", sse = "aes")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Charge {
    pub id: u64,
}

fn main() {}
