//! Least privilege: the exact IAM policy a service needs, generated from its topology (the
//! same model provisioning, validation and the exports use).
//!
//! Each statement names the actions the code calls and the ARNs of exactly the resources
//! involved — no wildcard resource, except where AWS offers none (see below):
//!
//! * `ConsumeQueues`: receive, delete, change visibility and read the depth of the queues
//!   the service consumes, and send to them (a redrive moves dead letters back);
//! * `DeadLetter`: send to (dead-lettering), receive from and delete on (redrive) their
//!   dead-letter queues, and read their depth;
//! * `SendCommands`: send to the other command queues of the binary;
//! * `PublishEvents`: publish to its topics (and read a topic's attributes, for health);
//! * `ProvisionQueues`, `ProvisionTopics` (`create` mode): create and correct the queues
//!   it owns and the subscriptions of its queues; create the queues it sends to when they
//!   are missing, never change them (`sqs:TagQueue` only where routes declare tags);
//! * `Inspect` (`validate` mode): read the same, change nothing; finding stale
//!   subscriptions needs `sns:ListSubscriptions`, which AWS only grants on `*`;
//! * `CheckQueues`, `CheckSubscriptions` (`assume` mode): what health looks up that the
//!   statements above do not cover (the dead-letter queues of queues it only sends to;
//!   `ListSubscriptionsByTopic`);
//! * `Encryption` (a KMS key for payloads, by ARN, key id or alias): `kms:GenerateDataKey`,
//!   `kms:Decrypt`, and `kms:DescribeKey` (checked at startup and by health);
//! * `QueueKeys` (queues declared with `sse = "kms:..."`): what SQS needs of their keys to
//!   send to (`GenerateDataKey`, `Decrypt`) and receive from (`Decrypt`) them; a key given
//!   by alias is matched with the `kms:ResourceAliases` condition, as AWS recommends;
//! * `Idempotency` (the DynamoDB store): item reads and conditional writes on its table,
//!   plus creating it and enabling its TTL in `create` mode;
//! * `ClaimCheckObjects` (the claim check's bucket, [`crate::claim_check`]):
//!   `s3:PutObject` and `s3:GetObject` on exactly `arn:aws:s3:::{bucket}/{prefix}/*`;
//!   `ClaimCheckBucket`: `s3:ListBucket` on the bucket, without which S3 answers a read of
//!   a missing object with `AccessDenied` instead of `NoSuchKey` (the message would be
//!   retried instead of dead-lettered), plus in `create` mode `s3:CreateBucket` and
//!   `s3:GetLifecycleConfiguration`/`s3:PutLifecycleConfiguration`, in `validate` mode
//!   `s3:GetLifecycleConfiguration`. No `s3:DeleteObject`: nothing deletes payloads but the
//!   lifecycle rule;
//! * `LambdaEventSource` (on AWS Lambda, [`IamScope::lambda`]): what the SQS event source
//!   mappings call with the function's role on the consumed queues.
//!
//! `sts:GetCallerIdentity` needs no permission. `prune` and the dead-letter commands of the
//! operator command line are an operator's actions, not the service's: their permissions
//! are not in the service's policy.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::topology::{Ownership, ServerSideEncryption, Topology};

/// What the service's provisioning mode calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provisioning {
    /// `create`: creates what is missing and corrects what it owns.
    Create,
    /// `validate`: reads and compares, changes nothing.
    Validate,
    /// `assume`: no provisioning calls.
    Assume,
}

/// Where the resources live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IamScope {
    /// AWS partition (`aws`, `aws-cn`, `aws-us-gov`).
    pub partition: String,
    /// Region, e.g. `eu-west-1`.
    pub region: String,
    /// Account id.
    pub account: String,
    /// The KMS key of payload encryption (ARN, key id or `alias/...`), if any.
    pub kms_key: Option<String>,
    /// The provisioning mode's permissions to include.
    pub provisioning: Provisioning,
    /// The DynamoDB table of the idempotency store, if it is one.
    pub idempotency_table: Option<String>,
    /// The service runs on AWS Lambda behind SQS event source mappings
    /// (`sourceflow::lambda`): the role also names what a mapping calls with it.
    pub lambda: bool,
}

impl IamScope {
    /// A scope in the `aws` partition, with `create`-mode provisioning.
    pub fn new(region: impl Into<String>, account: impl Into<String>) -> Self {
        IamScope {
            partition: "aws".into(),
            region: region.into(),
            account: account.into(),
            kms_key: None,
            provisioning: Provisioning::Create,
            idempotency_table: None,
            lambda: false,
        }
    }

    /// From `AWS_REGION`, `SOURCEFLOW_ACCOUNT_ID` and `SOURCEFLOW_PROVISION`, with
    /// CloudFormation-style placeholders (`${AWS::Region}`, `${AWS::AccountId}`) for what
    /// is unset.
    pub fn from_env() -> Self {
        let get = |k: &str, default: &str| {
            std::env::var(k)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.to_string())
        };
        let mut scope = Self::new(
            get("AWS_REGION", "${AWS::Region}"),
            get("SOURCEFLOW_ACCOUNT_ID", "${AWS::AccountId}"),
        );
        scope.provisioning = match get("SOURCEFLOW_PROVISION", "create").as_str() {
            "validate" => Provisioning::Validate,
            "assume" => Provisioning::Assume,
            _ => Provisioning::Create,
        };
        scope
    }

    /// The ARN of resource `name` of `service` (`sqs`, `sns`, `kms`, `dynamodb`).
    pub fn arn(&self, service: &str, name: &str) -> String {
        format!(
            "arn:{}:{service}:{}:{}:{name}",
            self.partition, self.region, self.account
        )
    }
}

/// The queues of a topology by role.
struct Roles {
    consumed: BTreeSet<String>,
    dead_letters: BTreeSet<String>,
    send_to: BTreeSet<String>,
    owned: BTreeSet<String>,
    send_only: BTreeSet<String>,
    tagged: BTreeSet<String>,
}

fn roles(topology: &Topology) -> Roles {
    let subscriber: BTreeSet<&str> = topology
        .subscriptions
        .iter()
        .map(|s| s.queue.as_str())
        .collect();
    let mut r = Roles {
        consumed: BTreeSet::new(),
        dead_letters: BTreeSet::new(),
        send_to: BTreeSet::new(),
        owned: BTreeSet::new(),
        send_only: BTreeSet::new(),
        tagged: BTreeSet::new(),
    };
    for q in &topology.queues {
        match q.ownership {
            Ownership::Consumed => r.owned.insert(q.name.clone()),
            Ownership::SendOnly => r.send_only.insert(q.name.clone()),
        };
        if !q.settings.tags.is_empty() {
            r.tagged.insert(q.name.clone());
        }
        let Some(d) = &q.dead_letter else { continue };
        if q.ownership == Ownership::Consumed {
            r.consumed.insert(q.name.clone());
            r.dead_letters.insert(d.queue.clone());
        }
        if !subscriber.contains(q.name.as_str()) {
            r.send_to.insert(q.name.clone());
        }
    }
    r
}

/// The policy document for `topology` in `scope`.
pub fn policy(topology: &Topology, scope: &IamScope) -> Value {
    let r = roles(topology);
    let sqs = |names: &BTreeSet<String>| -> Vec<String> {
        names.iter().map(|n| scope.arn("sqs", n)).collect()
    };
    let topics: Vec<String> = topology
        .topics
        .iter()
        .map(|t| scope.arn("sns", &t.name))
        .collect();
    let mut st = Vec::new();
    let mut add = |sid: &str, actions: &[&str], resources: Vec<String>| {
        if !resources.is_empty() {
            st.push(
                json!({"Sid": sid, "Effect": "Allow", "Action": actions, "Resource": resources}),
            );
        }
    };
    add(
        "ConsumeQueues",
        &[
            "sqs:ReceiveMessage",
            "sqs:DeleteMessage",
            "sqs:ChangeMessageVisibility",
            "sqs:GetQueueAttributes",
            "sqs:GetQueueUrl",
            "sqs:SendMessage",
        ],
        sqs(&r.consumed),
    );
    if scope.lambda {
        // What an SQS event source mapping calls with the function's execution role (the
        // actions AWS documents for it), named on their own: ConsumeQueues covers them
        // today, and a mapping must not break if that statement changes.
        add(
            "LambdaEventSource",
            &[
                "sqs:ReceiveMessage",
                "sqs:DeleteMessage",
                "sqs:GetQueueAttributes",
            ],
            sqs(&r.consumed),
        );
    }
    add(
        "DeadLetter",
        &[
            "sqs:SendMessage",
            "sqs:ReceiveMessage",
            "sqs:DeleteMessage",
            "sqs:GetQueueAttributes",
            "sqs:GetQueueUrl",
        ],
        sqs(&r.dead_letters),
    );
    let others: BTreeSet<String> = r.send_to.difference(&r.consumed).cloned().collect();
    add(
        "SendCommands",
        &["sqs:SendMessage", "sqs:GetQueueUrl"],
        sqs(&others),
    );
    add(
        "PublishEvents",
        &["sns:Publish", "sns:GetTopicAttributes"],
        topics.clone(),
    );
    provisioning(&mut add, topology, scope, &r, &sqs);
    st.extend(keys(topology, scope, &r));
    if let Some(table) = &scope.idempotency_table {
        st.push(idempotency(scope, table));
    }
    if let Some(bucket) = &topology.bucket {
        st.extend(claim_check(scope, bucket));
    }
    json!({ "Version": "2012-10-17", "Statement": st })
}

fn provisioning(
    add: &mut impl FnMut(&str, &[&str], Vec<String>),
    topology: &Topology,
    scope: &IamScope,
    r: &Roles,
    sqs: &dyn Fn(&BTreeSet<String>) -> Vec<String>,
) {
    let subscribed: BTreeSet<String> = topology
        .subscriptions
        .iter()
        .map(|s| s.topic.clone())
        .collect();
    let topic_arns = |names: &BTreeSet<String>| -> Vec<String> {
        names.iter().map(|t| scope.arn("sns", t)).collect()
    };
    let all_topics: BTreeSet<String> = topology.topics.iter().map(|t| t.name.clone()).collect();
    let tagged_owned: BTreeSet<String> = r.owned.intersection(&r.tagged).cloned().collect();
    let tagged_send: BTreeSet<String> = r.send_only.intersection(&r.tagged).cloned().collect();
    match scope.provisioning {
        Provisioning::Assume => {
            // Health looks every resource up (the other modes' statements cover these):
            // the dead-letter queues of queues it only sends to, and its subscriptions.
            let unlisted: BTreeSet<String> = r.send_only.difference(&r.send_to).cloned().collect();
            add("CheckQueues", &["sqs:GetQueueUrl"], sqs(&unlisted));
            add(
                "CheckSubscriptions",
                &["sns:ListSubscriptionsByTopic"],
                topic_arns(&subscribed),
            );
        }
        Provisioning::Create => {
            add(
                "ProvisionQueues",
                &[
                    "sqs:CreateQueue",
                    "sqs:GetQueueAttributes",
                    "sqs:SetQueueAttributes",
                    "sqs:GetQueueUrl",
                ],
                sqs(&r.owned),
            );
            add(
                "TagQueues",
                &["sqs:TagQueue", "sqs:ListQueueTags"],
                sqs(&tagged_owned),
            );
            add(
                "CreateMissingQueues",
                &["sqs:CreateQueue", "sqs:GetQueueUrl"],
                sqs(&r.send_only),
            );
            add("TagCreatedQueues", &["sqs:TagQueue"], sqs(&tagged_send));
            add(
                "ProvisionTopics",
                &["sns:CreateTopic"],
                topic_arns(&all_topics),
            );
            add(
                "ProvisionSubscriptions",
                &[
                    "sns:Subscribe",
                    "sns:ListSubscriptionsByTopic",
                    "sns:GetSubscriptionAttributes",
                    "sns:SetSubscriptionAttributes",
                ],
                topic_arns(&subscribed),
            );
        }
        Provisioning::Validate => {
            let all: BTreeSet<String> = r.owned.union(&r.send_only).cloned().collect();
            add(
                "InspectQueues",
                &["sqs:GetQueueAttributes", "sqs:GetQueueUrl"],
                sqs(&all),
            );
            add("InspectTags", &["sqs:ListQueueTags"], sqs(&tagged_owned));
            add(
                "InspectSubscriptions",
                &[
                    "sns:ListSubscriptionsByTopic",
                    "sns:GetSubscriptionAttributes",
                ],
                topic_arns(&subscribed),
            );
            // ListSubscriptions has no resource-level permissions: `*` is the only form.
            add(
                "FindStaleSubscriptions",
                &["sns:ListSubscriptions"],
                vec!["*".into()],
            );
        }
    }
}

/// The payload key and the keys of SSE-KMS queues.
fn keys(topology: &Topology, scope: &IamScope, r: &Roles) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(key) = &scope.kms_key {
        let mut statement = json!({
            "Sid": "Encryption",
            "Effect": "Allow",
            "Action": ["kms:GenerateDataKey", "kms:Decrypt", "kms:DescribeKey"],
        });
        key_resource(&mut statement, key, scope);
        out.push(statement);
    }
    // Sending needs GenerateDataKey and Decrypt; receiving, Decrypt. Every queue of the
    // topology is sent to (commands, dead letters, redrives), so both.
    let mut by_key: std::collections::BTreeMap<String, bool> = Default::default();
    for q in &topology.queues {
        if let ServerSideEncryption::Kms(key) = &q.settings.encryption {
            let sends = r.send_to.contains(&q.name)
                || r.dead_letters.contains(&q.name)
                || r.consumed.contains(&q.name);
            *by_key.entry(key.clone()).or_default() |= sends;
        }
    }
    for (i, (key, sends)) in by_key.into_iter().enumerate() {
        let actions: Vec<&str> = match sends {
            true => vec!["kms:GenerateDataKey", "kms:Decrypt"],
            false => vec!["kms:Decrypt"],
        };
        let mut statement = json!({
            "Sid": format!("QueueKey{i}"),
            "Effect": "Allow",
            "Action": actions,
        });
        key_resource(&mut statement, &key, scope);
        out.push(statement);
    }
    out
}

/// The `Resource` (and, for an alias, the `Condition`) naming a KMS key given as an ARN,
/// a key id or `alias/...`. IAM authorizes a call made with an alias on the key it points
/// to, so an alias is matched with `kms:ResourceAliases`, as AWS recommends.
fn key_resource(statement: &mut Value, key: &str, scope: &IamScope) {
    match key.strip_prefix("alias/") {
        Some(_) => {
            statement["Resource"] = json!([scope.arn("kms", "key/*")]);
            statement["Condition"] =
                json!({"ForAnyValue:StringEquals": {"kms:ResourceAliases": [key]}});
        }
        None if key.starts_with("arn:") => statement["Resource"] = json!([key]),
        None => statement["Resource"] = json!([scope.arn("kms", &format!("key/{key}"))]),
    }
}

/// The claim check's objects (exact prefix) and bucket.
fn claim_check(scope: &IamScope, bucket: &crate::topology::BucketSpec) -> Vec<Value> {
    let s3 = |resource: &str| format!("arn:{}:s3:::{resource}", scope.partition);
    let mut actions = vec!["s3:ListBucket"];
    match scope.provisioning {
        Provisioning::Create => actions.extend([
            "s3:CreateBucket",
            "s3:GetLifecycleConfiguration",
            "s3:PutLifecycleConfiguration",
        ]),
        Provisioning::Validate => actions.push("s3:GetLifecycleConfiguration"),
        Provisioning::Assume => {}
    }
    vec![
        json!({
            "Sid": "ClaimCheckObjects",
            "Effect": "Allow",
            "Action": ["s3:PutObject", "s3:GetObject"],
            "Resource": [s3(&format!("{}/{}/*", bucket.name, bucket.prefix))],
        }),
        json!({
            "Sid": "ClaimCheckBucket",
            "Effect": "Allow",
            "Action": actions,
            "Resource": [s3(&bucket.name)],
        }),
    ]
}

fn idempotency(scope: &IamScope, table: &str) -> Value {
    let mut actions = vec![
        "dynamodb:GetItem",
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
        "dynamodb:DeleteItem",
        "dynamodb:DescribeTable",
    ];
    match scope.provisioning {
        Provisioning::Create => actions.extend([
            "dynamodb:CreateTable",
            "dynamodb:DescribeTimeToLive",
            "dynamodb:UpdateTimeToLive",
        ]),
        Provisioning::Validate => actions.push("dynamodb:DescribeTimeToLive"),
        Provisioning::Assume => {}
    }
    json!({
        "Sid": "Idempotency",
        "Effect": "Allow",
        "Action": actions,
        "Resource": [scope.arn("dynamodb", &format!("table/{table}"))],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{QueueSpec, SubscriptionSpec, TopicSpec};

    fn topology() -> Topology {
        Topology {
            queues: vec![
                QueueSpec::new("orders-dlq.fifo"),
                QueueSpec::new("orders.fifo").with_dead_letter("orders-dlq.fifo", 100),
                QueueSpec::new("payments-dlq").owned_as(Ownership::SendOnly),
                QueueSpec::new("payments")
                    .owned_as(Ownership::SendOnly)
                    .with_dead_letter("payments-dlq", 100),
                QueueSpec::new("svc-order-events-dlq"),
                QueueSpec::new("svc-order-events").with_dead_letter("svc-order-events-dlq", 100),
            ],
            topics: vec![TopicSpec::new("order-events")],
            subscriptions: vec![SubscriptionSpec::new("order-events", "svc-order-events")],
            subscriber_prefix: None,
            bucket: None,
        }
    }

    fn statement(p: &Value, sid: &str) -> Value {
        p["Statement"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["Sid"] == sid))
            .cloned()
            .unwrap_or(Value::Null)
    }

    #[test]
    fn the_claim_check_grants_its_exact_prefix_and_no_delete() {
        let mut t = topology();
        t.bucket = Some(crate::topology::BucketSpec {
            name: "acme-claims".into(),
            prefix: "prod-claims".into(),
            expiration_days: 15,
        });
        let scope = IamScope::new("eu-west-1", "123456789012");
        let p = policy(&t, &scope);
        assert_eq!(
            statement(&p, "ClaimCheckObjects")["Resource"],
            json!(["arn:aws:s3:::acme-claims/prod-claims/*"])
        );
        assert_eq!(
            statement(&p, "ClaimCheckObjects")["Action"],
            json!(["s3:PutObject", "s3:GetObject"])
        );
        assert_eq!(
            statement(&p, "ClaimCheckBucket")["Action"],
            json!([
                "s3:ListBucket",
                "s3:CreateBucket",
                "s3:GetLifecycleConfiguration",
                "s3:PutLifecycleConfiguration"
            ])
        );
        assert_eq!(
            statement(&p, "ClaimCheckBucket")["Resource"],
            json!(["arn:aws:s3:::acme-claims"])
        );
        assert!(!p.to_string().contains("DeleteObject"));
        let mut assume = scope.clone();
        assume.provisioning = Provisioning::Assume;
        let p = policy(&t, &assume);
        assert_eq!(
            statement(&p, "ClaimCheckBucket")["Action"],
            json!(["s3:ListBucket"])
        );
        assert_eq!(
            statement(&policy(&topology(), &scope), "ClaimCheckObjects"),
            Value::Null
        );
    }

    #[test]
    fn names_exactly_the_resources_by_ownership() {
        let mut scope = IamScope::new("eu-west-1", "123456789012");
        scope.kms_key = Some("arn:aws:kms:eu-west-1:123456789012:key/k".into());
        let p = policy(&topology(), &scope);
        let arn = |n: &str| format!("arn:aws:sqs:eu-west-1:123456789012:{n}");
        assert_eq!(
            statement(&p, "ConsumeQueues")["Resource"],
            json!([arn("orders.fifo"), arn("svc-order-events")])
        );
        assert_eq!(
            statement(&p, "DeadLetter")["Resource"],
            json!([arn("orders-dlq.fifo"), arn("svc-order-events-dlq")])
        );
        assert_eq!(
            statement(&p, "SendCommands")["Resource"],
            json!([arn("payments")])
        );
        assert_eq!(
            statement(&p, "SendCommands")["Action"],
            json!(["sqs:SendMessage", "sqs:GetQueueUrl"]),
            "nothing a sender never calls"
        );
        assert_eq!(
            statement(&p, "CreateMissingQueues")["Resource"],
            json!([arn("payments"), arn("payments-dlq")]),
            "a queue it only sends to is created when missing, never corrected"
        );
        assert!(!statement(&p, "ProvisionQueues")["Resource"]
            .to_string()
            .contains("payments"));
        assert_eq!(
            statement(&p, "Encryption")["Action"],
            json!(["kms:GenerateDataKey", "kms:Decrypt", "kms:DescribeKey"])
        );
        assert!(!p.to_string().contains("\"*\""), "no wildcard resources");
        assert_eq!(statement(&p, "Idempotency"), Value::Null);
        assert_eq!(
            statement(&p, "TagQueues"),
            Value::Null,
            "no tags, no tag permission"
        );
    }

    #[test]
    fn validate_mode_reads_and_changes_nothing() {
        let mut scope = IamScope::new("eu-west-1", "123456789012");
        scope.provisioning = Provisioning::Validate;
        scope.idempotency_table = Some("orders-idempotency".into());
        let p = policy(&topology(), &scope);
        let text = p.to_string();
        for write in [
            "CreateQueue",
            "SetQueueAttributes",
            "Subscribe\"",
            "CreateTopic",
            "CreateTable",
        ] {
            assert!(!text.contains(write), "{write} in a validate-mode policy");
        }
        assert_eq!(
            statement(&p, "FindStaleSubscriptions")["Resource"],
            json!(["*"])
        );
        assert_eq!(
            statement(&p, "Idempotency")["Resource"],
            json!(["arn:aws:dynamodb:eu-west-1:123456789012:table/orders-idempotency"])
        );
    }

    #[test]
    fn assume_mode_grants_what_health_looks_up() {
        let mut scope = IamScope::new("eu-west-1", "123456789012");
        scope.provisioning = Provisioning::Assume;
        let p = policy(&topology(), &scope);
        let arn = |n: &str| format!("arn:aws:sqs:eu-west-1:123456789012:{n}");
        assert_eq!(
            statement(&p, "CheckQueues")["Resource"],
            json!([arn("payments-dlq")]),
            "the dead-letter queue of a queue it sends to, looked up by health"
        );
        assert_eq!(
            statement(&p, "CheckSubscriptions")["Resource"],
            json!(["arn:aws:sns:eu-west-1:123456789012:order-events"])
        );
        assert!(
            !p.to_string().contains("Create"),
            "assume mode creates nothing"
        );
    }

    #[test]
    fn a_payload_key_by_alias_or_id() {
        let mut scope = IamScope::new("eu-west-1", "123456789012");
        scope.kms_key = Some("alias/orders".into());
        let p = policy(&topology(), &scope);
        let st = statement(&p, "Encryption");
        assert_eq!(
            st["Resource"],
            json!(["arn:aws:kms:eu-west-1:123456789012:key/*"])
        );
        assert_eq!(
            st["Condition"]["ForAnyValue:StringEquals"]["kms:ResourceAliases"],
            json!(["alias/orders"])
        );
        scope.kms_key = Some("1234-abcd".into());
        let p = policy(&topology(), &scope);
        assert_eq!(
            statement(&p, "Encryption")["Resource"],
            json!(["arn:aws:kms:eu-west-1:123456789012:key/1234-abcd"])
        );
    }

    #[test]
    fn keys_of_sse_kms_queues() {
        let mut t = topology();
        t.queues[1].settings.encryption = ServerSideEncryption::Kms("alias/orders".into());
        t.queues[3].settings.encryption = ServerSideEncryption::Kms("1234-abcd".into());
        let p = policy(&t, &IamScope::new("eu-west-1", "123456789012"));
        let alias = statement(&p, "QueueKey1");
        assert_eq!(
            alias["Condition"]["ForAnyValue:StringEquals"]["kms:ResourceAliases"],
            json!(["alias/orders"])
        );
        assert_eq!(
            statement(&p, "QueueKey0")["Resource"],
            json!(["arn:aws:kms:eu-west-1:123456789012:key/1234-abcd"])
        );
    }
}
