//! Descriptions of a service for other tools, made from its [`ServicePlan`] — the same
//! model the bootstrapper provisions, validates and checks health with — without
//! contacting anything:
//!
//! * [`cloudformation`]: a CloudFormation template of the queues, dead-letter queues,
//!   topics, subscriptions, queue policies and the service's IAM managed policy, under
//!   the names the service uses at run time, so that a service started with
//!   `SOURCEFLOW_PROVISION=validate` (or `assume`) accepts the stack as it is;
//! * [`asyncapi`]: an AsyncAPI 3.0.0 document of the channels (queues and topics), the
//!   messages (wire names, with the JSON Schema of their payloads where the type derives
//!   [`schemars::JsonSchema`]) and the operations each route performs.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> sourceflow::Result<()> {
//! let plan = sourceflow::builder().service("orders").plan().await?;
//! let template = sourceflow::export::cloudformation(
//!     &plan,
//!     &sourceflow::export::CloudFormationOptions::default(),
//! );
//! assert_eq!(template["AWSTemplateFormatVersion"], "2010-09-09");
//! let doc = sourceflow::export::asyncapi(&plan);
//! assert_eq!(doc["asyncapi"], "3.0.0");
//! # Ok(())
//! # }
//! ```
//!
//! [`ServicePlan`]: crate::ServicePlan

mod asyncapi;
mod cloudformation;

pub use self::asyncapi::asyncapi;
pub use self::cloudformation::{cloudformation, CloudFormationOptions, LambdaMapping};

use std::collections::{BTreeMap, BTreeSet};

/// Unique, readable identifiers made from resource names: `orders-dlq.fifo` with prefix
/// `Queue` becomes `QueueOrdersDlqFifo` (CloudFormation logical ids are alphanumeric);
/// a name that would collide with another gets a number.
#[derive(Debug, Default)]
struct Ids {
    by_name: BTreeMap<(String, String), String>,
    taken: BTreeSet<String>,
}

impl Ids {
    fn get(&mut self, prefix: &str, name: &str) -> String {
        let key = (prefix.to_string(), name.to_string());
        if let Some(id) = self.by_name.get(&key) {
            return id.clone();
        }
        let mut base = prefix.to_string();
        for part in name.split(|c: char| !c.is_ascii_alphanumeric()) {
            let mut chars = part.chars();
            if let Some(first) = chars.next() {
                base.push(first.to_ascii_uppercase());
                base.extend(chars);
            }
        }
        let mut id = base.clone();
        let mut n = 2;
        while self.taken.contains(&id) {
            id = format!("{base}{n}");
            n += 1;
        }
        self.taken.insert(id.clone());
        self.by_name.insert(key, id.clone());
        id
    }
}

#[cfg(test)]
mod tests {
    use super::Ids;

    #[test]
    fn ids_are_alphanumeric_stable_and_unique() {
        let mut ids = Ids::default();
        assert_eq!(ids.get("Queue", "orders-dlq.fifo"), "QueueOrdersDlqFifo");
        assert_eq!(ids.get("Queue", "orders-dlq.fifo"), "QueueOrdersDlqFifo");
        assert_eq!(ids.get("Queue", "a-b"), "QueueAB");
        assert_eq!(
            ids.get("Queue", "a_b"),
            "QueueAB2",
            "a collision gets a number"
        );
        assert_eq!(ids.get("Topic", "a-b"), "TopicAB");
    }
}
