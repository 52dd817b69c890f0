//! What the harness recorded, untyped ([`Recorded`], [`DeadLetter`]) and typed
//! ([`Messages`], [`DeadLettered`]).

use crate::envelope::{self, attr, AttributeValue, Envelope, OutgoingMessage};
use crate::message::{Message, MessageKind};
use crate::transport::ReceivedMessage;

/// One message the broker accepted: a command sent to a queue or an event published to a
/// topic, as it went out (its payload decrypted when it travelled encrypted).
#[derive(Debug, Clone)]
pub struct Recorded {
    kind: MessageKind,
    destination: String,
    wire_name: String,
    message_id: String,
    attributes: Vec<(crate::AttributeName, AttributeValue)>,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    payload: Result<String, String>,
}

impl Recorded {
    pub(crate) fn new(
        kind: MessageKind,
        destination: &str,
        m: &OutgoingMessage,
        payload: Result<String, String>,
    ) -> Self {
        let env: Option<Envelope> = envelope::decode(&m.body, &m.attributes).ok();
        Recorded {
            kind,
            destination: destination.to_string(),
            wire_name: m.wire_name.to_string(),
            message_id: m.message_id.clone(),
            attributes: m.attributes.to_vec(),
            correlation_id: env.as_ref().and_then(|e| e.correlation_id.clone()),
            causation_id: env.and_then(|e| e.causation_id),
            payload,
        }
    }

    /// A command or an event.
    pub fn kind(&self) -> MessageKind {
        self.kind
    }

    /// The queue (command) or topic (event) it went to, by its full name.
    pub fn destination(&self) -> &str {
        &self.destination
    }

    /// Its wire name (`orders.CreateOrder.v1`).
    pub fn wire_name(&self) -> &str {
        &self.wire_name
    }

    /// Its message id.
    pub fn message_id(&self) -> &str {
        &self.message_id
    }

    /// Its correlation id, if it carries one.
    pub fn correlation_id(&self) -> Option<&str> {
        self.correlation_id.as_deref()
    }

    /// The message whose handler produced it, if a handler did.
    pub fn causation_id(&self) -> Option<&str> {
        self.causation_id.as_deref()
    }

    /// A message attribute it carried (one set with
    /// [`SendOptions::attribute`](crate::SendOptions::attribute), or sourceflow's own).
    pub fn attribute(&self, name: &str) -> Option<&AttributeValue> {
        envelope::attribute_value(&self.attributes, name)
    }

    /// Its payload, decoded as `M`; `None` when it is of another type.
    ///
    /// # Panics
    /// When it is an `M` whose payload does not decode as one (the sender and this test
    /// disagree on the type): the message says why.
    pub fn payload<M: Message>(&self) -> Option<M> {
        (self.wire_name == M::NAME).then(|| decode_or_panic(&self.payload, &self.wire_name))
    }
}

fn decode_or_panic<M: Message>(payload: &Result<String, String>, wire_name: &str) -> M {
    let decoded = payload
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|json| crate::payload::decode::<M>(json));
    match decoded {
        Ok(m) => m,
        Err(e) => panic!(
            "a recorded `{wire_name}` does not decode as `{}`: {e}",
            std::any::type_name::<M>()
        ),
    }
}

/// A message the service moved to a dead-letter queue, with the reason it gave.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    queue: String,
    wire_name: Option<String>,
    message_id: Option<String>,
    reason: String,
    receive_count: u32,
    payload: Result<String, String>,
}

impl DeadLetter {
    pub(crate) fn new(
        queue: &str,
        env: Option<&Envelope>,
        m: &ReceivedMessage,
        reason: &str,
        payload: Result<String, String>,
    ) -> Self {
        DeadLetter {
            queue: queue.to_string(),
            wire_name: env
                .map(|e| e.wire_name.clone())
                .or_else(|| envelope::attribute(&m.attributes, attr::TYPE).map(String::from)),
            message_id: env.map(|e| e.id.clone()),
            reason: reason.to_string(),
            receive_count: m.receive_count,
            payload,
        }
    }

    /// The queue it was taken from (its dead-letter queue is `<queue>-dlq`).
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Its wire name, when it had a readable one.
    pub fn wire_name(&self) -> Option<&str> {
        self.wire_name.as_deref()
    }

    /// Its message id, when its envelope was readable.
    pub fn message_id(&self) -> Option<&str> {
        self.message_id.as_deref()
    }

    /// Why: the text sourceflow wrote into its `sourceflow.dlq_reason` attribute (a
    /// [`Reject`](crate::Reject)'s reason, the last error after the attempts ran out, a
    /// decode failure, ...).
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The receive that dead-lettered it (the handler attempts it took, for a failing
    /// handler).
    pub fn receive_count(&self) -> u32 {
        self.receive_count
    }

    /// Its payload, decoded as `M`; `None` when it is of another type.
    ///
    /// # Panics
    /// When it is an `M` whose payload does not decode as one.
    pub fn payload<M: Message>(&self) -> Option<M> {
        let wire_name = self.wire_name.as_deref()?;
        (wire_name == M::NAME).then(|| decode_or_panic(&self.payload, wire_name))
    }
}

/// A dead-lettered message of a known type: the message and the reason.
#[derive(Debug, Clone)]
pub struct DeadLettered<M> {
    /// The message.
    pub message: M,
    /// Why it was dead-lettered (see [`DeadLetter::reason`]).
    pub reason: String,
}

/// Recorded messages of one type, in the order the broker accepted them (for a type, that is
/// the order at its one destination).
///
/// It dereferences to a slice (`len`, `iter`, indexing, `first`, ...) and adds assertions
/// that say what they found when they fail.
#[derive(Debug, Clone)]
pub struct Messages<T> {
    items: Vec<T>,
    what: String,
}

impl<T> Messages<T> {
    pub(crate) fn new(items: Vec<T>, what: String) -> Self {
        Messages { items, what }
    }

    /// The one message recorded.
    ///
    /// # Panics
    /// When there is none, or more than one.
    #[track_caller]
    pub fn assert_one(self) -> T {
        let n = self.items.len();
        let mut items = self.items;
        match (items.pop(), n) {
            (Some(one), 1) => one,
            _ => panic!("expected exactly one {}, found {n}", self.what),
        }
    }

    /// Asserts that nothing was recorded.
    ///
    /// # Panics
    /// When something was.
    #[track_caller]
    pub fn assert_none(&self) {
        let n = self.items.len();
        assert!(n == 0, "expected no {}, found {n}", self.what);
    }

    /// Asserts how many were recorded, and returns them.
    ///
    /// # Panics
    /// When another number was.
    #[track_caller]
    pub fn assert_count(self, expected: usize) -> Self {
        let n = self.items.len();
        assert!(
            n == expected,
            "expected {expected} {}, found {n}",
            self.what
        );
        self
    }

    /// The messages, in order.
    pub fn into_vec(self) -> Vec<T> {
        self.items
    }
}

impl<T> std::ops::Deref for Messages<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.items
    }
}

impl<T> IntoIterator for Messages<T> {
    type Item = T;
    type IntoIter = std::vec::IntoIter<T>;
    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter()
    }
}

impl<'a, T> IntoIterator for &'a Messages<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.items.iter()
    }
}
