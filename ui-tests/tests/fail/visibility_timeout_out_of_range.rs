// SQS keeps a message invisible at most 12 hours.
#[sourceflow::command(queue = "reports", visibility_timeout = "13h")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BuildReport {
    pub id: u64,
}

fn main() {}
