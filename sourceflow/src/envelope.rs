//! The wire format shared by every transport.
//!
//! A message body is a JSON envelope:
//!
//! ```json
//! {"v":1,"type":"orders.CreateOrder.v1","id":"5f0c…","entity_id":"42",
//!  "correlation_id":"5f0c…","causation_id":null,"seq":7,"ts":1763870000000,
//!  "payload":{"order_id":42,"customer_id":7}}
//! ```
//!
//! and it travels with message attributes: sourceflow's own (all `String`): [`attr::TYPE`]
//! (wire name), [`attr::ENTITY_ID`], [`attr::SEQUENCE`], [`attr::CONTENT_TYPE`] and, when
//! tracing is on, `traceparent`; then those the producer set (typed [`AttributeValue`]s, at
//! most [`MAX_ATTRIBUTES`](crate::attribute::MAX_ATTRIBUTES) in all). On FIFO destinations the `MessageGroupId` is the entity id and the
//! `MessageDeduplicationId` is the message id, so a retried send is deduplicated while two
//! distinct commands with equal content are not.
//!
//! `v` is the envelope version. A reader rejects versions it does not know instead of
//! guessing, so the format can evolve: a new version is read by new consumers first, then
//! written by producers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use crate::attribute::{AttributeName, AttributeText, AttributeValue};
use crate::error::{Error, Result};
use crate::message::{check_group_id, Message};

pub(crate) mod incoming;
pub(crate) use incoming::Incoming;

/// The envelope version this build writes and reads.
pub const VERSION: u32 = 1;

/// Names of the message attributes sourceflow sets.
pub mod attr {
    /// The wire name of the payload's type.
    pub const TYPE: &str = "sourceflow.type";
    /// The entity id (FIFO group id), when the type has one.
    pub const ENTITY_ID: &str = "sourceflow.entity_id";
    /// The sender's sequence number.
    pub const SEQUENCE: &str = "sourceflow.seq";
    /// How the body is encoded (`application/json`).
    pub const CONTENT_TYPE: &str = "content-type";
    /// Set on messages moved to a dead-letter queue by sourceflow: why.
    pub const DLQ_REASON: &str = "sourceflow.dlq_reason";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state.
    pub const TRACESTATE: &str = "tracestate";
    /// The correlation id (also in the envelope), for tools that only see attributes.
    pub const CORRELATION_ID: &str = "sourceflow.correlation_id";
    /// Set on a message whose payload is encrypted: the format (`sfenc/1`).
    pub const ENCRYPTION: &str = "sourceflow.encryption";
    /// The value of [`ENCRYPTION`] for the first encryption format.
    pub const ENCRYPTION_V1: &str = "sfenc/1";
}

/// The content type of an envelope body.
pub const CONTENT_TYPE_JSON: &str = "application/json";

static SEQUENCE: AtomicU64 = AtomicU64::new(1);

/// A message ready for a transport: body, attributes and FIFO ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// The JSON envelope, shared: fanning it out to several queues, or keeping it in an
    /// in-process queue and receiving it, does not copy it.
    pub body: std::sync::Arc<str>,
    /// Message attributes: names and typed values, shared like the body (so that keeping a
    /// copy of a message for a retry does not copy them).
    pub attributes: crate::transport::Attributes,
    /// The FIFO message group id (the entity id), for FIFO destinations.
    pub group_id: Option<String>,
    /// The FIFO deduplication id (the message id), for FIFO destinations.
    pub dedup_id: Option<String>,
    /// Delivery delay, for standard queues.
    pub delay: Option<std::time::Duration>,
    /// The wire name, for error messages and metrics (static for the types of this binary,
    /// owned for messages read back from a queue or a stored outbox).
    pub wire_name: std::borrow::Cow<'static, str>,
    /// The envelope's message id.
    pub message_id: String,
}

impl OutgoingMessage {
    /// An error naming the type, destination and sizes when the message exceeds `limit`.
    pub fn check_size(&self, destination: &str, limit: usize) -> Result<()> {
        let size = self.size();
        if size > limit {
            return Err(Error::MessageTooLarge {
                wire_name: self.wire_name.to_string(),
                destination: destination.to_string(),
                size,
                limit,
            });
        }
        Ok(())
    }

    /// Why SQS or SNS would refuse this message's attributes, if they would: more than
    /// [`MAX_ATTRIBUTES`](crate::attribute::MAX_ATTRIBUTES), or a value of a form its type
    /// does not take (an empty string, a number that is not one).
    pub fn check_attributes(&self) -> std::result::Result<(), String> {
        use crate::attribute::MAX_ATTRIBUTES;
        if self.attributes.len() > MAX_ATTRIBUTES {
            return Err(format!(
                "{} carries {} message attributes; SQS and SNS take at most {MAX_ATTRIBUTES}",
                self.wire_name,
                self.attributes.len()
            ));
        }
        for (name, value) in self.attributes.iter() {
            value
                .check()
                .map_err(|e| format!("{}: message attribute `{name}`: {e}", self.wire_name))?;
        }
        Ok(())
    }

    /// Size as SQS and SNS count it: body plus attribute names, types and values.
    pub fn size(&self) -> usize {
        self.body.len()
            + self
                .attributes
                .iter()
                .map(|(k, v)| k.len() + v.as_str().len() + v.data_type().len())
                .sum::<usize>()
    }
}

/// Metadata of a message being sent.
#[derive(Debug, Clone, Default)]
pub struct SendMeta {
    /// The conversation this message belongs to; defaults to its own message id.
    pub correlation_id: Option<String>,
    /// The message whose handler sent this one.
    pub causation_id: Option<String>,
    /// Delivery delay (standard queues only).
    pub delay: Option<std::time::Duration>,
    /// Pin the message id (e.g. to make a retried send deduplicate).
    pub message_id: Option<String>,
    /// W3C traceparent to propagate.
    pub traceparent: Option<String>,
    /// W3C tracestate to propagate.
    pub tracestate: Option<String>,
    /// Message attributes the producer sets, after sourceflow's own.
    pub attributes: Vec<(String, AttributeValue)>,
}

#[derive(Serialize)]
struct EnvelopeOut<'a, M> {
    v: u32,
    #[serde(rename = "type")]
    wire_name: &'a str,
    id: &'a str,
    entity_id: Option<&'a str>,
    correlation_id: &'a str,
    causation_id: Option<&'a str>,
    seq: u64,
    ts: u64,
    payload: &'a M,
}

/// Serializes `msg` into an [`OutgoingMessage`] for a destination that is FIFO or not.
pub fn encode<M: Message>(msg: &M, meta: SendMeta) -> Result<OutgoingMessage> {
    encode_payload(msg, msg, meta, false)
}

/// A UUID in its hyphenated text, in one allocation of its exact length (`to_string` goes
/// through `Display` and grows its string).
pub(crate) fn uuid_text(id: uuid::Uuid) -> String {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    id.hyphenated().encode_lower(&mut buf).to_owned()
}

/// The v5 UUID (text) of `{parent}/{position}`: the id of the `position`-th message a
/// handler of message `parent` produced. The name is built on the stack when it fits.
pub(crate) fn derived_id(parent: &str, position: u32) -> String {
    use std::io::Write as _;
    const ON_STACK: usize = 160;
    let mut buf = [0u8; ON_STACK];
    let mut rest = &mut buf[..];
    let written = write!(rest, "{parent}/{position}").is_ok();
    let used = ON_STACK - rest.len();
    let id = if written {
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &buf[..used])
    } else {
        uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("{parent}/{position}").as_bytes(),
        )
    };
    uuid_text(id)
}

/// Like [`encode`], with `payload` in the envelope in place of `msg` (its ciphertext when
/// `encrypted`, which also sets the encryption attribute).
pub(crate) fn encode_payload<M: Message, P: Serialize>(
    msg: &M,
    payload: &P,
    meta: SendMeta,
    encrypted: bool,
) -> Result<OutgoingMessage> {
    let id = meta
        .message_id
        .unwrap_or_else(|| uuid_text(uuid::Uuid::new_v4()));
    let entity_id = msg.entity_id();
    if M::FIFO {
        if let Some(e) = &entity_id {
            check_group_id(e).map_err(|reason| Error::InvalidEntityId {
                wire_name: M::NAME,
                reason,
            })?;
        }
        if meta.delay.is_some() {
            return Err(Error::Unsupported(format!(
                "{} goes to the FIFO {} `{}`, which does not support per-message delays",
                M::NAME,
                if M::KIND == crate::MessageKind::Command {
                    "queue"
                } else {
                    "topic"
                },
                M::DESTINATION
            )));
        }
    }
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let correlation_id = meta.correlation_id.as_deref().unwrap_or(&id);
    let body = to_exact_body(&EnvelopeOut {
        v: VERSION,
        wire_name: M::NAME,
        id: &id,
        entity_id: entity_id.as_deref(),
        correlation_id,
        causation_id: meta.causation_id.as_deref(),
        seq,
        ts,
        payload,
    })
    .map_err(|source| Error::Serialize {
        wire_name: M::NAME,
        source,
    })?;
    let trace = (meta.traceparent.as_deref(), meta.tracestate.as_deref());
    let mut attributes = attributes::<M>(
        seq,
        entity_id.as_deref(),
        correlation_id,
        trace,
        encrypted,
        meta.attributes.len(),
    );
    add_user_attributes(&mut attributes, meta.attributes, M::NAME)?;
    Ok(OutgoingMessage {
        body,
        attributes: attributes.into(),
        group_id: if M::FIFO { entity_id } else { None },
        dedup_id: if M::FIFO { Some(id.clone()) } else { None },
        delay: meta.delay,
        wire_name: std::borrow::Cow::Borrowed(M::NAME),
        message_id: id,
    })
}

/// Serializes `value` as JSON into a shared `str` of exactly its length: through a reused
/// per-thread buffer and one copy, instead of the doubling growth of
/// `serde_json::to_string`, whose spare capacity (up to the body's length again) a queued
/// message would otherwise carry for as long as it waits. Shared, so that neither a fan-out
/// nor a receive from the embedded broker copies it again.
fn to_exact_body<T: Serialize>(value: &T) -> serde_json::Result<std::sync::Arc<str>> {
    thread_local! {
        static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    /// A buffer grown past this by a large payload is not kept.
    const KEEP: usize = 64 * 1024;
    let exact = |buf: &[u8]| match std::str::from_utf8(buf) {
        Ok(text) => Ok(std::sync::Arc::from(text)),
        // serde_json writes UTF-8 only; this is not reached.
        Err(_) => serde_json::to_string(value).map(std::sync::Arc::from),
    };
    BUFFER.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            buf.clear();
            let out = serde_json::to_writer(&mut *buf, value).and_then(|()| exact(&buf));
            if buf.capacity() > KEEP {
                *buf = Vec::new();
            }
            out
        }
        // A payload whose `Serialize` encodes another envelope: a buffer of its own.
        Err(_) => {
            let mut buf = Vec::new();
            serde_json::to_writer(&mut buf, value).and_then(|()| exact(&buf))
        }
    })
}

/// The message attributes of an envelope of `M`, with room for `extra` more (the
/// producer's), and no more: a queued message keeps its vector as it is.
fn attributes<M: Message>(
    seq: u64,
    entity_id: Option<&str>,
    correlation_id: &str,
    (traceparent, tracestate): (Option<&str>, Option<&str>),
    encrypted: bool,
    extra: usize,
) -> Vec<(AttributeName, AttributeValue)> {
    let own = 4
        + usize::from(entity_id.is_some())
        + usize::from(traceparent.is_some())
        + usize::from(tracestate.is_some())
        + usize::from(encrypted);
    let mut attributes: Vec<(AttributeName, AttributeValue)> = Vec::with_capacity(own + extra);
    // Names, and the values known at compile time, are borrowed: no allocation for them.
    let mut fixed = |k: &'static str, v: &'static str| {
        attributes.push((
            AttributeName::Borrowed(k),
            AttributeValue::String(AttributeText::Borrowed(v)),
        ))
    };
    fixed(attr::TYPE, M::NAME);
    fixed(attr::CONTENT_TYPE, CONTENT_TYPE_JSON);
    if encrypted {
        fixed(attr::ENCRYPTION, attr::ENCRYPTION_V1);
    }
    attributes.push((
        AttributeName::Borrowed(attr::SEQUENCE),
        AttributeValue::String(seq.to_string().into()),
    ));
    let mut put = |k: &'static str, v: &str| {
        attributes.push((AttributeName::Borrowed(k), AttributeValue::from(v)))
    };
    if let Some(e) = entity_id {
        put(attr::ENTITY_ID, e);
    }
    put(attr::CORRELATION_ID, correlation_id);
    if let Some(tp) = traceparent {
        put(attr::TRACEPARENT, tp);
    }
    if let Some(ts) = tracestate {
        put(attr::TRACESTATE, ts);
    }
    attributes
}

/// Checks the attributes a producer set (names, values, no name twice, at most
/// [`MAX_ATTRIBUTES`](crate::attribute::MAX_ATTRIBUTES) with sourceflow's own) and appends
/// them to sourceflow's.
fn add_user_attributes(
    attributes: &mut Vec<(AttributeName, AttributeValue)>,
    user: Vec<(String, AttributeValue)>,
    wire_name: &'static str,
) -> Result<()> {
    use crate::attribute::{check_name, MAX_ATTRIBUTES};
    let invalid = |name: &str, reason: String| Error::InvalidAttribute {
        wire_name,
        name: name.to_string(),
        reason,
    };
    // One more is kept for the dead-letter reason, which sourceflow adds to the copy it
    // moves to a dead-letter queue: SQS would refuse that copy with eleven.
    let own = attributes.len() + 1;
    if own + user.len() > MAX_ATTRIBUTES {
        let mut names: Vec<&str> = attributes.iter().map(|(k, _)| &**k).collect();
        names.push(attr::DLQ_REASON);
        let first = &user[MAX_ATTRIBUTES.saturating_sub(own).min(user.len() - 1)].0;
        return Err(invalid(
            first,
            format!(
                "a message carries at most {MAX_ATTRIBUTES} attributes on SQS, and sourceflow keeps {own} of them on this one ({}; the last when dead-lettered), so at most {} of yours fit; {} were set",
                names.join(", "),
                MAX_ATTRIBUTES.saturating_sub(own),
                user.len()
            ),
        ));
    }
    for (i, (name, value)) in user.iter().enumerate() {
        check_name(name).map_err(|r| invalid(name, r))?;
        value.check().map_err(|r| invalid(name, r))?;
        if user[..i].iter().any(|(n, _)| n == name) {
            return Err(invalid(name, "it is set twice".into()));
        }
    }
    attributes.extend(user.into_iter().map(|(k, v)| (AttributeName::Owned(k), v)));
    Ok(())
}

/// A decoded envelope; the payload stays raw JSON until a handler decodes it.
#[derive(Debug, Deserialize)]
pub struct Envelope {
    /// Envelope version.
    pub v: u32,
    /// Wire name.
    #[serde(rename = "type")]
    pub wire_name: String,
    /// Message id (stable across redeliveries and retried sends).
    pub id: String,
    /// Entity id, if the type has one.
    #[serde(default)]
    pub entity_id: Option<String>,
    /// Correlation id: the conversation this message belongs to.
    #[serde(default)]
    pub correlation_id: Option<String>,
    /// Causation id: the message whose handler produced this one.
    #[serde(default)]
    pub causation_id: Option<String>,
    /// Sender's sequence number.
    #[serde(default)]
    pub seq: u64,
    /// Sent at, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub ts: u64,
    /// The message itself, as JSON (`null` while it is stored elsewhere, see
    /// [`claim_check`](Self::claim_check)).
    pub payload: Box<RawValue>,
    /// How the payload is encoded when it is not plain JSON: `gzip` (then the payload is a
    /// base64 string). The listener decodes it before anything else sees the payload.
    #[serde(default)]
    pub payload_encoding: Option<String>,
    /// Where the payload is stored when it was too large to travel
    /// ([`crate::claim_check`]). The listener fetches it before anything else sees it.
    #[serde(default)]
    pub claim_check: Option<crate::claim_check::Pointer>,
}

/// Why a received body is not a usable envelope. Such a message can never succeed and is
/// moved to the dead-letter queue with this as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The `sourceflow.type` attribute is absent.
    #[error("missing message attribute `{}`", attr::TYPE)]
    MissingType,
    /// The body is not a JSON envelope.
    #[error("body is not a sourceflow JSON envelope: {0}")]
    Malformed(String),
    /// The envelope version is newer than this build understands.
    #[error("envelope version {0} is not supported (this build reads version {VERSION})")]
    Version(u32),
    /// Attribute and body disagree on the type.
    #[error("attribute says `{attribute}` but the body says `{body}`")]
    TypeMismatch {
        /// From the attribute.
        attribute: String,
        /// From the body.
        body: String,
    },
}

/// Decodes a received body and checks it against its attributes.
pub fn decode(
    body: &str,
    attributes: &[(AttributeName, AttributeValue)],
) -> std::result::Result<Envelope, DecodeError> {
    let declared = attribute(attributes, attr::TYPE).ok_or(DecodeError::MissingType)?;
    let env: Envelope = serde_json::from_str(body)
        .map_err(|e| DecodeError::Malformed(crate::payload::describe(&e, ".")))?;
    if env.v != VERSION {
        return Err(DecodeError::Version(env.v));
    }
    if env.wire_name != declared {
        return Err(DecodeError::TypeMismatch {
            attribute: declared.to_string(),
            body: env.wire_name,
        });
    }
    Ok(env)
}

/// Looks up an attribute by name: its value as it travels, whatever its type.
pub fn attribute<'a>(
    attributes: &'a [(AttributeName, AttributeValue)],
    name: &str,
) -> Option<&'a str> {
    attribute_value(attributes, name).map(AttributeValue::as_str)
}

/// Looks up an attribute by name: its typed value.
pub fn attribute_value<'a>(
    attributes: &'a [(AttributeName, AttributeValue)],
    name: &str,
) -> Option<&'a AttributeValue> {
    attributes.iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn derived_ids_are_the_v5_uuids_of_parent_and_position() {
        let long = "p".repeat(300);
        for parent in ["0b6f3f4e-6f1a-4a53-9a36-2d3c1f0c5e11", long.as_str()] {
            for position in [0, 7, u32::MAX] {
                let name = format!("{parent}/{position}");
                let expected =
                    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).to_string();
                assert_eq!(derived_id(parent, position), expected, "{name}");
            }
        }
        let id = uuid::Uuid::new_v4();
        assert_eq!(uuid_text(id), id.to_string());
    }

    proptest! {
        /// Whatever arrives on a queue, decoding returns a value or an error: no panic.
        #[test]
        fn decode_never_panics(body in any::<Vec<u8>>(), ty in ".{0,40}", extra in proptest::collection::vec((".{0,20}", ".{0,20}"), 0..4)) {
            let body = String::from_utf8_lossy(&body);
            let mut attrs: Vec<(AttributeName, AttributeValue)> =
                extra.into_iter().map(|(k, v)| (k.into(), AttributeValue::String(v.into()))).collect();
            attrs.push((attr::TYPE.into(), ty.into()));
            let _ = decode(&body, &attrs);
        }

        /// Envelope-shaped JSON with arbitrary field values never panics either.
        #[test]
        fn decode_envelope_shapes(v in any::<u32>(), ty in "[a-zA-Z.]{0,12}", id in ".{0,12}", payload in prop_oneof![Just("{}".to_string()), Just("null".to_string()), "[0-9]{1,5}", "\\[.{0,10}\\]"]) {
            let body = format!(r#"{{"v":{v},"type":{},"id":{},"payload":{payload}}}"#,
                serde_json::Value::from(ty.clone()), serde_json::Value::from(id));
            let attrs = vec![(attr::TYPE.into(), ty.into())];
            let _ = decode(&body, &attrs);
        }
    }

    #[test]
    fn rejects_bad_bodies() {
        let attrs: Vec<(AttributeName, AttributeValue)> = vec![(attr::TYPE.into(), "X".into())];
        assert_eq!(decode("{}", &[]).unwrap_err(), DecodeError::MissingType);
        assert!(matches!(
            decode("not json", &attrs).unwrap_err(),
            DecodeError::Malformed(_)
        ));
        let v2 = r#"{"v":2,"type":"X","id":"1","payload":{}}"#;
        assert_eq!(decode(v2, &attrs).unwrap_err(), DecodeError::Version(2));
        let other = r#"{"v":1,"type":"Y","id":"1","payload":{}}"#;
        assert!(matches!(
            decode(other, &attrs).unwrap_err(),
            DecodeError::TypeMismatch { .. }
        ));
        let ok = r#"{"v":1,"type":"X","id":"1","payload":{"a":1}}"#;
        let env = decode(ok, &attrs).unwrap();
        assert_eq!(env.payload.get(), r#"{"a":1}"#);
    }
}
