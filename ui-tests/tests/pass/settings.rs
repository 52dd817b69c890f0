// Every queue setting, on a command's queue and on an event handler's subscriber queue,
// and a filter policy with each operator.

#[sourceflow::command(
    queue = "payments.fifo",
    visibility_timeout = "2m",
    retention = "7d",
    max_receive_count = 8,
    high_throughput,
    sse = "kms:alias/payments",
    tags(team = "payments", cost_center = "42")
)]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Charge {
    #[entity_id]
    pub order_id: u64,
}

#[sourceflow::command(queue = "reports", visibility_timeout = 600, delay = "30s", sse = "none")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BuildReport {
    pub id: u64,
}

#[sourceflow::event(topic = "order-events")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrderCreated {
    pub order_id: u64,
}

#[sourceflow::handler]
async fn charge(_cmd: Charge) {}

#[sourceflow::handler]
async fn build(_cmd: BuildReport) {}

#[sourceflow::handler(
    visibility_timeout = 120,
    retention = "1d",
    max_receive_count = 3,
    sse = "sqs",
    tags(team = "analytics"),
    // Four keys: SNS takes five, and sourceflow adds the type to every branch.
    filter = r#"{
        "region": ["eu-west-1", {"prefix": "us-"}],
        "amount": [{"numeric": [">=", 100, "<", 1000]}],
        "channel": [{"anything-but": ["test"]}, {"exists": false}],
        "$or": [{"tier": ["gold"]}, {"tier": [{"equals-ignore-case": "PLATINUM"}]}]
    }"#
)]
async fn project(_evt: OrderCreated) {}

fn main() {}
