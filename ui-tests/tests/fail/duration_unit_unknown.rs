// A duration is whole seconds or a number with s, m, h or d.
#[sourceflow::command(queue = "reports", retention = "2 weeks")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BuildReport {
    pub id: u64,
}

fn main() {}
