//! The CloudFormation template of a service's topology.

use serde_json::{json, Map, Value};

use super::Ids;
use crate::iam::{IamScope, Provisioning};
use crate::runtime::ServicePlan;
use crate::topology::{QueueSpec, ServerSideEncryption};
use crate::transport::MAX_VISIBILITY;

/// The key attribute of the DynamoDB idempotency table (the store's `KEY_ATTRIBUTE`).
const IDEMPOTENCY_KEY: &str = "id";
/// Its TTL attribute (the store's `TTL_ATTRIBUTE`).
const IDEMPOTENCY_TTL: &str = "expiration";

/// What the template's IAM managed policy covers besides the topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudFormationOptions {
    /// The provisioning mode the service will run with once the stack exists: its calls
    /// are what the managed policy grants. [`Provisioning::Validate`] by default (the
    /// stack creates everything; the service checks it at startup).
    pub provisioning: Provisioning,
    /// The KMS key of payload encryption (ARN, key id or `alias/...`), if any.
    pub kms_key: Option<String>,
    /// The DynamoDB table of the idempotency store, if it is one: the template creates it
    /// as the store's `create` mode would (string key `id`, on-demand, TTL on
    /// `expiration`; retained when the stack goes) and the policy names it.
    pub idempotency_table: Option<String>,
    /// The Lambda function that consumes the service's queues (`sourceflow::lambda`), if
    /// it runs there: the template gets one event source mapping per consumed queue.
    pub lambda: Option<LambdaMapping>,
}

impl Default for CloudFormationOptions {
    fn default() -> Self {
        CloudFormationOptions {
            provisioning: Provisioning::Validate,
            kms_key: None,
            idempotency_table: None,
            lambda: None,
        }
    }
}

/// The event source mappings of a function that runs the service's handlers
/// (`sourceflow::lambda`): one `AWS::Lambda::EventSourceMapping` per consumed queue, with
/// `FunctionResponseTypes: [ReportBatchItemFailures]` (the function reports failed records
/// only; without it a single failure would bring the whole batch back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LambdaMapping {
    /// The function's name or ARN (`FunctionName` of each mapping).
    pub function: String,
    /// The function's timeout: it must be below the visibility timeout of every queue it
    /// consumes, or a record still being handled becomes visible and is handled twice.
    pub timeout: std::time::Duration,
    /// Records per invocation (`BatchSize`): 1 to 10 on a FIFO queue, 1 to 10,000
    /// otherwise (above 10 with a batching window).
    pub batch_size: u32,
    /// `MaximumBatchingWindowInSeconds` (0 to 300): how long the mapping gathers records.
    pub batching_window: std::time::Duration,
    /// `ScalingConfig.MaximumConcurrency` (2 to 1,000): concurrent invocations per queue.
    pub maximum_concurrency: Option<u32>,
}

impl LambdaMapping {
    /// Mappings to `function` (name or ARN) whose timeout is `timeout`: batches of 10, no
    /// batching window, no concurrency limit.
    pub fn new(function: impl Into<String>, timeout: std::time::Duration) -> Self {
        LambdaMapping {
            function: function.into(),
            timeout,
            batch_size: 10,
            batching_window: std::time::Duration::ZERO,
            maximum_concurrency: None,
        }
    }

    /// Checks the mapping against the queues `plan`'s service consumes: the function's
    /// timeout below each visibility timeout, and the limits AWS sets on each setting.
    pub fn check(&self, plan: &ServicePlan) -> crate::Result<()> {
        let bad = |m: String| Err(crate::Error::Config(m));
        let window = self.batching_window.as_secs();
        if window > 300 {
            return bad(format!(
                "a Lambda batching window of {window} s is over the 300 s AWS allows"
            ));
        }
        if let Some(c) = self.maximum_concurrency.filter(|c| !(2..=1000).contains(c)) {
            return bad(format!(
                "a Lambda maximum concurrency of {c} is outside the 2 to 1000 AWS allows"
            ));
        }
        for l in &plan.listeners {
            let most = match (l.fifo, window) {
                (true, _) => 10,
                (false, 0) => 10,
                (false, _) => 10_000,
            };
            if !(1..=most).contains(&self.batch_size) {
                return bad(format!(
                    "a Lambda batch size of {} is outside the 1 to {most} AWS allows for queue `{}`{}",
                    self.batch_size,
                    l.queue,
                    if l.fifo || window > 0 { "" } else { " without a batching window" }
                ));
            }
            if self.timeout >= l.visibility_timeout {
                return bad(format!(
                    "the Lambda function's timeout ({} s) is not below the visibility timeout of queue `{}` ({} s): a record still being handled would be delivered again; raise the queue's visibility_timeout or lower the function's timeout",
                    self.timeout.as_secs_f64(),
                    l.queue,
                    l.visibility_timeout.as_secs_f64()
                ));
            }
        }
        Ok(())
    }

    /// The mapping of one queue.
    fn resource(&self, queue_id: &str, fifo: bool) -> Value {
        let mut p = json!({
            "EventSourceArn": {"Fn::GetAtt": [queue_id, "Arn"]},
            "FunctionName": self.function,
            "BatchSize": self.batch_size,
            "FunctionResponseTypes": ["ReportBatchItemFailures"],
            "Enabled": true,
        });
        if !fifo && !self.batching_window.is_zero() {
            p["MaximumBatchingWindowInSeconds"] = json!(self.batching_window.as_secs());
        }
        if let Some(c) = self.maximum_concurrency {
            p["ScalingConfig"] = json!({"MaximumConcurrency": c});
        }
        json!({"Type": "AWS::Lambda::EventSourceMapping", "Properties": p})
    }
}

impl CloudFormationOptions {
    /// From the environment the service will run with: `SOURCEFLOW_PROVISION` (default
    /// `validate`), `SOURCEFLOW_KMS_KEY_ID`, and `SOURCEFLOW_IDEMPOTENCY=dynamodb://<table>`.
    pub fn from_env() -> Self {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        CloudFormationOptions {
            provisioning: match get("SOURCEFLOW_PROVISION").as_deref() {
                Some("create") => Provisioning::Create,
                Some("assume") => Provisioning::Assume,
                _ => Provisioning::Validate,
            },
            kms_key: get("SOURCEFLOW_KMS_KEY_ID"),
            idempotency_table: get("SOURCEFLOW_IDEMPOTENCY")
                .and_then(|v| v.strip_prefix("dynamodb://").map(str::to_string)),
            lambda: None,
        }
    }
}

/// A CloudFormation template (JSON) of everything `plan`'s service needs, under the
/// physical names it uses at run time:
///
/// * `AWS::SQS::Queue` for every queue and dead-letter queue, with its settings (FIFO,
///   `ContentBasedDeduplication=false`, visibility timeout, retention, delay, FIFO high
///   throughput, server-side encryption, tags) and a `RedrivePolicy` to its dead-letter
///   queue (`Fn::GetAtt … Arn`) with the broker's safety-net receive count;
/// * `AWS::SNS::Topic` for every topic (FIFO topics without content-based deduplication);
/// * `AWS::SNS::Subscription` for every subscription: protocol `sqs`,
///   `RawMessageDelivery`, the `FilterPolicy` with `FilterPolicyScope=MessageAttributes`;
/// * `AWS::SQS::QueuePolicy` on every subscribed queue, the one statement the
///   provisioner writes: `sns.amazonaws.com` may `sqs:SendMessage` when `aws:SourceArn` is
///   one of its topics;
/// * `AWS::IAM::ManagedPolicy` with the service's policy (see [`crate::iam`]) for the
///   provisioning mode in `options`, to attach to the service's role;
/// * `AWS::DynamoDB::Table` for the DynamoDB idempotency store, when `options` names one;
/// * `AWS::S3::Bucket` for the claim check's bucket ([`crate::claim_check`]), with the
///   lifecycle rule `create` mode sets (expire the service's prefix after its days;
///   retained when the stack goes). A bucket shared by several services belongs in one
///   stack: take it out of the others.
/// * `AWS::Lambda::EventSourceMapping` for every consumed queue, when `options` names the
///   function that runs the handlers ([`LambdaMapping`]; check it with
///   [`LambdaMapping::check`] first, as `export cloudformation` does).
///
/// Outputs: each queue's URL, each topic's ARN and the managed policy's ARN. Region,
/// account and partition are the stack's (`${AWS::Region}`, …).
pub fn cloudformation(plan: &ServicePlan, options: &CloudFormationOptions) -> Value {
    let topology = &plan.topology;
    let mut ids = Ids::default();
    let mut resources = Map::new();
    let mut outputs = Map::new();
    for q in &topology.queues {
        let id = ids.get("Queue", &q.name);
        let properties = queue_properties(q, &mut ids);
        resources.insert(
            id.clone(),
            json!({"Type": "AWS::SQS::Queue", "Properties": properties}),
        );
        outputs.insert(
            format!("{id}Url"),
            json!({"Description": format!("URL of queue {}", q.name), "Value": {"Ref": id}}),
        );
    }
    for t in &topology.topics {
        let id = ids.get("Topic", &t.name);
        let mut properties = json!({"TopicName": t.name});
        if t.fifo {
            properties["FifoTopic"] = json!(true);
            properties["ContentBasedDeduplication"] = json!(false);
        }
        resources.insert(
            id.clone(),
            json!({"Type": "AWS::SNS::Topic", "Properties": properties}),
        );
        outputs.insert(
            format!("{id}Arn"),
            json!({"Description": format!("ARN of topic {}", t.name), "Value": {"Ref": id}}),
        );
    }
    for q in &topology.queues {
        let queue_id = ids.get("Queue", &q.name);
        let policy = topology.access_policy(
            &q.name,
            json!({"Fn::GetAtt": [queue_id, "Arn"]}),
            |t| json!({"Ref": ids.get("Topic", t)}),
        );
        let Some(policy) = policy else { continue };
        resources.insert(
            format!("{queue_id}Policy"),
            json!({
                "Type": "AWS::SQS::QueuePolicy",
                "Properties": {"Queues": [{"Ref": queue_id}], "PolicyDocument": policy},
            }),
        );
    }
    for s in &topology.subscriptions {
        let queue_id = ids.get("Queue", &s.queue);
        let topic_id = ids.get("Topic", &s.topic);
        let mut properties = json!({
            "TopicArn": {"Ref": topic_id},
            "Protocol": "sqs",
            "Endpoint": {"Fn::GetAtt": [queue_id, "Arn"]},
            "RawMessageDelivery": true,
        });
        if let Some(filter) = &s.filter {
            properties["FilterPolicy"] = filter.clone();
            properties["FilterPolicyScope"] = json!("MessageAttributes");
        }
        let id = format!("{}To{}", topic_id, queue_id.trim_start_matches("Queue"));
        let id = ids.get("Subscription", &id);
        resources.insert(
            id,
            json!({
                "Type": "AWS::SNS::Subscription",
                // The queue lets the topic send before messages can arrive.
                "DependsOn": [format!("{queue_id}Policy")],
                "Properties": properties,
            }),
        );
    }
    if let Some(table) = &options.idempotency_table {
        resources.insert(
            "IdempotencyTable".into(),
            json!({
                "Type": "AWS::DynamoDB::Table",
                // Claims and completions: keep them if the stack is deleted or replaced.
                "DeletionPolicy": "Retain",
                "UpdateReplacePolicy": "Retain",
                "Properties": {
                    "TableName": table,
                    "AttributeDefinitions": [{"AttributeName": IDEMPOTENCY_KEY, "AttributeType": "S"}],
                    "KeySchema": [{"AttributeName": IDEMPOTENCY_KEY, "KeyType": "HASH"}],
                    "BillingMode": "PAY_PER_REQUEST",
                    "TimeToLiveSpecification": {"AttributeName": IDEMPOTENCY_TTL, "Enabled": true},
                },
            }),
        );
        outputs.insert(
            "IdempotencyTableName".into(),
            json!({"Description": "The DynamoDB idempotency table", "Value": {"Ref": "IdempotencyTable"}}),
        );
    }
    if let Some(bucket) = &topology.bucket {
        resources.insert("ClaimCheckBucket".into(), bucket_resource(bucket));
        outputs.insert(
            "ClaimCheckBucketName".into(),
            json!({"Description": "The claim check's bucket (large payloads)", "Value": {"Ref": "ClaimCheckBucket"}}),
        );
    }
    if let Some(lambda) = &options.lambda {
        for l in &plan.listeners {
            let queue_id = ids.get("Queue", &l.queue);
            let id = ids.get("EventSourceMapping", &l.queue);
            resources.insert(id, lambda.resource(&queue_id, l.fifo));
        }
    }
    let mut scope = IamScope::new("${AWS::Region}", "${AWS::AccountId}");
    scope.lambda = options.lambda.is_some();
    scope.partition = "${AWS::Partition}".into();
    scope.provisioning = options.provisioning;
    scope.kms_key = options.kms_key.clone();
    scope.idempotency_table = options.idempotency_table.clone();
    let policy = substitute(crate::iam::policy(topology, &scope));
    resources.insert(
        "ServicePolicy".into(),
        json!({
            "Type": "AWS::IAM::ManagedPolicy",
            "Properties": {
                "Description": format!(
                    "What sourceflow service {} calls ({} mode)",
                    plan.service,
                    mode_name(options.provisioning)
                ),
                "PolicyDocument": policy,
            },
        }),
    );
    outputs.insert(
        "ServicePolicyArn".into(),
        json!({"Description": "ARN of the service's IAM managed policy (attach it to its role)", "Value": {"Ref": "ServicePolicy"}}),
    );
    json!({
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": format!(
            "SQS queues, SNS topics and subscriptions of sourceflow service {}{}, generated from its compiled routes",
            plan.service,
            match plan.naming.prefix() {
                "" => String::new(),
                p => format!(" (prefix {p})"),
            }
        ),
        "Resources": resources,
        "Outputs": outputs,
    })
}

/// The claim check's bucket with its lifecycle rule, private.
fn bucket_resource(bucket: &crate::topology::BucketSpec) -> Value {
    json!({
        "Type": "AWS::S3::Bucket",
        // Payloads of messages still queued: keep them if the stack is deleted or replaced.
        "DeletionPolicy": "Retain",
        "UpdateReplacePolicy": "Retain",
        "Properties": {
            "BucketName": bucket.name,
            "PublicAccessBlockConfiguration": {
                "BlockPublicAcls": true,
                "BlockPublicPolicy": true,
                "IgnorePublicAcls": true,
                "RestrictPublicBuckets": true,
            },
            "LifecycleConfiguration": {
                "Rules": [{
                    "Id": bucket.rule_id(),
                    "Status": "Enabled",
                    "Prefix": format!("{}/", bucket.prefix),
                    "ExpirationInDays": bucket.expiration_days,
                }],
            },
        },
    })
}

fn mode_name(p: Provisioning) -> &'static str {
    match p {
        Provisioning::Create => "create",
        Provisioning::Validate => "validate",
        Provisioning::Assume => "assume",
    }
}

/// A queue's properties: the attributes the provisioner sets and validate compares.
fn queue_properties(q: &QueueSpec, ids: &mut Ids) -> Value {
    let s = &q.settings;
    let visibility =
        s.visibility_timeout.as_secs() + u64::from(s.visibility_timeout.subsec_nanos() > 0);
    let mut p = json!({
        "QueueName": q.name,
        "VisibilityTimeout": visibility.min(MAX_VISIBILITY.as_secs()),
        "MessageRetentionPeriod": s.retention.as_secs(),
        "DelaySeconds": s.delay.as_secs(),
    });
    if q.fifo {
        p["FifoQueue"] = json!(true);
        p["ContentBasedDeduplication"] = json!(false);
        let (scope, limit) = match s.high_throughput {
            true => ("messageGroup", "perMessageGroupId"),
            false => ("queue", "perQueue"),
        };
        p["DeduplicationScope"] = json!(scope);
        p["FifoThroughputLimit"] = json!(limit);
    }
    match &s.encryption {
        ServerSideEncryption::SqsManaged => p["SqsManagedSseEnabled"] = json!(true),
        ServerSideEncryption::Kms(key) => p["KmsMasterKeyId"] = json!(key),
        ServerSideEncryption::Disabled => p["SqsManagedSseEnabled"] = json!(false),
    }
    if let Some(d) = &q.dead_letter {
        p["RedrivePolicy"] = json!({
            "deadLetterTargetArn": {"Fn::GetAtt": [ids.get("Queue", &d.queue), "Arn"]},
            "maxReceiveCount": d.max_receive_count,
        });
    }
    if !s.tags.is_empty() {
        p["Tags"] = s
            .tags
            .iter()
            .map(|(k, v)| json!({"Key": k, "Value": v}))
            .collect();
    }
    p
}

/// Every string naming a pseudo parameter (`${AWS::Region}`, …) becomes an `Fn::Sub`.
fn substitute(v: Value) -> Value {
    match v {
        Value::String(s) if s.contains("${AWS::") => json!({"Fn::Sub": s}),
        Value::Array(a) => Value::Array(a.into_iter().map(substitute).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, substitute(v))).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::naming::Naming;
    use crate::topology::{Ownership, QueueSettings, SubscriptionSpec, TopicSpec, Topology};

    fn plan() -> ServicePlan {
        let mut tags = BTreeMap::new();
        tags.insert("team".to_string(), "payments".to_string());
        let ledger = QueueSettings {
            visibility_timeout: Duration::from_millis(90_500),
            high_throughput: true,
            encryption: ServerSideEncryption::Kms("alias/ledger".into()),
            tags,
            ..QueueSettings::default()
        };
        let topology = Topology {
            queues: vec![
                QueueSpec::new("dev-ledger-dlq.fifo").with_settings(ledger.clone()),
                QueueSpec::new("dev-ledger.fifo")
                    .with_settings(ledger)
                    .with_dead_letter("dev-ledger-dlq.fifo", 100),
                QueueSpec::new("dev-mail-dlq").owned_as(Ownership::SendOnly),
                QueueSpec::new("dev-mail")
                    .owned_as(Ownership::SendOnly)
                    .with_settings(QueueSettings {
                        delay: Duration::from_secs(30),
                        encryption: ServerSideEncryption::Disabled,
                        ..QueueSettings::default()
                    })
                    .with_dead_letter("dev-mail-dlq", 100),
                QueueSpec::new("dev-svc-order-events-dlq"),
                QueueSpec::new("dev-svc-order-events")
                    .with_dead_letter("dev-svc-order-events-dlq", 100),
            ],
            topics: vec![
                TopicSpec::new("dev-order-events"),
                TopicSpec::new("dev-audit.fifo"),
            ],
            subscriptions: vec![
                SubscriptionSpec::new("dev-order-events", "dev-svc-order-events")
                    .types(["orders.Created.v1"]),
                SubscriptionSpec::new("dev-audit.fifo", "dev-ledger.fifo")
                    .types(["audit.Entry.v1"]),
            ],
            subscriber_prefix: Some("dev-svc-".into()),
            bucket: None,
        };
        ServicePlan {
            service: "svc".into(),
            naming: Naming::new("dev"),
            topology,
            listeners: Vec::new(),
            messages: Vec::new(),
        }
    }

    fn of_type<'a>(t: &'a Value, ty: &str) -> Vec<(&'a String, &'a Value)> {
        t["Resources"]
            .as_object()
            .map(|r| r.iter().filter(|(_, v)| v["Type"] == ty).collect())
            .unwrap_or_default()
    }

    #[test]
    fn queues_carry_their_settings_and_redrive() {
        let t = cloudformation(&plan(), &CloudFormationOptions::default());
        assert_eq!(of_type(&t, "AWS::SQS::Queue").len(), 6);
        let ledger = &t["Resources"]["QueueDevLedgerFifo"]["Properties"];
        assert_eq!(ledger["QueueName"], "dev-ledger.fifo");
        assert_eq!(ledger["FifoQueue"], true);
        assert_eq!(ledger["ContentBasedDeduplication"], false);
        assert_eq!(ledger["DeduplicationScope"], "messageGroup");
        assert_eq!(ledger["FifoThroughputLimit"], "perMessageGroupId");
        assert_eq!(
            ledger["VisibilityTimeout"], 91,
            "rounded up, as the provisioner does"
        );
        assert_eq!(ledger["MessageRetentionPeriod"], 345_600);
        assert_eq!(ledger["KmsMasterKeyId"], "alias/ledger");
        assert_eq!(ledger["SqsManagedSseEnabled"], Value::Null);
        assert_eq!(
            ledger["Tags"],
            json!([{"Key": "team", "Value": "payments"}])
        );
        assert_eq!(
            ledger["RedrivePolicy"],
            json!({"deadLetterTargetArn": {"Fn::GetAtt": ["QueueDevLedgerDlqFifo", "Arn"]}, "maxReceiveCount": 100})
        );
        let mail = &t["Resources"]["QueueDevMail"]["Properties"];
        assert_eq!(
            mail["FifoQueue"],
            Value::Null,
            "standard queues say nothing of FIFO"
        );
        assert_eq!(mail["DeduplicationScope"], Value::Null);
        assert_eq!(mail["DelaySeconds"], 30);
        assert_eq!(mail["SqsManagedSseEnabled"], false);
        let dlq = &t["Resources"]["QueueDevMailDlq"]["Properties"];
        assert_eq!(dlq["RedrivePolicy"], Value::Null);
        assert_eq!(dlq["SqsManagedSseEnabled"], true);
        assert_eq!(
            t["Outputs"]["QueueDevMailUrl"]["Value"],
            json!({"Ref": "QueueDevMail"})
        );
    }

    #[test]
    fn topics_subscriptions_and_queue_policies() {
        let t = cloudformation(&plan(), &CloudFormationOptions::default());
        let fifo = &t["Resources"]["TopicDevAuditFifo"]["Properties"];
        assert_eq!(fifo["TopicName"], "dev-audit.fifo");
        assert_eq!(fifo["FifoTopic"], true);
        assert_eq!(fifo["ContentBasedDeduplication"], false);
        assert_eq!(
            t["Resources"]["TopicDevOrderEvents"]["Properties"],
            json!({"TopicName": "dev-order-events"})
        );
        assert_eq!(
            t["Outputs"]["TopicDevOrderEventsArn"]["Value"],
            json!({"Ref": "TopicDevOrderEvents"})
        );
        let subs = of_type(&t, "AWS::SNS::Subscription");
        assert_eq!(subs.len(), 2);
        let (_, sub) = subs
            .iter()
            .find(|(_, s)| s["Properties"]["TopicArn"] == json!({"Ref": "TopicDevOrderEvents"}))
            .expect("subscription to order events");
        assert_eq!(
            sub["Properties"],
            json!({
                "TopicArn": {"Ref": "TopicDevOrderEvents"},
                "Protocol": "sqs",
                "Endpoint": {"Fn::GetAtt": ["QueueDevSvcOrderEvents", "Arn"]},
                "RawMessageDelivery": true,
                "FilterPolicy": {"sourceflow.type": ["orders.Created.v1"]},
                "FilterPolicyScope": "MessageAttributes",
            })
        );
        assert_eq!(sub["DependsOn"], json!(["QueueDevSvcOrderEventsPolicy"]));
        let policies = of_type(&t, "AWS::SQS::QueuePolicy");
        assert_eq!(policies.len(), 2, "one per subscribed queue");
        let p = &t["Resources"]["QueueDevSvcOrderEventsPolicy"]["Properties"];
        assert_eq!(p["Queues"], json!([{"Ref": "QueueDevSvcOrderEvents"}]));
        let st = &p["PolicyDocument"]["Statement"][0];
        assert_eq!(st["Principal"], json!({"Service": "sns.amazonaws.com"}));
        assert_eq!(st["Action"], "sqs:SendMessage");
        assert_eq!(
            st["Resource"],
            json!({"Fn::GetAtt": ["QueueDevSvcOrderEvents", "Arn"]})
        );
        assert_eq!(
            st["Condition"],
            json!({"ArnEquals": {"aws:SourceArn": [{"Ref": "TopicDevOrderEvents"}]}})
        );
    }

    #[test]
    fn a_dynamodb_idempotency_table_as_the_store_creates_it() {
        let t = cloudformation(&plan(), &CloudFormationOptions::default());
        assert_eq!(
            t["Resources"]["IdempotencyTable"],
            Value::Null,
            "none unless configured"
        );
        let options = CloudFormationOptions {
            idempotency_table: Some("svc-idempotency".into()),
            ..CloudFormationOptions::default()
        };
        let t = cloudformation(&plan(), &options);
        let table = &t["Resources"]["IdempotencyTable"];
        assert_eq!(table["Type"], "AWS::DynamoDB::Table");
        assert_eq!(table["DeletionPolicy"], "Retain");
        let p = &table["Properties"];
        assert_eq!(p["TableName"], "svc-idempotency");
        assert_eq!(
            p["KeySchema"],
            json!([{"AttributeName": "id", "KeyType": "HASH"}])
        );
        assert_eq!(p["BillingMode"], "PAY_PER_REQUEST");
        assert_eq!(
            p["TimeToLiveSpecification"],
            json!({"AttributeName": "expiration", "Enabled": true})
        );
        #[cfg(feature = "dynamodb")]
        {
            assert_eq!(IDEMPOTENCY_KEY, crate::idempotency::dynamodb::KEY_ATTRIBUTE);
            assert_eq!(IDEMPOTENCY_TTL, crate::idempotency::dynamodb::TTL_ATTRIBUTE);
        }
        let policy = t["Resources"]["ServicePolicy"].to_string();
        assert!(policy.contains("table/svc-idempotency"), "{policy}");
    }

    #[test]
    fn the_claim_check_bucket_comes_with_its_lifecycle_rule_and_policy() {
        let mut p = plan();
        assert!(of_type(&cloudformation(&p, &Default::default()), "AWS::S3::Bucket").is_empty());
        p.topology.bucket = Some(crate::topology::BucketSpec {
            name: "acme-claims".into(),
            prefix: "dev-claims".into(),
            expiration_days: 15,
        });
        let t = cloudformation(&p, &CloudFormationOptions::default());
        let buckets = of_type(&t, "AWS::S3::Bucket");
        assert_eq!(buckets.len(), 1);
        let props = &buckets[0].1["Properties"];
        assert_eq!(props["BucketName"], "acme-claims");
        assert_eq!(
            props["LifecycleConfiguration"]["Rules"],
            json!([{"Id": "sourceflow-expire-dev-claims", "Status": "Enabled", "Prefix": "dev-claims/", "ExpirationInDays": 15}])
        );
        let policy = t["Resources"]["ServicePolicy"].to_string();
        assert!(
            policy.contains(r#"{"Fn::Sub":"arn:${AWS::Partition}:s3:::acme-claims/dev-claims/*"}"#),
            "{policy}"
        );
    }

    #[test]
    fn the_managed_policy_is_the_services_with_the_stacks_arns() {
        let mut options = CloudFormationOptions {
            kms_key: Some("alias/payloads".into()),
            ..CloudFormationOptions::default()
        };
        let t = cloudformation(&plan(), &options);
        let doc = &t["Resources"]["ServicePolicy"]["Properties"]["PolicyDocument"];
        let text = doc.to_string();
        assert!(text.contains(
            r#"{"Fn::Sub":"arn:${AWS::Partition}:sqs:${AWS::Region}:${AWS::AccountId}:dev-ledger.fifo"}"#
        ));
        assert!(
            text.contains("ListSubscriptions"),
            "validate mode by default"
        );
        assert!(
            !text.contains("CreateQueue"),
            "validate mode creates nothing"
        );
        assert!(text.contains("kms:DescribeKey"));
        assert_eq!(
            t["Outputs"]["ServicePolicyArn"]["Value"],
            json!({"Ref": "ServicePolicy"})
        );
        options.provisioning = Provisioning::Create;
        let t = cloudformation(&plan(), &options);
        let text = t["Resources"]["ServicePolicy"].to_string();
        assert!(text.contains("sqs:CreateQueue"));
    }

    fn consuming(fifo: bool, visibility: u64) -> ServicePlan {
        let mut p = plan();
        p.listeners = vec![crate::runtime::ListenerSummary {
            queue: "dev-ledger.fifo".into(),
            fifo,
            handlers: Vec::new(),
            visibility_timeout: Duration::from_secs(visibility),
            max_attempts: 5,
        }];
        p
    }

    #[test]
    fn a_lambda_mapping_is_held_to_the_limits_aws_sets() {
        let ok = LambdaMapping::new("fn", Duration::from_secs(20));
        assert!(ok.check(&consuming(true, 30)).is_ok());
        let slow = LambdaMapping::new("fn", Duration::from_secs(30));
        let e = slow.check(&consuming(true, 30)).unwrap_err().to_string();
        assert!(e.contains("timeout (30 s) is not below the visibility timeout of queue `dev-ledger.fifo` (30 s)"), "{e}");
        let mut big = ok.clone();
        big.batch_size = 11;
        let e = big.check(&consuming(true, 30)).unwrap_err().to_string();
        assert!(
            e.contains("outside the 1 to 10 AWS allows for queue `dev-ledger.fifo`"),
            "{e}"
        );
        assert!(
            big.check(&consuming(false, 30)).is_err(),
            "11 needs a batching window"
        );
        big.batching_window = Duration::from_secs(1);
        assert!(big.check(&consuming(false, 30)).is_ok());
        let mut crowd = ok.clone();
        crowd.maximum_concurrency = Some(1);
        assert!(crowd.check(&consuming(false, 30)).is_err());
        let t = cloudformation(
            &consuming(true, 30),
            &CloudFormationOptions {
                lambda: Some(big),
                ..CloudFormationOptions::default()
            },
        );
        let m = &t["Resources"]["EventSourceMappingDevLedgerFifo"]["Properties"];
        assert_eq!(
            m["FunctionResponseTypes"],
            json!(["ReportBatchItemFailures"])
        );
        assert!(
            m.get("MaximumBatchingWindowInSeconds").is_none(),
            "not on FIFO"
        );
    }
}
