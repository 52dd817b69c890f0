//! SNS's rules for a filter policy on message attributes, checked at compile time.
//!
//! A copy of the checks of `sourceflow::filter::FilterPolicy::parse`, which a proc-macro
//! crate cannot call: the same rules, in the same order, with the same messages. That
//! crate's test `filter::tests::macro_rules_agree` compiles this file and runs both on one
//! table of policies, so the two cannot part unnoticed. Only `serde_json` is used here.

use serde_json::{Map, Value};

const MAX_KEYS: usize = 5;
const MAX_COMBINATIONS: usize = 150;
const MAX_NUMBER: f64 = 1e9;

/// Why SNS would refuse `policy`, if it would.
pub fn check(policy: &Value) -> Result<(), String> {
    let map = policy.as_object().ok_or_else(|| {
        "a filter policy is a JSON object of attribute names to lists of conditions".to_string()
    })?;
    let branches = branches(map)?;
    if map.len() > MAX_KEYS {
        return Err(format!(
            "a filter policy has at most {MAX_KEYS} keys, this one has {}",
            map.len()
        ));
    }
    for b in &branches {
        let mut keys: Vec<&str> = b.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        if keys.len() > MAX_KEYS {
            return Err(format!(
                "a filter policy has at most {MAX_KEYS} keys, and one branch of its `$or` has {} ({})",
                keys.len(),
                keys.join(", ")
            ));
        }
    }
    let combinations: usize = branches
        .iter()
        .map(|b| b.iter().map(|(_, n)| *n).product::<usize>())
        .sum();
    if combinations > MAX_COMBINATIONS {
        return Err(format!(
            "a filter policy has at most {MAX_COMBINATIONS} combinations of values (the product of its lists' lengths, summed over `$or`), this one has {combinations}"
        ));
    }
    Ok(())
}

/// The keys of every branch (`$or` expanded), each with its number of conditions.
pub fn branches(map: &Map<String, Value>) -> Result<Vec<Vec<(String, usize)>>, String> {
    if map.is_empty() {
        return Err("a filter policy (or a policy in `$or`) needs at least one key".into());
    }
    let mut out: Vec<Vec<(String, usize)>> = vec![Vec::new()];
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
                        merged.extend(b.iter().cloned());
                        expanded.push(merged);
                    }
                }
            }
            out = expanded;
            continue;
        }
        let n = conditions(key, value)?;
        for b in &mut out {
            b.push((key.clone(), n));
        }
    }
    Ok(out)
}

fn conditions(key: &str, value: &Value) -> Result<usize, String> {
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
    for c in list {
        condition(key, c)?;
    }
    Ok(list.len())
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

fn condition(key: &str, c: &Value) -> Result<(), String> {
    match c {
        Value::String(_) | Value::Bool(_) | Value::Null => Ok(()),
        Value::Number(_) => number(key, c).map(|_| ()),
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
                    .map(|_| ())
                    .ok_or_else(|| format!("`{key}`: `{what}` takes a string, not {arg}"))
            };
            match op.as_str() {
                "prefix" | "suffix" | "equals-ignore-case" => string(op),
                "exists" => arg
                    .as_bool()
                    .map(|_| ())
                    .ok_or_else(|| format!("`{key}`: `exists` takes true or false, not {arg}")),
                "anything-but" => anything_but(key, arg),
                "numeric" => numeric(key, arg),
                "cidr" => cidr(key, arg),
                other => Err(format!(
                    "`{key}` uses the unknown operator `{other}` (SNS has prefix, suffix, equals-ignore-case, anything-but, numeric, exists and cidr)"
                )),
            }
        }
    }
}

fn anything_but(key: &str, arg: &Value) -> Result<(), String> {
    match arg {
        Value::String(_) => Ok(()),
        Value::Number(_) => number(key, arg).map(|_| ()),
        Value::Array(items) if items.is_empty() => {
            Err(format!("`{key}`: `anything-but` has an empty list"))
        }
        Value::Array(items) if items.iter().all(Value::is_string) => Ok(()),
        Value::Array(items) if items.iter().all(Value::is_number) => {
            items.iter().try_for_each(|i| number(key, i).map(|_| ()))
        }
        Value::Array(_) => Err(format!(
            "`{key}`: the list of `anything-but` holds strings only or numbers only"
        )),
        Value::Object(o) if o.len() == 1 => {
            let (op, v) = o.iter().next().expect("one entry");
            let s = v.as_str().map(|_| ()).ok_or_else(|| {
                format!("`{key}`: `anything-but` `{op}` takes a string, not {v}")
            });
            match op.as_str() {
                "prefix" | "suffix" => s,
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

fn numeric(key: &str, arg: &Value) -> Result<(), String> {
    let items = arg.as_array().ok_or_else(|| {
        format!("`{key}`: `numeric` takes a list such as [\">\", 0, \"<=\", 150]")
    })?;
    let op = |v: &Value| -> Result<&'static str, String> {
        match v.as_str() {
            Some("=") => Ok("="),
            Some("<") => Ok("<"),
            Some("<=") => Ok("<="),
            Some(">") => Ok(">"),
            Some(">=") => Ok(">="),
            _ => Err(format!(
                "`{key}`: {v} is not a numeric operator (=, <, <=, >, >=)"
            )),
        }
    };
    match items.as_slice() {
        [o, n] => {
            op(o)?;
            number(key, n).map(|_| ())
        }
        [o1, n1, o2, n2] => {
            let (lower, upper) = (op(o1)?, op(o2)?);
            if !matches!(lower, ">" | ">=") || !matches!(upper, "<" | "<=") {
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
            Ok(())
        }
        _ => Err(format!(
            "`{key}`: `numeric` takes one comparison [\"<\", 5] or a range [\">\", 0, \"<=\", 150]"
        )),
    }
}

fn cidr(key: &str, arg: &Value) -> Result<(), String> {
    let bad = || format!("`{key}`: `cidr` takes a network such as \"10.0.0.0/24\", not {arg}");
    let (ip, bits) = arg
        .as_str()
        .and_then(|s| s.split_once('/'))
        .ok_or_else(bad)?;
    let ip: std::net::IpAddr = ip.parse().map_err(|_| bad())?;
    let bits: u8 = bits.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if bits > max {
        return Err(bad());
    }
    Ok(())
}
