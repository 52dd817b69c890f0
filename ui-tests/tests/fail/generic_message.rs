// A wire name maps to one concrete type.
#[sourceflow::command(queue = "orders")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Envelope<T> {
    pub inner: T,
}

fn main() {}
