// A query names the type its handler answers with.
#[sourceflow::query]
pub struct GetOrder {
    pub order_id: u64,
}

fn main() {}
