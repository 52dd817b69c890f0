//! SNS subscription filter policies on message attributes (`FilterPolicyScope=MessageAttributes`),
//! as the embedded transport applies them and as SNS documents them.
//!
//! A policy is a JSON object: every key names an attribute and takes a list of conditions,
//! which matches when any of them does; every key must match. `"$or": [policy, ..]` matches
//! when one of its policies does. The conditions:
//!
//! | condition | matches |
//! |---|---|
//! | `"eu"` | a `String` equal to it |
//! | `42` | a `Number` equal to it (`42`, `42.0`, `4.2e1`) |
//! | `{"prefix": "eu-"}`, `{"suffix": "-1"}`, `{"equals-ignore-case": "EU"}` | a `String` |
//! | `{"anything-but": ["a", "b"]}` (or one string), `{"anything-but": [1, 2]}` (or one number) | a value that is none of them (a `Number` is none of the strings, a `String` none of the numbers) |
//! | `{"anything-but": {"prefix": "x"}}`, `{"anything-but": {"suffix": "x"}}` | a `String` without it |
//! | `{"numeric": [">", 0, "<=", 150]}` (`=`, `<`, `<=`, `>`, `>=`; a range is a lower then an upper bound) | a `Number` |
//! | `{"exists": true}` / `{"exists": false}` | the attribute is there / is not (and the message has some attribute) |
//! | `{"cidr": "10.0.0.0/24"}` | a `String` holding an IP address in that network |
//!
//! Types matter, as on SNS: a string condition never matches a `Number` attribute and a
//! numeric condition never matches a `String` one (`"42"` is not `42`); an attribute must be
//! there for any condition but `exists` to match. A `String.Array`
//! attribute matches a condition when one of its elements does (strings against string
//! conditions, numbers against numeric ones) — for `anything-but` too: `["rugby",
//! "baseball"]` passes `{"anything-but": ["rugby"]}` because it holds a value that is not
//! rugby (the example of SNS's "String value matching" page).
//!
//! [`FilterPolicy::parse`] refuses what SNS refuses: a key without a list of conditions, an
//! empty list, nesting (attribute scope has none), an operator it does not know or with the
//! wrong argument, a numeric expression that is not one comparison or a lower-then-upper
//! range, numbers outside ±10^9, more than five keys in a policy (or in one branch of its
//! `$or`s), and more than 150 combinations (the product of the list lengths, summed over the
//! branches of `$or`).
//!
//! Not modelled: SNS compares numbers to five digits after the decimal point and only within
//! ±10^9; here they compare as `f64`, so values closer than 10^-5, or beyond that range, may
//! compare otherwise than on SNS. `Binary` attributes are not carried at all.
//!
//! The proc-macro crate checks `#[handler(filter = ..)]` at compile time with a copy of these
//! rules (`sourceflow-macros/src/filter_rules.rs`: a proc-macro crate cannot use this one);
//! the test `macro_rules_agree` runs both on one table and fails when they part.

use std::net::IpAddr;

use serde_json::{Map, Value};

use crate::envelope::AttributeValue;

/// Most keys (attribute names) in a filter policy.
pub const MAX_KEYS: usize = 5;
/// Most combinations of values in a filter policy.
pub const MAX_COMBINATIONS: usize = 150;
/// Largest magnitude of a number in a filter policy (SNS: -10^9 to 10^9).
pub const MAX_NUMBER: f64 = 1e9;

/// A parsed filter policy.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterPolicy {
    source: Value,
    /// The policy with every `$or` expanded: it matches when one branch does.
    branches: Vec<Branch>,
}

/// One branch of a policy: every key's conditions must match.
type Branch = Vec<(String, Vec<Condition>)>;

/// Why a filter policy would be refused, in one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

#[derive(Debug, Clone, PartialEq)]
enum Condition {
    Exact(String),
    ExactNumber(f64),
    Prefix(String),
    Suffix(String),
    EqualsIgnoreCase(String),
    AnythingBut(AnythingBut),
    /// Comparisons, all of which must hold.
    Numeric(Vec<(Cmp, f64)>),
    Exists(bool),
    Cidr(IpAddr, u8),
    /// `true`, `false` or `null`: valid JSON in a policy, never equal to an attribute value.
    Never,
}

#[derive(Debug, Clone, PartialEq)]
enum AnythingBut {
    Strings(Vec<String>),
    Numbers(Vec<f64>),
    Prefix(String),
    Suffix(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Cmp {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

/// One element of an attribute value, as conditions see it.
enum Element<'a> {
    Str(&'a str),
    Num(f64),
}

impl FilterPolicy {
    /// Parses a policy; an error says what SNS would object to.
    pub fn parse(policy: &Value) -> Result<Self, PolicyError> {
        let err = |m: String| PolicyError(m);
        let map = policy.as_object().ok_or_else(|| {
            err("a filter policy is a JSON object of attribute names to lists of conditions".into())
        })?;
        let branches = branches(map).map_err(err)?;
        if map.len() > MAX_KEYS {
            return Err(err(format!(
                "a filter policy has at most {MAX_KEYS} keys, this one has {}",
                map.len()
            )));
        }
        for b in &branches {
            let mut keys: Vec<&str> = b.iter().map(|(k, _)| k.as_str()).collect();
            keys.sort_unstable();
            keys.dedup();
            if keys.len() > MAX_KEYS {
                return Err(err(format!(
                    "a filter policy has at most {MAX_KEYS} keys, and one branch of its `$or` has {} ({})",
                    keys.len(),
                    keys.join(", ")
                )));
            }
        }
        let combinations: usize = branches
            .iter()
            .map(|b| b.iter().map(|(_, cs)| cs.len()).product::<usize>())
            .sum();
        if combinations > MAX_COMBINATIONS {
            return Err(err(format!(
                "a filter policy has at most {MAX_COMBINATIONS} combinations of values (the product of its lists' lengths, summed over `$or`), this one has {combinations}"
            )));
        }
        Ok(FilterPolicy {
            source: policy.clone(),
            branches,
        })
    }

    /// The policy as JSON.
    pub fn as_json(&self) -> &Value {
        &self.source
    }

    /// Whether a message with these attributes passes.
    pub fn matches(&self, attributes: &[(crate::AttributeName, AttributeValue)]) -> bool {
        self.branches.iter().any(|branch| {
            branch.iter().all(|(key, conditions)| {
                let value = crate::envelope::attribute_value(attributes, key);
                conditions
                    .iter()
                    .any(|c| c.matches(value, !attributes.is_empty()))
            })
        })
    }
}

/// The policy `map` with its `$or`s expanded into branches of (key, conditions).
fn branches(map: &Map<String, Value>) -> Result<Vec<Branch>, String> {
    if map.is_empty() {
        return Err("a filter policy (or a policy in `$or`) needs at least one key".into());
    }
    let mut out: Vec<Branch> = vec![Vec::new()];
    for (key, value) in map {
        if key == "$or" {
            let alternatives = value
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or("`$or` takes a non-empty list of policies")?;
            let mut expanded = Vec::new();
            for alt in alternatives {
                let alt = alt
                    .as_object()
                    .ok_or("every alternative of `$or` is a policy (a JSON object)")?;
                for b in branches(alt)? {
                    for prefix in &out {
                        let mut merged = prefix.clone();
                        // A key inside and outside `$or`: both lists must match.
                        merged.extend(b.iter().cloned());
                        expanded.push(merged);
                    }
                }
            }
            out = expanded;
            continue;
        }
        let conditions = conditions(key, value)?;
        for b in &mut out {
            b.push((key.clone(), conditions.clone()));
        }
    }
    Ok(out)
}

fn conditions(key: &str, value: &Value) -> Result<Vec<Condition>, String> {
    let list = match value {
        Value::Array(list) => list,
        Value::Object(_) => {
            return Err(format!(
                "`{key}`: nested policies are not supported on message attributes; give `{key}` a list of conditions"
            ))
        }
        other => {
            return Err(format!(
                "`{key}` takes a list of conditions, e.g. \"{key}\": [{other}]"
            ))
        }
    };
    if list.is_empty() {
        return Err(format!("`{key}` has an empty list of conditions"));
    }
    list.iter().map(|c| condition(key, c)).collect()
}

fn number(key: &str, n: &Value) -> Result<f64, String> {
    let x = n
        .as_f64()
        .ok_or_else(|| format!("`{key}`: {n} is not a number (numbers go without quotes)"))?;
    if x.abs() > MAX_NUMBER {
        return Err(format!(
            "`{key}`: {n} is outside the numbers a filter policy takes (-10^9 to 10^9)"
        ));
    }
    Ok(x)
}

fn condition(key: &str, c: &Value) -> Result<Condition, String> {
    match c {
        Value::String(s) => Ok(Condition::Exact(s.clone())),
        Value::Number(_) => Ok(Condition::ExactNumber(number(key, c)?)),
        Value::Bool(_) | Value::Null => Ok(Condition::Never),
        Value::Array(_) => Err(format!(
            "`{key}`: a condition is a string, a number or an object with one operator, not a list"
        )),
        Value::Object(o) => {
            if o.len() != 1 {
                return Err(format!(
                    "`{key}`: an operator object has exactly one operator, this one has {}",
                    o.len()
                ));
            }
            let (op, arg) = o.iter().next().expect("one entry");
            let string = |what: &str| {
                arg.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("`{key}`: `{what}` takes a string, not {arg}"))
            };
            match op.as_str() {
                "prefix" => Ok(Condition::Prefix(string("prefix")?)),
                "suffix" => Ok(Condition::Suffix(string("suffix")?)),
                "equals-ignore-case" => Ok(Condition::EqualsIgnoreCase(string("equals-ignore-case")?)),
                "exists" => arg
                    .as_bool()
                    .map(Condition::Exists)
                    .ok_or_else(|| format!("`{key}`: `exists` takes true or false, not {arg}")),
                "anything-but" => anything_but(key, arg).map(Condition::AnythingBut),
                "numeric" => numeric(key, arg).map(Condition::Numeric),
                "cidr" => cidr(key, arg),
                other => Err(format!(
                    "`{key}` uses the unknown operator `{other}` (SNS has prefix, suffix, equals-ignore-case, anything-but, numeric, exists and cidr)"
                )),
            }
        }
    }
}

fn anything_but(key: &str, arg: &Value) -> Result<AnythingBut, String> {
    match arg {
        Value::String(s) => Ok(AnythingBut::Strings(vec![s.clone()])),
        Value::Number(_) => Ok(AnythingBut::Numbers(vec![number(key, arg)?])),
        Value::Array(items) if items.is_empty() => {
            Err(format!("`{key}`: `anything-but` has an empty list"))
        }
        Value::Array(items) if items.iter().all(Value::is_string) => Ok(AnythingBut::Strings(
            items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_string))
                .collect(),
        )),
        Value::Array(items) if items.iter().all(Value::is_number) => Ok(AnythingBut::Numbers(
            items
                .iter()
                .map(|i| number(key, i))
                .collect::<Result<_, _>>()?,
        )),
        Value::Array(_) => Err(format!(
            "`{key}`: the list of `anything-but` holds strings only or numbers only"
        )),
        Value::Object(o) if o.len() == 1 => {
            let (op, v) = o.iter().next().expect("one entry");
            let s = v.as_str().map(str::to_string).ok_or_else(|| {
                format!("`{key}`: `anything-but` `{op}` takes a string, not {v}")
            });
            match op.as_str() {
                "prefix" => Ok(AnythingBut::Prefix(s?)),
                "suffix" => Ok(AnythingBut::Suffix(s?)),
                other => Err(format!(
                    "`{key}`: `anything-but` takes a list, a string, a number, `prefix` or `suffix`, not `{other}`"
                )),
            }
        }
        other => Err(format!(
            "`{key}`: `anything-but` takes a list, a string, a number, `prefix` or `suffix`, not {other}"
        )),
    }
}

/// `["op", n]` or a range `[">" | ">=", low, "<" | "<=", high]` with `low < high`.
fn numeric(key: &str, arg: &Value) -> Result<Vec<(Cmp, f64)>, String> {
    let items = arg.as_array().ok_or_else(|| {
        format!("`{key}`: `numeric` takes a list such as [\">\", 0, \"<=\", 150]")
    })?;
    let op = |v: &Value| -> Result<Cmp, String> {
        match v.as_str() {
            Some("=") => Ok(Cmp::Eq),
            Some("<") => Ok(Cmp::Lt),
            Some("<=") => Ok(Cmp::Le),
            Some(">") => Ok(Cmp::Gt),
            Some(">=") => Ok(Cmp::Ge),
            _ => Err(format!(
                "`{key}`: {v} is not a numeric operator (=, <, <=, >, >=)"
            )),
        }
    };
    match items.as_slice() {
        [o, n] => Ok(vec![(op(o)?, number(key, n)?)]),
        [o1, n1, o2, n2] => {
            let (lower, upper) = (op(o1)?, op(o2)?);
            if !matches!(lower, Cmp::Gt | Cmp::Ge) || !matches!(upper, Cmp::Lt | Cmp::Le) {
                return Err(format!(
                    "`{key}`: a numeric range is a lower bound (> or >=) then an upper bound (< or <=)"
                ));
            }
            let (low, high) = (number(key, n1)?, number(key, n2)?);
            if low >= high {
                return Err(format!(
                    "`{key}`: the lower bound of a numeric range ({low}) must be below its upper bound ({high})"
                ));
            }
            Ok(vec![(lower, low), (upper, high)])
        }
        _ => Err(format!(
            "`{key}`: `numeric` takes one comparison [\"<\", 5] or a range [\">\", 0, \"<=\", 150]"
        )),
    }
}

fn cidr(key: &str, arg: &Value) -> Result<Condition, String> {
    let bad = || format!("`{key}`: `cidr` takes a network such as \"10.0.0.0/24\", not {arg}");
    let (ip, bits) = arg
        .as_str()
        .and_then(|s| s.split_once('/'))
        .ok_or_else(bad)?;
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let bits: u8 = bits.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if bits > max {
        return Err(bad());
    }
    Ok(Condition::Cidr(ip, bits))
}

impl Condition {
    /// Whether `value` (the attribute, if the message has it) passes; `any_attributes`
    /// tells whether the message has attributes at all (`exists: false` needs some).
    fn matches(&self, value: Option<&AttributeValue>, any_attributes: bool) -> bool {
        if let Condition::Exists(want) = self {
            return match (want, value) {
                (true, Some(_)) => true,
                (false, None) => any_attributes,
                _ => false,
            };
        }
        let Some(value) = value else {
            return false;
        };
        match value {
            AttributeValue::String(s) => self.element(&Element::Str(s)),
            AttributeValue::Number(_) => value
                .as_number()
                .is_some_and(|x| self.element(&Element::Num(x))),
            AttributeValue::StringArray(_) => value.as_array().is_some_and(|items| {
                items.iter().any(|i| match i {
                    Value::String(s) => self.element(&Element::Str(s)),
                    Value::Number(n) => n.as_f64().is_some_and(|x| self.element(&Element::Num(x))),
                    _ => false,
                })
            }),
        }
    }

    fn element(&self, e: &Element<'_>) -> bool {
        match (self, e) {
            (Condition::Exact(s), Element::Str(v)) => s == v,
            (Condition::ExactNumber(x), Element::Num(v)) => x == v,
            (Condition::Prefix(p), Element::Str(v)) => v.starts_with(p.as_str()),
            (Condition::Suffix(p), Element::Str(v)) => v.ends_with(p.as_str()),
            (Condition::EqualsIgnoreCase(p), Element::Str(v)) => {
                p.to_lowercase() == v.to_lowercase()
            }
            // "Matches any message attribute that doesn't include any of the policy
            // attribute values": a value of the other type is none of them.
            (Condition::AnythingBut(AnythingBut::Strings(xs)), Element::Str(v)) => {
                !xs.iter().any(|x| x == v)
            }
            (Condition::AnythingBut(AnythingBut::Strings(_)), Element::Num(_)) => true,
            (Condition::AnythingBut(AnythingBut::Numbers(xs)), Element::Num(v)) => !xs.contains(v),
            (Condition::AnythingBut(AnythingBut::Numbers(_)), Element::Str(_)) => true,
            (Condition::AnythingBut(AnythingBut::Prefix(p)), Element::Str(v)) => {
                !v.starts_with(p.as_str())
            }
            (Condition::AnythingBut(AnythingBut::Suffix(p)), Element::Str(v)) => {
                !v.ends_with(p.as_str())
            }
            (Condition::Numeric(cmps), Element::Num(v)) => cmps.iter().all(|(op, b)| match op {
                Cmp::Eq => v == b,
                Cmp::Lt => v < b,
                Cmp::Le => v <= b,
                Cmp::Gt => v > b,
                Cmp::Ge => v >= b,
            }),
            (Condition::Cidr(net, bits), Element::Str(v)) => v
                .parse::<IpAddr>()
                .is_ok_and(|ip| in_network(ip, *net, *bits)),
            _ => false,
        }
    }
}

fn in_network(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// The rules the macro crate checks at compile time, compiled here from its own file.
#[cfg(test)]
#[path = "../../sourceflow-macros/src/filter_rules.rs"]
#[allow(dead_code)]
mod macro_rules;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use super::macro_rules;

    fn attrs(pairs: &[(&str, AttributeValue)]) -> Vec<(crate::AttributeName, AttributeValue)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string().into(), v.clone()))
            .collect()
    }

    fn passes(policy: Value, a: &[(&str, AttributeValue)]) -> bool {
        FilterPolicy::parse(&policy)
            .unwrap_or_else(|e| panic!("{policy}: {e}"))
            .matches(&attrs(a))
    }

    #[test]
    fn types_matter() {
        let n = || AttributeValue::from(42);
        let s = || AttributeValue::from("42");
        assert!(passes(json!({"a": [42]}), &[("a", n())]));
        assert!(passes(
            json!({"a": [42]}),
            &[("a", AttributeValue::Number("4.2e1".into()))]
        ));
        assert!(!passes(json!({"a": [42]}), &[("a", s())]));
        assert!(!passes(json!({"a": ["42"]}), &[("a", n())]));
        assert!(passes(json!({"a": ["42"]}), &[("a", s())]));
        assert!(!passes(
            json!({"a": [{"numeric": [">", 1]}]}),
            &[("a", s())]
        ));
        assert!(!passes(json!({"a": [{"prefix": "4"}]}), &[("a", n())]));
        assert!(passes(
            json!({"a": [{"anything-but": ["x"]}]}),
            &[("a", n())]
        ));
        assert!(passes(
            json!({"a": [{"anything-but": [42]}]}),
            &[("a", s())]
        ));
        assert!(!passes(
            json!({"a": [{"anything-but": [42]}]}),
            &[("a", n())]
        ));
        assert!(!passes(
            json!({"a": [{"anything-but": {"prefix": "x"}}]}),
            &[("a", n())]
        ));
        assert!(!passes(
            json!({"a": [{"anything-but": ["x"]}]}),
            &[("b", n())]
        ));
        let arr = AttributeValue::StringArray(r#"["x", 5]"#.into());
        assert!(passes(json!({"a": ["x"]}), &[("a", arr.clone())]));
        assert!(passes(
            json!({"a": [{"numeric": ["=", 5]}]}),
            &[("a", arr.clone())]
        ));
        assert!(!passes(json!({"a": ["5"]}), &[("a", arr)]));
    }

    #[test]
    fn exists_false_needs_some_attribute() {
        assert!(passes(
            json!({"a": [{"exists": false}]}),
            &[("b", "x".into())]
        ));
        assert!(!passes(json!({"a": [{"exists": false}]}), &[]));
        assert!(!passes(
            json!({"a": [{"exists": false}]}),
            &[("a", "x".into())]
        ));
    }

    #[test]
    fn cidr() {
        let p = json!({"ip": [{"cidr": "10.0.0.0/24"}]});
        assert!(passes(p.clone(), &[("ip", "10.0.0.7".into())]));
        assert!(!passes(p.clone(), &[("ip", "10.0.1.7".into())]));
        assert!(!passes(p, &[("ip", "nope".into())]));
        assert!(passes(
            json!({"ip": [{"cidr": "0.0.0.0/0"}]}),
            &[("ip", "1.2.3.4".into())]
        ));
    }

    /// Policies SNS refuses, each with a word of the reason.
    pub(crate) const REFUSED: &[(&str, &str)] = &[
        (r#"["a"]"#, "JSON object"),
        (r#"{}"#, "at least one key"),
        (r#"{"a": "x"}"#, "list of conditions"),
        (r#"{"a": []}"#, "empty list"),
        (r#"{"a": {"b": ["x"]}}"#, "nested"),
        (r#"{"a": [["x"]]}"#, "not a list"),
        (r#"{"a": [{"regex": "x"}]}"#, "unknown operator"),
        (
            r#"{"a": [{"prefix": "x", "suffix": "y"}]}"#,
            "exactly one operator",
        ),
        (r#"{"a": [{"prefix": 1}]}"#, "takes a string"),
        (r#"{"a": [{"exists": "yes"}]}"#, "true or false"),
        (r#"{"a": [{"anything-but": []}]}"#, "empty list"),
        (
            r#"{"a": [{"anything-but": ["x", 1]}]}"#,
            "strings only or numbers only",
        ),
        (
            r#"{"a": [{"anything-but": {"numeric": [">", 1]}}]}"#,
            "not `numeric`",
        ),
        (r#"{"a": [{"numeric": [">", "x"]}]}"#, "not a number"),
        (
            r#"{"a": [{"numeric": ["!=", 1]}]}"#,
            "not a numeric operator",
        ),
        (r#"{"a": [{"numeric": [">", 1, ">", 2]}]}"#, "lower bound"),
        (r#"{"a": [{"numeric": ["<", 5, ">", 1]}]}"#, "lower bound"),
        (
            r#"{"a": [{"numeric": [">", 5, "<", 1]}]}"#,
            "below its upper bound",
        ),
        (
            r#"{"a": [{"numeric": [">", 1, "<", 5, "=", 3]}]}"#,
            "one comparison",
        ),
        (r#"{"a": [{"numeric": []}]}"#, "one comparison"),
        (r#"{"a": [10000000000]}"#, "-10^9 to 10^9"),
        (r#"{"a": [{"cidr": "10.0.0.0"}]}"#, "network"),
        (r#"{"a": [{"cidr": "10.0.0.0/33"}]}"#, "network"),
        (
            r#"{"a": ["x"], "b": ["x"], "c": ["x"], "d": ["x"], "e": ["x"], "f": ["x"]}"#,
            "at most 5 keys",
        ),
        (
            r#"{"a": ["x"], "$or": [{"b": ["x"], "c": ["x"], "d": ["x"], "e": ["x"], "f": ["x"]}]}"#,
            "one branch",
        ),
        (r#"{"$or": []}"#, "non-empty list"),
        (r#"{"$or": ["x"]}"#, "is a policy"),
    ];

    /// Policies SNS takes.
    pub(crate) const ACCEPTED: &[&str] = &[
        r#"{"a": ["x", 1, {"prefix": "p"}, {"suffix": "s"}, {"equals-ignore-case": "E"}]}"#,
        r#"{"a": [{"anything-but": "x"}, {"anything-but": 1}, {"anything-but": ["x", "y"]}]}"#,
        r#"{"a": [{"anything-but": [1, 2.5]}, {"anything-but": {"prefix": "x"}}, {"anything-but": {"suffix": "x"}}]}"#,
        r#"{"a": [{"numeric": ["=", 1]}, {"numeric": [">", 0, "<=", 150]}, {"numeric": [">=", -1e9, "<", 1e9]}]}"#,
        r#"{"a": [{"exists": true}], "b": [{"exists": false}], "c": [true, null]}"#,
        r#"{"a": [{"cidr": "10.0.0.0/24"}, {"cidr": "2001:db8::/32"}]}"#,
        r#"{"$or": [{"a": ["x"]}, {"b": ["y"], "$or": [{"c": ["z"]}, {"d": ["w"]}]}]}"#,
        r#"{"a": ["x"], "b": ["x"], "c": ["x"], "d": ["x"], "e": ["x"]}"#,
        r#"{"a": ["x"], "$or": [{"a": ["y"]}, {"b": ["z"]}]}"#,
    ];

    #[test]
    fn refuses_what_sns_refuses() {
        for (p, why) in REFUSED {
            let v: Value = serde_json::from_str(p).unwrap();
            let e = FilterPolicy::parse(&v).expect_err(p);
            assert!(e.0.contains(why), "{p}: `{e}` does not say `{why}`");
        }
        for p in ACCEPTED {
            let v: Value = serde_json::from_str(p).unwrap();
            FilterPolicy::parse(&v).unwrap_or_else(|e| panic!("{p}: {e}"));
        }
    }

    /// Policies at and over the combination limit: (policy, accepted).
    fn combination_cases() -> Vec<(Value, bool)> {
        let values: Vec<Value> = (0..10).map(|i| json!(format!("v{i}"))).collect();
        let fifteen: Vec<Value> = (0..15).map(|i| json!(i)).collect();
        let mut sixteen = fifteen.clone();
        sixteen.push(json!(99));
        let big: Vec<Value> = (0..75).map(|i| json!(i)).collect();
        vec![
            // 10 × 15 = 150: the limit itself.
            (json!({"a": values, "b": fifteen}), true),
            (json!({"a": values, "b": sixteen}), false),
            // `$or` adds its branches: 2 × 75 + 1 > 150.
            (
                json!({"$or": [{"a": big, "b": ["x", "y"]}, {"c": ["z"]}]}),
                false,
            ),
        ]
    }

    #[test]
    fn combinations() {
        let cases = combination_cases();
        assert!(FilterPolicy::parse(&cases[0].0).is_ok());
        assert!(FilterPolicy::parse(&cases[1].0)
            .unwrap_err()
            .0
            .contains("160"));
        assert!(FilterPolicy::parse(&cases[2].0)
            .unwrap_err()
            .0
            .contains("151"));
    }

    /// The macro crate's copy of the rules accepts and refuses exactly what this parser
    /// does, with the same message.
    #[test]
    fn macro_rules_agree() {
        let mut all: Vec<Value> = REFUSED
            .iter()
            .map(|(p, _)| *p)
            .chain(ACCEPTED.iter().copied())
            .map(|p| serde_json::from_str(p).unwrap())
            .collect();
        all.extend(combination_cases().into_iter().map(|(p, _)| p));
        for v in all {
            let ours = FilterPolicy::parse(&v).map(|_| ()).map_err(|e| e.0);
            let theirs = macro_rules::check(&v);
            assert_eq!(ours, theirs, "{v}");
        }
    }
}
