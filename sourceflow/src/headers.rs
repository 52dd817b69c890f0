//! User-defined headers: small string values (a tenant id, a user id, an authorisation
//! token) that travel with a message beside its payload, for handlers and
//! [middleware](crate::middleware) to read, and that can flow on through a whole saga.
//!
//! * Set them with [`SendOptions::header`](crate::SendOptions::header) on
//!   [`Handle::send_with`](crate::Handle::send_with) / `raise_with`, or on
//!   [`Context::send_with`](crate::Context::send_with) / `raise_with` inside a handler, or on
//!   the transactional outbox's (`sourceflow::outbox`) `send_with` / `raise_with`.
//! * Read them with [`Context::header`](crate::Context::header) (or
//!   [`Request::header`](crate::middleware::Request::header) in a layer).
//! * Pass them on: [`Builder::propagate_header`](crate::Builder::propagate_header) copies a
//!   header of the message being handled onto every message its handler sends or raises
//!   (unless that send sets it itself); [`SendOptions::propagate_headers`](crate::SendOptions::propagate_headers)
//!   copies all of them onto one send.
//! * They are never logged, unless marked safe with
//!   [`Builder::log_header`](crate::Builder::log_header): a safe header is shown in the
//!   `sourceflow.headers` field of the `sourceflow.handler` span (`tenant=acme`), and so on
//!   every log line inside it. `Debug` output of [`Headers`] and of `SendOptions` shows
//!   names only.
//!
//! # On the wire
//!
//! All headers of a message travel in **one** message attribute, `sourceflow.headers`, a
//! JSON object of strings (`{"tenant":"acme","user":"42"}`). SQS carries at most 10
//! message attributes, and sourceflow keeps 5 to 9 of them for itself (type, content type,
//! sequence number, correlation id; then the entity id, trace context, encryption format
//! as they apply, and one slot for the dead-letter reason): one attribute per header would
//! leave room for one to five headers, and would compete with the
//! [attributes](crate::SendOptions::attribute) that SNS filter policies match on. One
//! attribute for all headers costs one slot whatever their number; the send is refused at
//! the call with [`Error::TooManyAttributes`] when that
//! slot does not fit beside sourceflow's own and the producer's attributes.
//!
//! Headers and attributes differ in purpose: an **attribute** is for routing (subscription
//! filter policies match on it, it is typed, it never propagates); a **header** is
//! application metadata for the handler (strings, any number in one slot, propagated on
//! request, not visible to filter policies). Header values are not encrypted even when the
//! payload is (`#[command(encrypt)]`): anyone who can read the queue can read them.
//!
//! Names are case-insensitive (stored in lower case): 1 to 128 characters of `a-z 0-9 _ -
//! .`. Values are any UTF-8 text (SQS refuses U+FFFE and U+FFFF, so they are refused too).
//!
//! ```
//! use sourceflow::{command, event, handler, Context, SendOptions};
//!
//! #[command(queue = "doc-headers-orders")]
//! #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
//! pub struct PlaceOrder { pub order_id: u64 }
//!
//! #[event(topic = "doc-headers-events")]
//! #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
//! pub struct OrderPlaced { pub order_id: u64 }
//!
//! #[handler]
//! async fn place(cmd: PlaceOrder, ctx: &Context) -> sourceflow::Result<()> {
//!     let tenant = ctx.header("tenant"); // Some("acme")
//!     println!("placing order {} for tenant {tenant:?}", cmd.order_id);
//!     // `propagate_header("tenant")`: the event carries it on.
//!     ctx.raise(OrderPlaced { order_id: cmd.order_id }).await
//! }
//!
//! #[handler]
//! async fn placed(evt: OrderPlaced, ctx: &Context) -> sourceflow::Result<()> {
//!     println!("order {} placed for tenant {:?}", evt.order_id, ctx.header("tenant"));
//!     Ok(())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> sourceflow::Result<()> {
//! let app = sourceflow::builder()
//!     .service("doc-headers")
//!     .handlers_in(module_path!())
//!     .propagate_header("tenant")
//!     .log_header("tenant")
//!     .start()
//!     .await?;
//! let options = SendOptions::new().header("tenant", "acme").header("user", "u-7");
//! app.send_with(PlaceOrder { order_id: 1 }, options).await?;
//! # tokio::time::sleep(std::time::Duration::from_millis(50)).await;
//! app.shutdown().await?;
//! # Ok(())
//! # }
//! ```

use std::fmt;

use crate::attribute::MAX_ATTRIBUTES;
use crate::envelope::{attr, AttributeValue, OutgoingMessage};
use crate::error::{Error, Result};

/// The message attribute that carries a message's headers, as a JSON object of strings.
pub const ATTRIBUTE: &str = "sourceflow.headers";

/// Longest header name.
pub const MAX_NAME_LEN: usize = 128;

/// The headers of a message: names (lower case) and values, in the order they were set.
/// `Debug` shows the names only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers {
    entries: Vec<(String, String)>,
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.entries.iter().map(|(k, _)| k))
            .finish()
    }
}

/// Headers from `(name, value)` pairs (names lower-cased, a later value replacing an
/// earlier one), e.g. for a context built in a test.
///
/// ```
/// use sourceflow::headers::Headers;
///
/// let h: Headers = [("Tenant", "acme"), ("user", "u-7")].into_iter().collect();
/// assert_eq!(h.get("tenant"), Some("acme"));
/// assert_eq!(format!("{h:?}"), r#"{"tenant", "user"}"#);
/// ```
impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Self {
        let mut h = Headers::default();
        for (k, v) in pairs {
            h.set(k.as_ref(), v.as_ref());
        }
        h
    }
}

impl Headers {
    /// The value of header `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Names and values, in the order they were set.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sets `name` (lower-cased) to `value`, replacing an earlier value.
    pub(crate) fn set(&mut self, name: &str, value: &str) {
        let name = name.to_ascii_lowercase();
        match self.entries.iter_mut().find(|(k, _)| *k == name) {
            Some((_, v)) => *v = value.to_string(),
            None => self.entries.push((name, value.to_string())),
        }
    }

    /// Reads the headers attribute of a received message; a value that is not a JSON
    /// object of strings (a foreign producer's) reads as no headers.
    pub(crate) fn from_attributes(
        attributes: &[(crate::AttributeName, AttributeValue)],
    ) -> Headers {
        let Some(json) = crate::envelope::attribute(attributes, ATTRIBUTE) else {
            return Headers::default();
        };
        match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(json) {
            Ok(map) => Headers {
                entries: map
                    .into_iter()
                    .filter_map(|(k, v)| match v {
                        serde_json::Value::String(s) => Some((k.to_ascii_lowercase(), s)),
                        _ => None,
                    })
                    .collect(),
            },
            Err(e) => {
                tracing::debug!(error = %e, "the `sourceflow.headers` attribute is not a JSON object; ignoring it");
                Headers::default()
            }
        }
    }

    /// `name=value` of the headers in `safe`, comma-separated; `None` when none is present.
    pub(crate) fn shown(&self, safe: &[String]) -> Option<String> {
        let shown: Vec<String> = self
            .entries
            .iter()
            .filter(|(k, _)| safe.iter().any(|s| s == k))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        (!shown.is_empty()).then(|| shown.join(","))
    }

    fn to_json(&self) -> String {
        let map: serde_json::Map<String, serde_json::Value> = self
            .entries
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        serde_json::Value::Object(map).to_string()
    }
}

/// The headers a send sets: checked when the message is encoded.
#[derive(Clone, Default)]
pub(crate) struct Outgoing {
    /// As set, in order (names as given).
    pub(crate) set: Vec<(String, String)>,
    /// Copy every header of the message being handled.
    pub(crate) propagate_all: bool,
}

impl fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Headers")
            .field(
                "names",
                &self.set.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("propagate_all", &self.propagate_all)
            .finish()
    }
}

impl Outgoing {
    /// The headers of the message: `inherited` (the propagated ones) overridden by those
    /// set; an error naming the first name or value SQS or sourceflow would refuse, or a
    /// name set twice.
    pub(crate) fn resolve(&self, inherited: Headers) -> Result<Headers> {
        let mut out = inherited;
        for (i, (name, value)) in self.set.iter().enumerate() {
            let invalid = |reason: String| Error::InvalidHeader {
                name: name.clone(),
                reason,
            };
            check_name(name).map_err(invalid)?;
            check_value(value).map_err(invalid)?;
            if self.set[..i]
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case(name))
            {
                return Err(invalid("it is set twice".into()));
            }
            out.set(name, value);
        }
        Ok(out)
    }
}

/// What a service does with headers: which it passes on, which it may log.
#[derive(Debug, Clone, Default)]
pub(crate) struct Settings {
    /// Copied from a handled message onto what its handler sends and raises.
    pub(crate) propagate: Vec<String>,
    /// Shown in the handler span (and so in logs).
    pub(crate) safe: Vec<String>,
}

impl Settings {
    /// The headers of `incoming` a handler's send inherits.
    pub(crate) fn inherited(&self, incoming: &Headers, all: bool) -> Headers {
        if all {
            return incoming.clone();
        }
        let mut out = Headers::default();
        for (k, v) in incoming.iter() {
            if self.propagate.iter().any(|p| p == k) {
                out.set(k, v);
            }
        }
        out
    }
}

/// Why sourceflow refuses `name` as a header name.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "a header name has 1 to {MAX_NAME_LEN} characters, this one has {}",
            name.len()
        ));
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        Some(c) => Err(format!(
            "{c:?} is not allowed in a header name (use a-z, 0-9, `_`, `-` and `.`)"
        )),
        None => Ok(()),
    }
}

/// Why SQS would refuse `value` inside a header.
fn check_value(value: &str) -> std::result::Result<(), String> {
    match value.chars().find(|c| matches!(c, '\u{FFFE}' | '\u{FFFF}')) {
        Some(c) => Err(format!("{c:?} is not allowed in an SQS message attribute")),
        None => Ok(()),
    }
}

/// Adds the headers attribute to an encoded message whose last `user` attributes are the
/// producer's; refused when it does not fit within SQS's limit beside them and
/// sourceflow's own (one slot kept for the dead-letter reason).
pub(crate) fn attach(out: &mut OutgoingMessage, headers: &Headers, user: usize) -> Result<()> {
    if headers.is_empty() {
        return Ok(());
    }
    let own = out.attributes.len().saturating_sub(user);
    if own + 1 + 1 + user > MAX_ATTRIBUTES {
        let mut framework: Vec<String> = out.attributes[..own]
            .iter()
            .map(|(k, _)| k.to_string())
            .collect();
        framework.push(attr::DLQ_REASON.to_string());
        return Err(Error::TooManyAttributes {
            wire_name: out.wire_name.to_string(),
            limit: MAX_ATTRIBUTES,
            framework,
            headers: headers.iter().map(|(k, _)| k.to_string()).collect(),
            attributes: out.attributes[own..]
                .iter()
                .map(|(k, _)| k.to_string())
                .collect(),
        });
    }
    let attribute = (
        crate::AttributeName::Borrowed(ATTRIBUTE),
        AttributeValue::String(headers.to_json().into()),
    );
    // Only a message with headers pays for rebuilding its (shared) attribute slice.
    let attributes = out
        .attributes
        .iter()
        .cloned()
        .chain(std::iter::once(attribute));
    out.attributes = attributes.collect();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_values_and_repeats_are_checked() {
        let ok = Outgoing {
            set: vec![
                ("Tenant".into(), "acme".into()),
                ("x-user_1.a".into(), "".into()),
            ],
            propagate_all: false,
        };
        let h = ok.resolve(Headers::default()).expect("valid");
        assert_eq!(h.get("TENANT"), Some("acme"));
        assert_eq!(h.iter().next(), Some(("tenant", "acme")));
        for (name, value, why) in [
            ("", "v", "1 to 128"),
            ("a b", "v", "not allowed in a header name"),
            ("t", "\u{FFFF}", "not allowed in an SQS message attribute"),
        ] {
            let bad = Outgoing {
                set: vec![(name.into(), value.into())],
                propagate_all: false,
            };
            let e = bad.resolve(Headers::default()).expect_err(name);
            assert!(e.to_string().contains(why), "{e}");
        }
        let twice = Outgoing {
            set: vec![("t".into(), "1".into()), ("T".into(), "2".into())],
            propagate_all: false,
        };
        let e = twice.resolve(Headers::default()).expect_err("twice");
        assert!(e.to_string().contains("set twice"), "{e}");
    }

    #[test]
    fn set_headers_override_inherited_ones_and_debug_hides_values() {
        let mut inherited = Headers::default();
        inherited.set("tenant", "old");
        inherited.set("user", "u1");
        let out = Outgoing {
            set: vec![("tenant".into(), "new".into())],
            propagate_all: false,
        };
        let h = out.resolve(inherited).expect("valid");
        assert_eq!(h.get("tenant"), Some("new"));
        assert_eq!(h.get("user"), Some("u1"));
        let debug = format!("{h:?} {out:?}");
        assert!(!debug.contains("new") && !debug.contains("u1"), "{debug}");
        assert!(debug.contains("tenant"), "{debug}");
    }

    #[test]
    fn the_attribute_round_trips_and_foreign_values_read_as_none() {
        let mut h = Headers::default();
        h.set("tenant", "a\"c\u{1}me");
        let attrs = vec![(ATTRIBUTE.into(), AttributeValue::from(h.to_json()))];
        assert_eq!(Headers::from_attributes(&attrs), h);
        let foreign = vec![(ATTRIBUTE.into(), AttributeValue::from("nope"))];
        assert!(Headers::from_attributes(&foreign).is_empty());
        assert_eq!(
            h.shown(&["tenant".into()]).as_deref(),
            Some("tenant=a\"c\u{1}me")
        );
        assert_eq!(h.shown(&["user".into()]), None);
    }
}
