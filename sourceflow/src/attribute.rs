//! Typed message attributes, as SQS and SNS carry them: `String`, `Number` and
//! `String.Array` values next to the body.
//!
//! sourceflow sets its own attributes (all `String`, names in [`attr`](crate::envelope::attr));
//! a producer adds its own with
//! [`SendOptions::attribute`](crate::SendOptions::attribute), subscriptions filter on them
//! (see [`filter`](crate::filter)), and a handler reads them with
//! [`Context::attribute`](crate::Context::attribute).

use serde::{Deserialize, Serialize};

/// Most message attributes one SQS message carries (SNS raw delivery passes on the same
/// limit), sourceflow's own included.
pub const MAX_ATTRIBUTES: usize = 10;

/// Longest attribute name SQS and SNS accept.
pub const MAX_NAME_LEN: usize = 256;

/// A message attribute's name: sourceflow's own names are `&'static str`s (no allocation
/// per message), a producer's are owned.
pub type AttributeName = std::borrow::Cow<'static, str>;

/// The text of an [`AttributeValue`]: the values sourceflow sets from constants (a type's
/// wire name, the content type) are `&'static str`s, borrowed with no allocation per
/// message; every other value is owned. `"text".into()` and `String::into()` make one.
pub type AttributeText = std::borrow::Cow<'static, str>;

/// The value of a message attribute, typed as on the wire (its `DataType`).
///
/// ```
/// use sourceflow::envelope::AttributeValue;
///
/// assert_eq!(AttributeValue::from("eu"), AttributeValue::String("eu".into()));
/// assert_eq!(AttributeValue::from(42).as_number(), Some(42.0));
/// let tags = AttributeValue::string_array(["red", "blue"]);
/// assert_eq!(tags.data_type(), "String.Array");
/// assert_eq!(tags.as_str(), r#"["red","blue"]"#);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AttributeValue {
    /// `String`: matched by string conditions of a filter policy.
    String(AttributeText),
    /// `Number`, in its decimal text (`"42"`, `"-3.5"`, `"1e3"`): matched by numeric
    /// conditions only.
    Number(AttributeText),
    /// `String.Array`: a JSON array (of strings, numbers, `true`, `false`, `null`); a
    /// filter condition matches when it matches one of its elements.
    StringArray(AttributeText),
}

impl AttributeValue {
    /// A `String.Array` of these strings.
    pub fn string_array<I, S>(items: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let items: Vec<serde_json::Value> = items
            .into_iter()
            .map(|s| serde_json::Value::String(s.into()))
            .collect();
        AttributeValue::StringArray(serde_json::Value::Array(items).to_string().into())
    }

    /// The SQS/SNS `DataType`: `String`, `Number` or `String.Array`.
    pub fn data_type(&self) -> &'static str {
        match self {
            AttributeValue::String(_) => "String",
            AttributeValue::Number(_) => "Number",
            AttributeValue::StringArray(_) => "String.Array",
        }
    }

    /// The value as it travels (`StringValue`), whatever its type.
    pub fn as_str(&self) -> &str {
        match self {
            AttributeValue::String(s)
            | AttributeValue::Number(s)
            | AttributeValue::StringArray(s) => s,
        }
    }

    /// The string of a `String` attribute; `None` for the other types.
    pub fn as_string(&self) -> Option<&str> {
        match self {
            AttributeValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The number of a `Number` attribute; `None` for the other types (or a value that is
    /// not a number).
    pub fn as_number(&self) -> Option<f64> {
        match self {
            AttributeValue::Number(n) => n.trim().parse::<f64>().ok().filter(|x| x.is_finite()),
            _ => None,
        }
    }

    /// The elements of a `String.Array` attribute; `None` for the other types (or a value
    /// that is not a JSON array).
    pub fn as_array(&self) -> Option<Vec<serde_json::Value>> {
        match self {
            AttributeValue::StringArray(a) => match serde_json::from_str(a) {
                Ok(serde_json::Value::Array(items)) => Some(items),
                _ => None,
            },
            _ => None,
        }
    }

    /// The value for a `DataType` and `StringValue` read from the wire: `Number` and
    /// `Number.*` are numbers, `String.Array` an array, other `String*` types strings;
    /// `None` for `Binary` (sourceflow does not carry binary attributes).
    pub fn from_wire(data_type: &str, value: String) -> Option<Self> {
        if data_type == "String.Array" {
            Some(AttributeValue::StringArray(value.into()))
        } else if data_type == "Number" || data_type.starts_with("Number.") {
            Some(AttributeValue::Number(value.into()))
        } else if data_type == "String" || data_type.starts_with("String.") {
            Some(AttributeValue::String(value.into()))
        } else {
            None
        }
    }

    /// Why SQS or SNS would refuse this value, if they would.
    pub fn check(&self) -> Result<(), String> {
        match self {
            AttributeValue::String(s) if s.is_empty() => {
                Err("a String attribute value must not be empty".into())
            }
            AttributeValue::String(_) => Ok(()),
            AttributeValue::Number(n) => check_number(n),
            AttributeValue::StringArray(a) => match serde_json::from_str(a) {
                Ok(serde_json::Value::Array(items)) => {
                    if items.iter().all(|i| !i.is_array() && !i.is_object()) {
                        Ok(())
                    } else {
                        Err(
                            "a String.Array holds strings, numbers, true, false and null only"
                                .into(),
                        )
                    }
                }
                _ => Err(format!("a String.Array value is a JSON array, not `{a}`")),
            },
        }
    }
}

/// SQS: up to 38 digits of precision, between 10^-128 and 10^126 in magnitude.
fn check_number(n: &str) -> Result<(), String> {
    let x: f64 = n.parse().map_err(|_| {
        format!("`{n}` is not a number (a Number attribute is decimal text such as 42 or -3.5)")
    })?;
    if !x.is_finite() {
        return Err(format!("`{n}` is not a finite number"));
    }
    let mantissa = n.split(['e', 'E']).next().unwrap_or(n);
    let digits = mantissa
        .chars()
        .filter(char::is_ascii_digit)
        .collect::<String>();
    let significant = digits.trim_start_matches('0').trim_end_matches('0').len();
    if significant > 38 {
        return Err(format!(
            "`{n}` has more than the 38 digits of precision SQS keeps"
        ));
    }
    if x != 0.0 && !(1e-128..=1e126).contains(&x.abs()) {
        return Err(format!(
            "`{n}` is outside the range SQS accepts (10^-128 to 10^126)"
        ));
    }
    Ok(())
}

impl From<&str> for AttributeValue {
    fn from(s: &str) -> Self {
        AttributeValue::String(s.to_string().into())
    }
}

impl From<String> for AttributeValue {
    fn from(s: String) -> Self {
        AttributeValue::String(s.into())
    }
}

impl From<&String> for AttributeValue {
    fn from(s: &String) -> Self {
        AttributeValue::String(s.clone().into())
    }
}

macro_rules! number_from {
    ($($t:ty),*) => {$(
        impl From<$t> for AttributeValue {
            fn from(n: $t) -> Self {
                AttributeValue::Number(n.to_string().into())
            }
        }
    )*};
}
number_from!(i8, i16, i32, i64, u8, u16, u32, u64, isize, usize, f32, f64);

impl From<Vec<String>> for AttributeValue {
    fn from(items: Vec<String>) -> Self {
        AttributeValue::string_array(items)
    }
}

impl From<Vec<&str>> for AttributeValue {
    fn from(items: Vec<&str>) -> Self {
        AttributeValue::string_array(items)
    }
}

impl<const N: usize> From<[&str; N]> for AttributeValue {
    fn from(items: [&str; N]) -> Self {
        AttributeValue::string_array(items)
    }
}

impl std::fmt::Display for AttributeValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Stored form (in an outbox kept with an idempotency record): a `String` value as a plain
/// JSON string — what outboxes stored before attributes were typed — and other types as
/// `{"type": "Number", "value": "42"}`.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Stored {
    Plain(String),
    Typed {
        #[serde(rename = "type")]
        data_type: String,
        value: String,
    },
}

impl Serialize for AttributeValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AttributeValue::String(v) => Stored::Plain(v.to_string()),
            other => Stored::Typed {
                data_type: other.data_type().to_string(),
                value: other.as_str().to_string(),
            },
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for AttributeValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Stored::deserialize(d)? {
            Stored::Plain(v) => Ok(AttributeValue::String(v.into())),
            Stored::Typed { data_type, value } => AttributeValue::from_wire(&data_type, value)
                .ok_or_else(|| {
                    serde::de::Error::custom(format!("unknown attribute type {data_type}"))
                }),
        }
    }
}

/// Why SQS/SNS, or sourceflow, would refuse `name` as the name of an attribute a producer
/// sets.
///
/// SQS: up to 256 characters of `A-Z a-z 0-9 _ - .`, case-sensitive, no leading or trailing
/// period and no two periods in a row, not starting with `AWS.` or `Amazon.` (any case).
/// sourceflow keeps `sourceflow.*` and the names it sets itself (`content-type`,
/// `traceparent`, `tracestate`).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an attribute name must not be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "an attribute name is at most {MAX_NAME_LEN} characters, this one has {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(format!(
            "{c:?} is not allowed in an attribute name (use A-Z, a-z, 0-9, `_`, `-` and `.`)"
        ));
    }
    if name.starts_with('.') || name.ends_with('.') || name.contains("..") {
        return Err(
            "an attribute name must not start or end with a period, nor have two in a row".into(),
        );
    }
    let lower = name.to_ascii_lowercase();
    if lower.starts_with("aws.") || lower.starts_with("amazon.") {
        return Err("names starting with `AWS.` or `Amazon.` are reserved by AWS".into());
    }
    if lower.starts_with("sourceflow.") {
        return Err("names starting with `sourceflow.` are sourceflow's own".into());
    }
    use crate::envelope::attr;
    if [attr::CONTENT_TYPE, attr::TRACEPARENT, attr::TRACESTATE].contains(&name) {
        return Err(format!("`{name}` is set by sourceflow itself"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["region", "order-total", "a.b_c", "X1"] {
            assert_eq!(check_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ".a",
            "a.",
            "a..b",
            "a b",
            "é",
            "AWS.x",
            "amazon.y",
            "sourceflow.type",
            "Sourceflow.x",
            "traceparent",
            "content-type",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_name(&"a".repeat(257)).is_err());
        assert!(check_name(&"a".repeat(256)).is_ok());
    }

    #[test]
    fn values() {
        assert!(AttributeValue::from("").check().is_err());
        assert!(AttributeValue::from(f64::NAN).check().is_err());
        assert!(AttributeValue::Number("4x".into()).check().is_err());
        assert!(AttributeValue::Number("1e200".into()).check().is_err());
        assert!(AttributeValue::Number("1".repeat(39).into())
            .check()
            .is_err());
        assert!(AttributeValue::from(-3.5).check().is_ok());
        assert!(AttributeValue::from(0).check().is_ok());
        assert!(AttributeValue::StringArray("[1, \"a\", null]".into())
            .check()
            .is_ok());
        assert!(AttributeValue::StringArray("[[1]]".into()).check().is_err());
        assert!(AttributeValue::StringArray("a".into()).check().is_err());
    }

    #[test]
    fn stored_form_reads_plain_strings_of_older_outboxes() {
        let v: Vec<(AttributeName, AttributeValue)> =
            serde_json::from_str(r#"[["a","x"],["n",{"type":"Number","value":"4"}]]"#).unwrap();
        assert_eq!(v[0].1, AttributeValue::from("x"));
        assert_eq!(v[1].1, AttributeValue::from(4));
        let back = serde_json::to_string(&v).unwrap();
        assert_eq!(back, r#"[["a","x"],["n",{"type":"Number","value":"4"}]]"#);
    }
}
