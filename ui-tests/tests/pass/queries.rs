// Query handlers: with and without state, `sourceflow::Result` or any error type, and
// asked from a handle and from a handler's context.
use sourceflow::{command, handler, query, Context, State};

#[derive(Debug, Clone, Default)]
pub struct OrderView {
    pub paid: bool,
}

#[derive(Clone, Default)]
pub struct Db;

#[query(response = Option<OrderView>, name = "orders.GetOrder")]
pub struct GetOrder {
    pub order_id: u64,
}

#[query(response = Vec<u64>)]
pub enum ListOrders {
    All,
    Paid,
}

#[derive(Debug)]
pub struct Unavailable;

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("unavailable")
    }
}

impl std::error::Error for Unavailable {}

#[handler]
async fn get_order(_q: GetOrder, State(_db): State<Db>) -> sourceflow::Result<Option<OrderView>> {
    Ok(None)
}

#[handler]
async fn list_orders(q: ListOrders) -> Result<Vec<u64>, Unavailable> {
    match q {
        ListOrders::All => Ok(vec![1, 2]),
        ListOrders::Paid => Err(Unavailable),
    }
}

#[command(queue = "orders")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PayOrder {
    pub order_id: u64,
}

#[handler]
async fn pay_order(cmd: PayOrder, ctx: &Context) -> sourceflow::Result<()> {
    let view: Option<OrderView> = ctx.query(GetOrder { order_id: cmd.order_id }).await?;
    let _ = view.map(|v| v.paid);
    Ok(())
}

async fn ask(app: sourceflow::Handle) -> sourceflow::Result<Vec<u64>> {
    app.query(ListOrders::All).await
}

fn main() {
    let _ = ask;
}
