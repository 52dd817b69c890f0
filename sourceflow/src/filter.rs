//! SNS subscription filter policies on message attributes, as the embedded transport
//! applies them (`FilterPolicyScope=MessageAttributes`).
//!
//! A policy is a JSON object: every key names an attribute, and its array of conditions
//! matches when any of them does; every key must match (`$or` takes a list of policies,
//! any of which may match). Conditions: an exact string, an exact number, `{"prefix": ..}`,
//! `{"suffix": ..}`, `{"equals-ignore-case": ..}`, `{"anything-but": [..] | ".." |
//! {"prefix": ..}}`, `{"numeric": ["<", 5, ">=", 1]}` and `{"exists": true | false}`.

use serde_json::Value;

/// A parsed filter policy.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterPolicy {
    source: Value,
}

impl FilterPolicy {
    /// Parses a policy; an error says what is wrong with it.
    pub fn parse(policy: &Value) -> Result<Self, String> {
        if !policy.is_object() {
            return Err("a filter policy is a JSON object".into());
        }
        Ok(FilterPolicy {
            source: policy.clone(),
        })
    }

    /// The policy as JSON.
    pub fn as_json(&self) -> &Value {
        &self.source
    }

    /// Whether a message with these attributes passes.
    pub fn matches(&self, attributes: &[(String, String)]) -> bool {
        matches_policy(&self.source, attributes)
    }
}

fn matches_policy(policy: &Value, attributes: &[(String, String)]) -> bool {
    let Some(map) = policy.as_object() else {
        return false;
    };
    map.iter().all(|(key, conditions)| {
        if key == "$or" {
            return conditions
                .as_array()
                .is_some_and(|alts| alts.iter().any(|p| matches_policy(p, attributes)));
        }
        let value = crate::envelope::attribute(attributes, key);
        match conditions {
            Value::Array(cs) => cs.iter().any(|c| condition(c, value)),
            c => condition(c, value),
        }
    })
}

fn condition(c: &Value, value: Option<&str>) -> bool {
    match c {
        Value::String(s) => value == Some(s.as_str()),
        Value::Number(n) => value.and_then(|v| v.parse::<f64>().ok()) == n.as_f64(),
        Value::Object(o) => {
            if let Some(exists) = o.get("exists").and_then(Value::as_bool) {
                return value.is_some() == exists;
            }
            let Some(v) = value else {
                return false;
            };
            if let Some(p) = o.get("prefix").and_then(Value::as_str) {
                return v.starts_with(p);
            }
            if let Some(p) = o.get("suffix").and_then(Value::as_str) {
                return v.ends_with(p);
            }
            if let Some(p) = o.get("equals-ignore-case").and_then(Value::as_str) {
                return v.eq_ignore_ascii_case(p);
            }
            if let Some(but) = o.get("anything-but") {
                return anything_but(but, v);
            }
            if let Some(n) = o.get("numeric").and_then(Value::as_array) {
                return numeric(n, v);
            }
            false
        }
        _ => false,
    }
}

fn anything_but(but: &Value, v: &str) -> bool {
    match but {
        Value::Array(xs) => !xs.iter().any(|x| condition(x, Some(v))),
        Value::Object(o) => match o.get("prefix").and_then(Value::as_str) {
            Some(p) => !v.starts_with(p),
            None => false,
        },
        x => !condition(x, Some(v)),
    }
}

fn numeric(ops: &[Value], v: &str) -> bool {
    let Ok(x) = v.parse::<f64>() else {
        return false;
    };
    ops.chunks(2).all(|pair| match pair {
        [Value::String(op), bound] => {
            let Some(b) = bound.as_f64() else {
                return false;
            };
            match op.as_str() {
                "=" => x == b,
                "<" => x < b,
                "<=" => x <= b,
                ">" => x > b,
                ">=" => x >= b,
                _ => false,
            }
        }
        _ => false,
    })
}
