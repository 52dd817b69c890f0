//! Decoding JSON into message types with reasons that never quote a value.
//!
//! serde_json's errors quote what they found (`invalid type: string "4111 1111 …",
//! expected u64`): fine for a developer's own input, a leak for a `#[sensitive]` field or a
//! decrypted payload, whose reasons end up in `sourceflow.dlq_reason` and in logs. The
//! reasons built here name the field path (`card.number`, `lines[2].qty`) and what was
//! expected, and only the *kind* of what was found (a string, an integer), never the value.

use serde::de::DeserializeOwned;

/// Decodes `json` into `T`. On failure, decodes again tracking the path (only then: the
/// happy path pays nothing) and returns a reason without values.
pub(crate) fn decode<T: DeserializeOwned>(json: &str) -> Result<T, String> {
    match serde_json::from_str(json) {
        Ok(v) => Ok(v),
        Err(first) => {
            let mut de = serde_json::Deserializer::from_str(json);
            Err(match serde_path_to_error::deserialize::<_, T>(&mut de) {
                Err(e) => describe(e.inner(), &e.path().to_string()),
                // Cannot happen (the same input failed above); report the first error.
                Ok(_) => describe(&first, "."),
            })
        }
    }
}

/// A reason for `e` at `path` (`.` is the document itself) that quotes no value.
pub(crate) fn describe(e: &serde_json::Error, path: &str) -> String {
    let what = match e.classify() {
        // Syntax errors describe the text's shape ("expected `,` or `}`"), never a value.
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            strip_position(&e.to_string())
        }
        serde_json::error::Category::Io => "the input could not be read".to_string(),
        serde_json::error::Category::Data => data_error(&strip_position(&e.to_string())),
    };
    if matches!(path, "" | "." | "?") {
        what
    } else {
        format!("at `{path}`: {what}")
    }
}

/// serde_json appends ` at line 1 column 20`; the column would point into the value.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// The kinds serde names for what it found (`serde::de::Unexpected`), longest first.
const FOUND: &[(&str, &str)] = &[
    ("floating point", "a floating point number"),
    ("unit variant", "a unit variant"),
    ("newtype struct", "a newtype struct"),
    ("newtype variant", "a newtype variant"),
    ("tuple variant", "a tuple variant"),
    ("struct variant", "a struct variant"),
    ("unit value", "null"),
    ("byte array", "bytes"),
    ("boolean", "a boolean"),
    ("integer", "an integer"),
    ("string", "a string"),
    ("sequence", "an array"),
    ("map", "an object"),
    ("null", "null"),
    ("char", "a character"),
    ("enum", "an enum"),
    ("Option value", "an option"),
];

/// Rewrites serde's data errors without the values they quote; anything it does not
/// recognise (a custom error from a `Deserialize` implementation could say anything) is
/// withheld.
fn data_error(msg: &str) -> String {
    for (prefix, verb) in [
        ("invalid type: ", "wrong type"),
        ("invalid value: ", "invalid value"),
    ] {
        if let Some(rest) = msg.strip_prefix(prefix) {
            let found = FOUND
                .iter()
                .find(|(k, _)| rest.starts_with(k))
                .map_or("something else", |(_, v)| v);
            // The expectation comes last; the value (before it) may itself contain the
            // separator, so split at the last one.
            return match rest.rsplit_once(", expected ") {
                Some((_, expected)) => format!("{verb}: found {found}, expected {expected}"),
                None => format!("{verb}: found {found}"),
            };
        }
    }
    if let Some(rest) = msg.strip_prefix("invalid length ") {
        return format!("invalid length {rest}");
    }
    if msg.starts_with("unknown variant ") {
        // The variant's name is a value of the payload.
        return match msg.split_once(", expected ") {
            Some((_, expected)) => format!("unknown variant, expected {expected}"),
            None => "unknown variant".to_string(),
        };
    }
    // Field names come from the type, not the payload.
    for keep in ["missing field `", "unknown field `", "duplicate field `"] {
        if msg.starts_with(keep) {
            return msg.to_string();
        }
    }
    "the value was refused by the type's deserializer (details withheld: they may quote the value)"
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Card {
        number: u64,
        holder: String,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Order {
        id: u64,
        card: Card,
        lines: Vec<Line>,
        status: Status,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Line {
        qty: u32,
    }

    #[derive(Debug, serde::Deserialize)]
    enum Status {
        Open,
    }

    const SECRET: &str = "4111 1111 1111 1111";

    fn reason(json: &str) -> String {
        let r = decode::<Order>(json).expect_err("must fail");
        assert!(!r.contains("4111"), "the value leaked: {r}");
        r
    }

    #[test]
    fn reasons_name_the_path_and_the_expectation_never_the_value() {
        let r = reason(&format!(
            r#"{{"id":1,"card":{{"number":"{SECRET}","holder":"x"}},"lines":[],"status":"Open"}}"#
        ));
        assert_eq!(
            r,
            "at `card.number`: wrong type: found a string, expected u64"
        );
        let r = reason(
            r#"{"id":1,"card":{"number":1,"holder":"x"},"lines":[{"qty":1},{"qty":-4111}],"status":"Open"}"#,
        );
        assert!(
            r.starts_with("at `lines[1].qty`: invalid value: found an integer"),
            "{r}"
        );
        let r = reason(&format!(
            r#"{{"id":1,"card":{{"number":1,"holder":"x"}},"lines":[],"status":"{SECRET}"}}"#
        ));
        assert_eq!(r, "at `status`: unknown variant, expected `Open`");
        let r = reason(r#"{"id":1,"lines":[],"status":"Open"}"#);
        assert_eq!(r, "missing field `card`");
        // A value containing the separator does not confuse the split.
        let r = reason(
            r#"{"id":"4111, expected x","card":{"number":1,"holder":"x"},"lines":[],"status":"Open"}"#,
        );
        assert_eq!(r, "at `id`: wrong type: found a string, expected u64");
        assert_eq!(reason(r#"{"id": 1,"#), "EOF while parsing a value");
    }

    #[test]
    fn the_happy_path_decodes() {
        let o: Order = decode(
            r#"{"id":1,"card":{"number":2,"holder":"x"},"lines":[{"qty":3}],"status":"Open"}"#,
        )
        .expect("decodes");
        assert_eq!(o.lines[0].qty, 3);
    }
}
