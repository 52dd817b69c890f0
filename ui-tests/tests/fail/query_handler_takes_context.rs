// A query is answered in process, outside any message: its handler has no `&Context`.
#[sourceflow::query(response = bool)]
pub struct IsPaid {
    pub order_id: u64,
}

#[sourceflow::handler]
async fn is_paid(_q: IsPaid, _ctx: &sourceflow::Context) -> sourceflow::Result<bool> {
    Ok(true)
}

fn main() {}
