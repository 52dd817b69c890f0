//! The message traits that `#[command]` and `#[event]` implement, and entity ids.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Whether a message is a command (one queue, one handler) or an event (one topic, fanned
/// out to every service that handles it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// Sent with `send` to exactly one SQS queue; exactly one handler per binary.
    Command,
    /// Published with `raise` to an SNS topic; any number of handlers.
    Event,
}

impl std::fmt::Display for MessageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MessageKind::Command => "command",
            MessageKind::Event => "event",
        })
    }
}

/// A type that travels through sourceflow. Implemented by `#[command]` and `#[event]`;
/// do not implement it by hand.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a sourceflow command or event",
    label = "not a command or event",
    note = "declare it with `#[sourceflow::command(queue = \"...\")]` or `#[sourceflow::event(topic = \"...\")]`"
)]
pub trait Message: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The stable wire name (`name = "..."`, or the type's ident).
    const NAME: &'static str;
    /// Command or event.
    const KIND: MessageKind;
    /// The queue (commands) or topic (events) name as declared, without environment prefix.
    const DESTINATION: &'static str;
    /// True for `.fifo` queues and topics.
    const FIFO: bool;
    /// True when one field is marked `#[entity_id]`.
    const HAS_ENTITY_ID: bool;
    /// True when declared with `encrypt`: the payload is always encrypted.
    const ENCRYPT: bool = false;
    /// The settings its route declares for its queue (commands).
    const QUEUE_OPTIONS: crate::registry::QueueOptions = crate::registry::QueueOptions::NONE;
    /// The value of the `#[entity_id]` field, if the type has one.
    fn entity_id(&self) -> Option<String>;
}

/// A message sent to one queue and handled by exactly one handler.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a command, so it cannot be sent with `send`",
    label = "not a command",
    note = "events are published with `raise(..)`; a command is declared with `#[command(queue = \"...\")]`"
)]
pub trait Command: Message {}

/// A message published to a topic and delivered to every service that handles it.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an event, so it cannot be published with `raise`",
    label = "not an event",
    note = "commands are sent with `send(..)`; an event is declared with `#[event(topic = \"...\")]`"
)]
pub trait Event: Message {}

/// A value that can identify an entity: it becomes the FIFO `MessageGroupId` and the
/// envelope's entity id. Implemented for integers, strings and `uuid::Uuid`.
///
/// A group id must be 1-128 characters of ASCII letters, digits and punctuation; string ids
/// are checked when the message is sent.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be used as an #[entity_id]",
    label = "this type cannot become a FIFO message group id",
    note = "use an integer, a `String` or a `uuid::Uuid`, or implement `sourceflow::EntityId` to turn it into a short string"
)]
pub trait EntityId {
    /// The id as it goes on the wire.
    fn to_entity_id(&self) -> String;
}

macro_rules! entity_id_display {
    ($($t:ty),*) => {$(
        impl EntityId for $t {
            fn to_entity_id(&self) -> String { self.to_string() }
        }
    )*};
}
entity_id_display!(
    u8,
    u16,
    u32,
    u64,
    u128,
    usize,
    i8,
    i16,
    i32,
    i64,
    i128,
    isize,
    String,
    str,
    uuid::Uuid
);

impl EntityId for Box<str> {
    fn to_entity_id(&self) -> String {
        self.to_string()
    }
}

impl EntityId for std::sync::Arc<str> {
    fn to_entity_id(&self) -> String {
        self.to_string()
    }
}

impl<T: EntityId + ?Sized> EntityId for &T {
    fn to_entity_id(&self) -> String {
        (**self).to_entity_id()
    }
}

/// Checks an entity id against the SQS `MessageGroupId` rules.
pub(crate) fn check_group_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("entity id is empty; a FIFO message group id needs 1-128 characters".into());
    }
    if id.len() > 128 {
        return Err(format!(
            "entity id is {} characters long; a FIFO message group id allows 128",
            id.len()
        ));
    }
    if let Some(c) = id.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "entity id contains {c:?}; a FIFO message group id allows ASCII letters, digits and punctuation only"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_id_rules() {
        assert!(check_group_id("order-42").is_ok());
        assert!(check_group_id("").is_err());
        assert!(check_group_id(&"x".repeat(129)).is_err());
        assert!(check_group_id("has space").is_err());
        assert_eq!(42u64.to_entity_id(), "42");
    }
}
