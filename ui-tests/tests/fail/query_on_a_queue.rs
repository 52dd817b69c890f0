// A query never travels through a queue.
#[sourceflow::query(response = bool, queue = "orders")]
pub struct IsPaid {
    pub order_id: u64,
}

fn main() {}
