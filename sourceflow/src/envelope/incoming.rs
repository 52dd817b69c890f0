//! A received envelope whose strings point into the message body instead of being copied
//! out of it.
//!
//! [`Envelope`] owns its strings: decoding one allocates its type, id, entity id,
//! correlation and causation ids and the raw payload (six allocations per message). The
//! listener decodes every message it receives, and the body is already shared
//! (`Arc<str>`), so it decodes into an [`Incoming`] instead: the same fields, checked the
//! same way ([`decode`] applies [`super::decode`]'s rules), each either a range of the body
//! or, for the rare string JSON escapes, an owned copy.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use super::{attr, attribute, AttributeName, AttributeValue, DecodeError, Envelope, VERSION};
use crate::claim_check::Pointer;

/// One string of an [`Incoming`]: where it is in the body, or the string itself.
#[derive(Debug, Clone)]
enum Text {
    /// A range of the body.
    Body(Range<usize>),
    /// A string the body does not hold as is (JSON escapes), or a replaced payload.
    Owned(Box<str>),
}

/// A decoded envelope that borrows from its shared body (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct Incoming {
    body: Arc<str>,
    wire_name: Text,
    id: Text,
    entity_id: Option<Text>,
    correlation_id: Option<Text>,
    causation_id: Option<Text>,
    payload: Text,
    /// Sender's sequence number.
    pub seq: u64,
    /// Sent at, in milliseconds since the Unix epoch.
    pub ts: u64,
    /// How the payload is encoded when it is not plain JSON (rare: owned).
    pub payload_encoding: Option<String>,
    /// Where the payload is stored when it was too large to travel.
    pub claim_check: Option<Pointer>,
}

/// A JSON string, borrowed from the input unless it has escapes.
struct Str<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visitor<'a> {
            type Value = Str<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        d.deserialize_str(Visitor(std::marker::PhantomData))
    }
}

/// The envelope's wire form, borrowing (the same fields and defaults as [`Envelope`]).
#[derive(Deserialize)]
struct Wire<'a> {
    v: u32,
    #[serde(rename = "type", borrow)]
    wire_name: Str<'a>,
    #[serde(borrow)]
    id: Str<'a>,
    #[serde(default, borrow)]
    entity_id: Option<Str<'a>>,
    #[serde(default, borrow)]
    correlation_id: Option<Str<'a>>,
    #[serde(default, borrow)]
    causation_id: Option<Str<'a>>,
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    ts: u64,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(default)]
    payload_encoding: Option<String>,
    #[serde(default)]
    claim_check: Option<Pointer>,
}

/// Decodes a received body as [`super::decode`] does (the same errors), into an
/// [`Incoming`] that shares `body`.
pub(crate) fn decode(
    body: &Arc<str>,
    attributes: &[(AttributeName, AttributeValue)],
) -> Result<Incoming, DecodeError> {
    let declared = attribute(attributes, attr::TYPE).ok_or(DecodeError::MissingType)?;
    let wire: Wire<'_> = serde_json::from_str(body)
        .map_err(|e| DecodeError::Malformed(crate::payload::describe(&e, ".")))?;
    if wire.v != VERSION {
        return Err(DecodeError::Version(wire.v));
    }
    if wire.wire_name.0 != declared {
        return Err(DecodeError::TypeMismatch {
            attribute: declared.to_string(),
            body: wire.wire_name.0.into_owned(),
        });
    }
    let text = |s: Str<'_>| Text::of(body, s.0);
    Ok(Incoming {
        wire_name: text(wire.wire_name),
        id: text(wire.id),
        entity_id: wire.entity_id.map(text),
        correlation_id: wire.correlation_id.map(text),
        causation_id: wire.causation_id.map(text),
        payload: Text::of(body, Cow::Borrowed(wire.payload.get())),
        seq: wire.seq,
        ts: wire.ts,
        payload_encoding: wire.payload_encoding,
        claim_check: wire.claim_check,
        body: Arc::clone(body),
    })
}

impl Text {
    /// `s` as a range of `body` when it is part of it, else owned.
    fn of(body: &str, s: Cow<'_, str>) -> Text {
        let inside = match &s {
            Cow::Borrowed(b) => (b.as_ptr() as usize)
                .checked_sub(body.as_ptr() as usize)
                .filter(|start| start + b.len() <= body.len())
                .map(|start| start..start + b.len()),
            Cow::Owned(_) => None,
        };
        match inside {
            Some(range) => Text::Body(range),
            None => Text::Owned(s.into_owned().into_boxed_str()),
        }
    }

    fn get<'a>(&'a self, body: &'a str) -> &'a str {
        match self {
            Text::Body(range) => &body[range.clone()],
            Text::Owned(s) => s,
        }
    }
}

impl Incoming {
    /// The wire name.
    pub(crate) fn wire_name(&self) -> &str {
        self.wire_name.get(&self.body)
    }

    /// The message id.
    pub(crate) fn id(&self) -> &str {
        self.id.get(&self.body)
    }

    /// The entity id, if the type has one.
    pub(crate) fn entity_id(&self) -> Option<&str> {
        self.entity_id.as_ref().map(|t| t.get(&self.body))
    }

    /// The correlation id, if the sender set one.
    pub(crate) fn correlation_id(&self) -> Option<&str> {
        self.correlation_id.as_ref().map(|t| t.get(&self.body))
    }

    /// The causation id, if any.
    pub(crate) fn causation_id(&self) -> Option<&str> {
        self.causation_id.as_ref().map(|t| t.get(&self.body))
    }

    /// The payload, as raw JSON text.
    pub(crate) fn payload(&self) -> &str {
        self.payload.get(&self.body)
    }

    /// Replaces the payload (restored from a claim check, decompressed or decrypted).
    pub(crate) fn set_payload(&mut self, payload: Box<RawValue>) {
        self.payload = Text::Owned(Box::<str>::from(payload));
    }
}

impl From<Envelope> for Incoming {
    /// An envelope built in memory (the test harness's context): every string owned.
    fn from(env: Envelope) -> Self {
        let own = |s: String| Text::Owned(s.into_boxed_str());
        Incoming {
            body: Arc::from(""),
            wire_name: own(env.wire_name),
            id: own(env.id),
            entity_id: env.entity_id.map(own),
            correlation_id: env.correlation_id.map(own),
            causation_id: env.causation_id.map(own),
            payload: Text::Owned(env.payload.get().into()),
            seq: env.seq,
            ts: env.ts,
            payload_encoding: env.payload_encoding,
            claim_check: env.claim_check,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn attrs(wire_name: &str) -> Vec<(AttributeName, AttributeValue)> {
        vec![(
            AttributeName::Borrowed(attr::TYPE),
            AttributeValue::from(wire_name.to_string()),
        )]
    }

    /// Both decoders, on one body: the same fields or the same error.
    fn agree(body: &str, declared: &str) {
        let a = attrs(declared);
        let shared: Arc<str> = Arc::from(body);
        match (super::super::decode(body, &a), decode(&shared, &a)) {
            (Ok(e), Ok(i)) => {
                assert_eq!(i.wire_name(), e.wire_name);
                assert_eq!(i.id(), e.id);
                assert_eq!(i.entity_id(), e.entity_id.as_deref());
                assert_eq!(i.correlation_id(), e.correlation_id.as_deref());
                assert_eq!(i.causation_id(), e.causation_id.as_deref());
                assert_eq!(i.payload(), e.payload.get());
                assert_eq!((i.seq, i.ts), (e.seq, e.ts));
                assert_eq!(i.payload_encoding, e.payload_encoding);
                assert_eq!(i.claim_check, e.claim_check);
            }
            (Err(x), Err(y)) => assert_eq!(x, y),
            (x, y) => panic!("the decoders disagree on {body}: {x:?} against {y:?}"),
        }
    }

    #[test]
    fn plain_strings_point_into_the_body() {
        let body: Arc<str> = Arc::from(
            r#"{"v":1,"type":"a.B","id":"m1","entity_id":"7","correlation_id":"c","seq":2,"ts":3,"payload":{"x":[1,2]}}"#,
        );
        let i = decode(&body, &attrs("a.B")).unwrap();
        for t in [&i.wire_name, &i.id, &i.payload] {
            assert!(matches!(t, Text::Body(_)), "{t:?} was copied");
        }
        assert_eq!(
            (i.id(), i.entity_id(), i.payload()),
            ("m1", Some("7"), r#"{"x":[1,2]}"#)
        );
        assert_eq!(i.correlation_id(), Some("c"));
        assert_eq!(i.causation_id(), None);
    }

    #[test]
    fn escaped_strings_are_owned_and_unescaped() {
        let body: Arc<str> = Arc::from(r#"{"v":1,"type":"a.B","id":"m\"1\u00e9","payload":null}"#);
        let i = decode(&body, &attrs("a.B")).unwrap();
        assert!(matches!(i.id, Text::Owned(_)));
        assert_eq!(i.id(), "m\"1é");
    }

    #[test]
    fn the_errors_are_those_of_the_owned_decoder() {
        agree(r#"{"v":1,"type":"a.B","id":"m","payload":1}"#, "a.C");
        agree(r#"{"v":2,"type":"a.B","id":"m","payload":1}"#, "a.B");
        agree(r#"{"v":1,"type":"a.B","payload":1}"#, "a.B");
        agree(r#"{"v":1,"type":"a.B","id":7,"payload":1}"#, "a.B");
        agree(r#"not json"#, "a.B");
        agree(
            r#"{"v":1,"type":"a.B","id":"m","entity_id":null,"payload":[]}"#,
            "a.B",
        );
        let a = Vec::new();
        let body: Arc<str> = Arc::from(r#"{"v":1,"type":"a.B","id":"m","payload":1}"#);
        assert_eq!(decode(&body, &a).unwrap_err(), DecodeError::MissingType);
    }

    #[test]
    fn a_replaced_payload_is_read_back() {
        let body: Arc<str> = Arc::from(r#"{"v":1,"type":"a.B","id":"m","payload":"c2VjcmV0"}"#);
        let mut i = decode(&body, &attrs("a.B")).unwrap();
        i.set_payload(RawValue::from_string(r#"{"k":1}"#.into()).unwrap());
        assert_eq!((i.payload(), i.id()), (r#"{"k":1}"#, "m"));
    }

    proptest! {
        #[test]
        fn agrees_with_the_owned_decoder(
            id in "\\PC{0,12}",
            entity in proptest::option::of("\\PC{0,8}"),
            correlation in proptest::option::of("[a-z\"\\\\]{0,6}"),
            seq in any::<u64>(),
        ) {
            let env = serde_json::json!({
                "v": 1, "type": "t.T", "id": id, "entity_id": entity,
                "correlation_id": correlation, "seq": seq, "payload": {"id": id},
            });
            agree(&env.to_string(), "t.T");
        }
    }
}
