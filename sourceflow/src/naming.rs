//! How declared names become resource names: environment prefix, dead-letter queues and
//! per-service subscriber queues.
//!
//! * a queue or topic `orders.fifo` with prefix `dev` is `dev-orders.fifo`;
//! * its dead-letter queue is `dev-orders-dlq.fifo` (the `.fifo` suffix stays last);
//! * service `billing` handling events of topic `order-events` listens on its own queue
//!   `dev-billing-order-events` (FIFO topic `order-events.fifo`: `dev-billing-order-events.fifo`),
//!   so every service gets each event once and instances of one service compete.

/// Longest SQS queue name.
pub const SQS_NAME_MAX: usize = 80;
/// Longest SNS topic name.
pub const SNS_NAME_MAX: usize = 256;

/// Resource naming for one environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Naming {
    prefix: String,
}

impl Naming {
    /// Naming with an environment prefix (empty for none).
    pub fn new(prefix: impl Into<String>) -> Self {
        Naming {
            prefix: prefix.into(),
        }
    }

    /// The environment prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full name of a declared queue or topic.
    pub fn resource(&self, declared: &str) -> String {
        if self.prefix.is_empty() {
            declared.to_string()
        } else {
            format!("{}-{declared}", self.prefix)
        }
    }

    /// The dead-letter queue of a full queue name.
    pub fn dead_letter(queue: &str) -> String {
        match queue.strip_suffix(".fifo") {
            Some(stem) => format!("{stem}-dlq.fifo"),
            None => format!("{queue}-dlq"),
        }
    }

    /// The queue through which `service` receives events of a declared topic.
    pub fn subscriber(&self, service: &str, topic: &str) -> String {
        match topic.strip_suffix(".fifo") {
            Some(stem) => self.resource(&format!("{service}-{stem}.fifo")),
            None => self.resource(&format!("{service}-{topic}")),
        }
    }
}

/// Checks a full queue name (dead-letter queue included) against the SQS rules.
pub fn check_queue_name(name: &str) -> Result<(), String> {
    let dlq = Naming::dead_letter(name);
    let stem = name.strip_suffix(".fifo").unwrap_or(name);
    if stem.is_empty() {
        return Err(format!("queue name `{name}` is empty"));
    }
    if let Some(c) = stem
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "queue name `{name}` contains {c:?}; SQS allows ASCII letters, digits, `-`, `_` and a `.fifo` suffix"
        ));
    }
    if dlq.len() > SQS_NAME_MAX {
        return Err(format!(
            "queue name `{name}` is too long: its dead-letter queue `{dlq}` would be {} characters, SQS allows {SQS_NAME_MAX}; shorten the service name, prefix or topic, or set `#[handler(queue = \"...\")]`",
            dlq.len()
        ));
    }
    Ok(())
}

/// Makes a service name out of anything (e.g. a binary name): invalid characters become `-`.
pub fn sanitize_service(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if s.is_empty() {
        "sourceflow".to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let n = Naming::new("dev");
        assert_eq!(n.resource("orders.fifo"), "dev-orders.fifo");
        assert_eq!(
            Naming::dead_letter("dev-orders.fifo"),
            "dev-orders-dlq.fifo"
        );
        assert_eq!(Naming::dead_letter("dev-orders"), "dev-orders-dlq");
        assert_eq!(
            n.subscriber("billing", "order-events.fifo"),
            "dev-billing-order-events.fifo"
        );
        assert_eq!(Naming::default().subscriber("b", "t"), "b-t");
        assert!(check_queue_name(&"a".repeat(76)).is_ok());
        assert!(check_queue_name(&"a".repeat(77)).is_err());
        assert_eq!(sanitize_service("my app.exe"), "my-app-exe");
    }
}
