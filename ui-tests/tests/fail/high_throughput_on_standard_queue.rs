// High throughput is a FIFO setting.
#[sourceflow::command(queue = "payments", high_throughput)]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Charge {
    pub id: u64,
}

fn main() {}
