// #[command] declares a message type: it goes on a struct or an enum.
#[sourceflow::command(queue = "orders")]
fn create_order() {}

fn main() {}
