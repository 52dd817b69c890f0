// A query answers with a value; work that answers nothing is a command.
#[sourceflow::query(response = ())]
pub struct Recalculate;

fn main() {}
