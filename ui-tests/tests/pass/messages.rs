// Every supported message shape compiles, and #[sensitive] masks Debug output.
use sourceflow::{Command, Event, Message, MessageKind};

#[sourceflow::command(queue = "orders")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StandardCommand {
    pub id: u64,
}

#[sourceflow::command(queue = "orders.fifo", name = "orders.CreateOrder.v1")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FifoCommand {
    #[entity_id]
    pub order_id: String,
    #[sensitive(card)]
    pub card_number: String,
    #[sensitive(email)]
    pub email: String,
    #[sensitive]
    pub cvv: String,
}

#[sourceflow::event(topic = "order-events")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StandardEvent {
    #[entity_id]
    pub id: uuid::Uuid,
}

#[sourceflow::event(topic = "shipments.fifo", name = "orders.OrderShipped.v1")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrderShipped {
    #[entity_id]
    pub order_id: u64,
    pub carrier: String,
}

#[sourceflow::event(topic = "ledger.fifo", encrypt)]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FifoEvent(#[entity_id] pub u32, pub i64);

#[sourceflow::command(queue = "admin")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum AdminCommand {
    Pause,
    Resume { reason: String },
    Rename(String, #[sensitive] String),
}

fn assert_command<C: Command>() {}
fn assert_event<E: Event>() {}

fn main() {
    assert_command::<StandardCommand>();
    assert_command::<FifoCommand>();
    assert_command::<AdminCommand>();
    assert_event::<StandardEvent>();
    assert_event::<FifoEvent>();
    assert_event::<OrderShipped>();
    assert_eq!(FifoCommand::NAME, "orders.CreateOrder.v1");
    assert_eq!(StandardCommand::NAME, "StandardCommand");
    assert!(FifoCommand::FIFO && !StandardCommand::FIFO);
    assert_eq!(StandardEvent::KIND, MessageKind::Event);
    assert!(FifoEvent::ENCRYPT && !StandardEvent::ENCRYPT);
    assert_eq!(FifoEvent(7, 1).entity_id().as_deref(), Some("7"));
    assert_eq!(StandardCommand { id: 1 }.entity_id(), None);
    let shipped = OrderShipped {
        order_id: 42,
        carrier: "ups".into(),
    };
    assert_eq!(shipped.entity_id().as_deref(), Some("42"));
    assert!(OrderShipped::FIFO && OrderShipped::HAS_ENTITY_ID);
    assert_eq!(OrderShipped::DESTINATION, "shipments.fifo");
    let id = uuid::Uuid::nil();
    assert_eq!(StandardEvent { id }.entity_id(), Some(id.to_string()));

    let cmd = FifoCommand {
        order_id: "o-1".into(),
        card_number: "4111 1111 1111 1234".into(),
        email: "jane@example.com".into(),
        cvv: "987".into(),
    };
    assert_eq!(cmd.entity_id().as_deref(), Some("o-1"));
    let shown = format!("{cmd:?}");
    for secret in ["4111", "jane@", "987"] {
        assert!(!shown.contains(secret), "{secret} leaked into {shown}");
    }
    assert_eq!(
        shown,
        r#"FifoCommand { order_id: "o-1", card_number: "****1234", email: "j***@example.com", cvv: "***" }"#
    );
    let shown = format!("{:?}", AdminCommand::Rename("a".into(), "secret".into()));
    assert!(!shown.contains("secret"));
    assert_eq!(shown, r#"Rename("a", "***")"#);
}
