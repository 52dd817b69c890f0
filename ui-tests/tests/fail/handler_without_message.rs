// A handler takes the message it handles as its first argument.
#[sourceflow::handler]
async fn create_order() -> sourceflow::Result<()> {
    Ok(())
}

fn main() {}
