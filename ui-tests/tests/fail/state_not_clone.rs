// Every invocation gets its own clone of the state, so `State<T>` needs `T: Clone`.
use sourceflow::State;

#[sourceflow::command(queue = "orders")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    pub order_id: u64,
}

pub struct Db;

#[sourceflow::handler]
async fn create_order(_cmd: CreateOrder, _db: State<Db>) {}

fn main() {}
