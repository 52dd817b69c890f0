//! Least privilege: the exact IAM policy a running service needs, generated from its
//! compiled routes.
//!
//! Each statement names its actions and the ARNs of exactly the resources involved:
//!
//! * `ConsumeQueues`: receive, delete, change visibility on the queues this service listens on;
//! * `DeadLetter`: send to, receive from and delete on their dead-letter queues (moving
//!   undecodable messages aside, redrive);
//! * `SendCommands`: send to the command queues of the binary;
//! * `PublishEvents`: publish to its topics;
//! * `Provision` (only in `create` mode): create and configure those queues, topics and
//!   subscriptions;
//! * `Encryption` (only with a KMS key): `kms:GenerateDataKey` and `kms:Decrypt` on the key;
//! * `Idempotency` (only with the DynamoDB idempotency store): item reads and conditional
//!   writes on its table, plus creating it and enabling its TTL in `create` mode.
//!
//! `sts:GetCallerIdentity` needs no permission.

use serde_json::{json, Value};

use crate::naming::Naming;
use crate::transport::Topology;

/// Where the resources live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IamScope {
    /// AWS partition (`aws`, `aws-cn`, `aws-us-gov`).
    pub partition: String,
    /// Region, e.g. `eu-west-1`.
    pub region: String,
    /// Account id.
    pub account: String,
    /// The KMS key ARN used for payload encryption, if any.
    pub kms_key: Option<String>,
    /// Include the provisioning permissions (`create` mode).
    pub provision: bool,
    /// The DynamoDB table of the idempotency store, if it is one.
    pub idempotency_table: Option<String>,
}

impl IamScope {
    /// A scope in the `aws` partition, with provisioning.
    pub fn new(region: impl Into<String>, account: impl Into<String>) -> Self {
        IamScope {
            partition: "aws".into(),
            region: region.into(),
            account: account.into(),
            kms_key: None,
            provision: true,
            idempotency_table: None,
        }
    }

    /// From `AWS_REGION` and `SOURCEFLOW_ACCOUNT_ID`, with CloudFormation-style placeholders
    /// (`${AWS::Region}`, `${AWS::AccountId}`) for what is unset.
    pub fn from_env() -> Self {
        let get = |k: &str, default: &str| {
            std::env::var(k)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.to_string())
        };
        Self::new(
            get("AWS_REGION", "${AWS::Region}"),
            get("SOURCEFLOW_ACCOUNT_ID", "${AWS::AccountId}"),
        )
    }

    fn arn(&self, service: &str, name: &str) -> String {
        format!(
            "arn:{}:{service}:{}:{}:{name}",
            self.partition, self.region, self.account
        )
    }
}

/// The policy document for `topology`, where `consumed` are the queues the service listens
/// on.
pub fn policy(topology: &Topology, consumed: &[String], scope: &IamScope) -> Value {
    let sqs = |names: &mut Vec<String>| -> Vec<String> {
        names.sort();
        names.dedup();
        names.iter().map(|n| scope.arn("sqs", n)).collect()
    };
    let mut consumed_q: Vec<String> = consumed.to_vec();
    let mut dlqs: Vec<String> = consumed.iter().map(|q| Naming::dead_letter(q)).collect();
    let dlq_set: std::collections::HashSet<String> = topology
        .queues
        .iter()
        .filter_map(|q| q.dead_letter.as_ref().map(|d| d.queue.clone()))
        .collect();
    let subscriber_queues: std::collections::HashSet<&str> = topology
        .subscriptions
        .iter()
        .map(|s| s.queue.as_str())
        .collect();
    let mut command_queues: Vec<String> = topology
        .queues
        .iter()
        .filter(|q| !dlq_set.contains(&q.name) && !subscriber_queues.contains(q.name.as_str()))
        .map(|q| q.name.clone())
        .collect();
    let mut topics: Vec<String> = topology.topics.iter().map(|t| t.name.clone()).collect();
    topics.sort();
    let topic_arns: Vec<String> = topics.iter().map(|t| scope.arn("sns", t)).collect();

    let mut statements = Vec::new();
    if !consumed_q.is_empty() {
        statements.push(json!({
            "Sid": "ConsumeQueues",
            "Effect": "Allow",
            "Action": ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility",
                       "sqs:GetQueueAttributes", "sqs:GetQueueUrl"],
            "Resource": sqs(&mut consumed_q),
        }));
        statements.push(json!({
            "Sid": "DeadLetter",
            "Effect": "Allow",
            "Action": ["sqs:SendMessage", "sqs:ReceiveMessage", "sqs:DeleteMessage",
                       "sqs:GetQueueAttributes", "sqs:GetQueueUrl"],
            "Resource": sqs(&mut dlqs),
        }));
    }
    if !command_queues.is_empty() {
        statements.push(json!({
            "Sid": "SendCommands",
            "Effect": "Allow",
            "Action": ["sqs:SendMessage", "sqs:GetQueueUrl", "sqs:GetQueueAttributes"],
            "Resource": sqs(&mut command_queues),
        }));
    }
    if !topic_arns.is_empty() {
        statements.push(json!({
            "Sid": "PublishEvents",
            "Effect": "Allow",
            "Action": ["sns:Publish", "sns:GetTopicAttributes"],
            "Resource": topic_arns,
        }));
    }
    if scope.provision {
        let mut all_queues: Vec<String> = topology.queues.iter().map(|q| q.name.clone()).collect();
        let resources = sqs(&mut all_queues);
        if !resources.is_empty() {
            statements.push(json!({
                "Sid": "ProvisionQueues",
                "Effect": "Allow",
                "Action": ["sqs:CreateQueue", "sqs:GetQueueAttributes", "sqs:SetQueueAttributes",
                           "sqs:GetQueueUrl"],
                "Resource": resources,
            }));
        }
        if !topics.is_empty() {
            statements.push(json!({
                "Sid": "ProvisionTopics",
                "Effect": "Allow",
                "Action": ["sns:CreateTopic", "sns:GetTopicAttributes", "sns:Subscribe",
                           "sns:ListSubscriptionsByTopic", "sns:SetSubscriptionAttributes",
                           "sns:GetSubscriptionAttributes"],
                "Resource": topics.iter().map(|t| scope.arn("sns", t)).collect::<Vec<_>>(),
            }));
        }
    }
    if let Some(key) = &scope.kms_key {
        statements.push(json!({
            "Sid": "Encryption",
            "Effect": "Allow",
            "Action": ["kms:GenerateDataKey", "kms:Decrypt"],
            "Resource": [key],
        }));
    }
    if let Some(table) = &scope.idempotency_table {
        let mut actions = vec![
            "dynamodb:GetItem",
            "dynamodb:PutItem",
            "dynamodb:UpdateItem",
            "dynamodb:DeleteItem",
            "dynamodb:DescribeTable",
        ];
        if scope.provision {
            actions.extend([
                "dynamodb:CreateTable",
                "dynamodb:DescribeTimeToLive",
                "dynamodb:UpdateTimeToLive",
            ]);
        }
        statements.push(json!({
            "Sid": "Idempotency",
            "Effect": "Allow",
            "Action": actions,
            "Resource": [scope.arn("dynamodb", &format!("table/{table}"))],
        }));
    }
    json!({ "Version": "2012-10-17", "Statement": statements })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{DeadLetterSpec, QueueSpec, SubscriptionSpec, TopicSpec};
    use std::time::Duration;

    #[test]
    fn names_exactly_the_resources() {
        let q = |name: &str, dlq: Option<&str>| QueueSpec {
            name: name.into(),
            fifo: name.ends_with(".fifo"),
            visibility_timeout: Duration::from_secs(30),
            dead_letter: dlq.map(|d| DeadLetterSpec {
                queue: d.into(),
                max_receive_count: 5,
            }),
        };
        let topology = Topology {
            queues: vec![
                q("orders-dlq.fifo", None),
                q("orders.fifo", Some("orders-dlq.fifo")),
                q("payments-dlq", None),
                q("payments", Some("payments-dlq")),
                q("svc-order-events-dlq", None),
                q("svc-order-events", Some("svc-order-events-dlq")),
            ],
            topics: vec![TopicSpec {
                name: "order-events".into(),
                fifo: false,
            }],
            subscriptions: vec![SubscriptionSpec {
                topic: "order-events".into(),
                queue: "svc-order-events".into(),
                message_types: vec![],
            }],
        };
        let mut scope = IamScope::new("eu-west-1", "123456789012");
        scope.kms_key = Some("arn:aws:kms:eu-west-1:123456789012:key/k".into());
        let p = policy(
            &topology,
            &["orders.fifo".into(), "svc-order-events".into()],
            &scope,
        );
        let st = |sid: &str| {
            p["Statement"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["Sid"] == sid)
                .cloned()
                .unwrap()
        };
        assert_eq!(
            st("ConsumeQueues")["Resource"],
            json!([
                "arn:aws:sqs:eu-west-1:123456789012:orders.fifo",
                "arn:aws:sqs:eu-west-1:123456789012:svc-order-events"
            ])
        );
        assert_eq!(
            st("SendCommands")["Resource"],
            json!([
                "arn:aws:sqs:eu-west-1:123456789012:orders.fifo",
                "arn:aws:sqs:eu-west-1:123456789012:payments"
            ])
        );
        assert_eq!(
            st("PublishEvents")["Resource"],
            json!(["arn:aws:sns:eu-west-1:123456789012:order-events"])
        );
        assert_eq!(
            st("Encryption")["Action"],
            json!(["kms:GenerateDataKey", "kms:Decrypt"])
        );
        assert!(!p.to_string().contains("\"*\""), "no wildcard resources");
        assert!(
            p["Statement"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s["Sid"] != "Idempotency"),
            "no DynamoDB statement without the DynamoDB store"
        );

        scope.idempotency_table = Some("orders-idempotency".into());
        scope.provision = false;
        let p = policy(&topology, &["orders.fifo".into()], &scope);
        let idem = p["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["Sid"] == "Idempotency")
            .cloned()
            .unwrap();
        assert_eq!(
            idem["Resource"],
            json!(["arn:aws:dynamodb:eu-west-1:123456789012:table/orders-idempotency"])
        );
        assert_eq!(
            idem["Action"],
            json!([
                "dynamodb:GetItem",
                "dynamodb:PutItem",
                "dynamodb:UpdateItem",
                "dynamodb:DeleteItem",
                "dynamodb:DescribeTable"
            ]),
            "no table creation outside create mode"
        );
    }
}
