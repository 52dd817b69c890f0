//! Compile-time validation of SQS queue names, SNS topic names and wire names.
//!
//! The limits are AWS's: a queue name is 1-80 characters of `[A-Za-z0-9_-]` with an optional
//! `.fifo` suffix; a topic name is 1-256 characters of the same set, `.fifo` suffix allowed.
//! sourceflow appends `-dlq` for the dead-letter queue, so a queue name keeps four characters
//! in reserve.

/// Longest queue name AWS accepts.
pub const SQS_MAX: usize = 80;
/// What sourceflow appends to a queue name for its dead-letter queue.
pub const DLQ_SUFFIX: &str = "-dlq";
/// Longest topic name AWS accepts.
pub const SNS_MAX: usize = 256;
/// Longest wire name sourceflow accepts (it travels as an SQS message attribute value).
pub const WIRE_NAME_MAX: usize = 256;

/// Checks an SQS queue name; `Ok(true)` when it names a FIFO queue.
pub fn check_queue(name: &str) -> Result<bool, String> {
    let (stem, fifo) = split_fifo(name, "queue")?;
    check_charset(stem, name, "queue", "SQS queue names")?;
    let max = SQS_MAX - DLQ_SUFFIX.len();
    if name.len() > max {
        return Err(format!(
            "queue name `{name}` is {} characters long; SQS allows {SQS_MAX}, and sourceflow \
             keeps {} for the dead-letter queue suffix `{DLQ_SUFFIX}`, so use at most {max}",
            name.len(),
            DLQ_SUFFIX.len()
        ));
    }
    Ok(fifo)
}

/// Checks an SNS topic name; `Ok(true)` when it names a FIFO topic.
pub fn check_topic(name: &str) -> Result<bool, String> {
    let (stem, fifo) = split_fifo(name, "topic")?;
    check_charset(stem, name, "topic", "SNS topic names")?;
    if name.len() > SNS_MAX {
        return Err(format!(
            "topic name is {} characters long; SNS allows at most {SNS_MAX}: shorten it by {}",
            name.len(),
            name.len() - SNS_MAX
        ));
    }
    Ok(fifo)
}

/// Checks a wire name: the stable string that identifies a message type on the wire.
pub fn check_wire_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("wire name is empty; use something stable like `orders.CreateOrder.v1`".into());
    }
    if name.len() > WIRE_NAME_MAX {
        return Err(format!(
            "wire name is {} characters long; at most {WIRE_NAME_MAX} are allowed",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/')))
    {
        return Err(format!(
            "invalid character {c:?} in wire name `{name}`: use ASCII letters, digits and `. _ - : /`, \
             e.g. `orders.CreateOrder.v1`"
        ));
    }
    Ok(())
}

fn split_fifo<'a>(name: &'a str, what: &str) -> Result<(&'a str, bool), String> {
    if name.is_empty() {
        let example = if what == "topic" {
            "order-events"
        } else {
            "orders"
        };
        return Err(format!(
            "{what} name is empty; name the {what}, e.g. `{example}` (or `{example}.fifo` for FIFO)"
        ));
    }
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".fifo") && !name.ends_with(".fifo") {
        return Err(format!(
            "the FIFO suffix must be lower-case: write `{}.fifo`",
            &name[..name.len() - 5]
        ));
    }
    match name.strip_suffix(".fifo") {
        Some("") => Err(format!(
            "{what} name `.fifo` has nothing before the suffix; write e.g. `orders.fifo`"
        )),
        Some(stem) => Ok((stem, true)),
        None => Ok((name, false)),
    }
}

fn check_charset(stem: &str, name: &str, what: &str, rule: &str) -> Result<(), String> {
    if let Some(c) = stem
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        let hint = if c == '.' {
            " (a `.` is only allowed in the `.fifo` suffix, at the very end)"
        } else {
            ""
        };
        return Err(format!(
            "invalid character {c:?} in {what} name `{name}`{hint}: {rule} allow only ASCII \
             letters, digits, `-` and `_`, plus a `.fifo` suffix for FIFO"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names() {
        assert_eq!(check_queue("orders"), Ok(false));
        assert_eq!(check_queue("orders.fifo"), Ok(true));
        assert_eq!(check_queue(&"a".repeat(76)), Ok(false));
        assert!(check_queue(&"a".repeat(77))
            .unwrap_err()
            .contains("at most 76"));
        assert!(check_queue("orders.FIFO")
            .unwrap_err()
            .contains("lower-case"));
        assert!(check_queue("ord ers").unwrap_err().contains("' '"));
        assert!(check_queue("orders.v1")
            .unwrap_err()
            .contains("`.fifo` suffix, at the very end"));
        assert!(check_queue(".fifo").is_err());
        assert!(check_queue("").is_err());
    }

    #[test]
    fn topic_names() {
        assert_eq!(check_topic("order-events"), Ok(false));
        assert_eq!(check_topic("order-events.fifo"), Ok(true));
        assert_eq!(check_topic(&"t".repeat(256)), Ok(false));
        assert!(check_topic(&"t".repeat(257)).is_err());
        assert!(check_topic("order/events").is_err());
    }

    #[test]
    fn wire_names() {
        assert!(check_wire_name("orders.CreateOrder.v1").is_ok());
        assert!(check_wire_name("").is_err());
        assert!(check_wire_name("has space").is_err());
    }
}
