// A query handler answers with the query's response type.
#[derive(Debug, Clone)]
pub struct OrderView {
    pub paid: bool,
}

#[sourceflow::query(response = OrderView)]
pub struct GetOrder {
    pub order_id: u64,
}

#[sourceflow::handler]
async fn get_order(q: GetOrder) -> sourceflow::Result<String> {
    Ok(q.order_id.to_string())
}

fn main() {}
