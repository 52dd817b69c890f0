// An enum variant's field cannot be the entity id: the other variants may not have it.
#[sourceflow::command(queue = "orders")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum OrderCommand {
    Create {
        #[entity_id]
        order_id: u64,
    },
    Cancel,
}

fn main() {}
