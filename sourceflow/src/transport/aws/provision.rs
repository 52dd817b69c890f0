//! The bootstrapper: `provision` in its three modes, and `missing` for health checks.
//!
//! `provision` reads the account from STS, then creates what is missing — queues (standard
//! or FIFO with `ContentBasedDeduplication=false`, visibility timeout, retention, a
//! `RedrivePolicy` to each dead-letter queue, and a single-statement access policy that
//! lets exactly the subscribed topics send), topics (standard or FIFO) and subscriptions
//! (`RawMessageDelivery=true`, a filter policy on `sourceflow.type`). An existing resource
//! is compared attribute by attribute and changed only where it differs, so a second start
//! makes no changes. Topic ARNs come from `CreateTopic`, which is idempotent, never from
//! `ListTopics`.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_sqs::types::QueueAttributeName;

use super::errors::{aws_error, sdk_error, Resource};
use super::sqs::secs_ceil;
use super::{AwsTransport, Identity};
use crate::envelope::attr;
use crate::error::{Error, Result};
use crate::transport::{QueueSpec, Topology, MAX_VISIBILITY};

/// Retention of a dead-letter queue (the SQS maximum): time to look and redrive.
const DLQ_RETENTION_SECS: u64 = 14 * 24 * 60 * 60;
/// Retention of other queues (the SQS default).
const QUEUE_RETENTION_SECS: u64 = 4 * 24 * 60 * 60;

/// What `provision` does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProvisionMode {
    /// Create what is missing, correct what differs (the default).
    #[default]
    Create,
    /// Create nothing; fail listing every missing resource and differing attribute.
    Validate,
    /// Make no calls: the resources are managed elsewhere (CloudFormation, Terraform, …).
    Assume,
}

impl std::str::FromStr for ProvisionMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "create" => Ok(ProvisionMode::Create),
            "validate" => Ok(ProvisionMode::Validate),
            "assume" => Ok(ProvisionMode::Assume),
            other => Err(Error::Config(format!(
                "SOURCEFLOW_PROVISION={other:?}: use `create`, `validate` or `assume`"
            ))),
        }
    }
}

/// `SOURCEFLOW_PROVISION`, else [`ProvisionMode::Create`].
pub(crate) fn provision_mode_from_env() -> Result<ProvisionMode> {
    match std::env::var("SOURCEFLOW_PROVISION") {
        Ok(m) if !m.is_empty() => m.parse(),
        _ => Ok(ProvisionMode::Create),
    }
}

impl AwsTransport {
    /// `provision` as the mode says.
    pub(super) async fn provision_now(&self, topology: &Topology) -> Result<()> {
        match self.inner.mode {
            ProvisionMode::Assume => return Ok(()),
            ProvisionMode::Validate => return self.validate(topology).await,
            ProvisionMode::Create => {}
        }
        let id = self.identity().await?.clone();
        for spec in &topology.queues {
            self.ensure_queue(spec, &id, topology).await?;
        }
        for t in &topology.topics {
            let mut req = self.inner.sns.create_topic().name(&t.name);
            if t.fifo {
                req = req
                    .attributes("FifoTopic", "true")
                    .attributes("ContentBasedDeduplication", "false");
            }
            req.send()
                .await
                .map_err(|e| sdk_error("CreateTopic", Resource::Topic(t.name.clone()), &e))?;
        }
        for s in &topology.subscriptions {
            let topic_arn = id.topic_arn(&s.topic);
            let queue_arn = id.queue_arn(&s.queue);
            let mut req = self
                .inner
                .sns
                .subscribe()
                .topic_arn(&topic_arn)
                .protocol("sqs")
                .endpoint(&queue_arn)
                .return_subscription_arn(true)
                .attributes("RawMessageDelivery", "true");
            if !s.message_types.is_empty() {
                req = req
                    .attributes(
                        "FilterPolicy",
                        serde_json::json!({ attr::TYPE: s.message_types }).to_string(),
                    )
                    .attributes("FilterPolicyScope", "MessageAttributes");
            }
            req.send().await.map_err(|e| {
                let resource = Resource::Subscription {
                    topic: s.topic.clone(),
                    queue: s.queue.clone(),
                };
                sdk_error("Subscribe", resource, &e)
            })?;
        }
        Ok(())
    }

    /// The attributes a queue should have.
    fn wanted_attributes(
        &self,
        spec: &QueueSpec,
        id: &Identity,
        topology: &Topology,
    ) -> BTreeMap<String, String> {
        let mut a = BTreeMap::new();
        a.insert(
            "VisibilityTimeout".to_string(),
            secs_ceil(spec.visibility_timeout)
                .min(MAX_VISIBILITY.as_secs())
                .to_string(),
        );
        let retention = if spec.dead_letter.is_none() {
            DLQ_RETENTION_SECS
        } else {
            QUEUE_RETENTION_SECS
        };
        a.insert("MessageRetentionPeriod".into(), retention.to_string());
        if spec.fifo {
            a.insert("FifoQueue".into(), "true".into());
            a.insert("ContentBasedDeduplication".into(), "false".into());
        }
        if let Some(d) = &spec.dead_letter {
            a.insert(
                "RedrivePolicy".into(),
                serde_json::json!({
                    "deadLetterTargetArn": id.queue_arn(&d.queue),
                    "maxReceiveCount": d.max_receive_count,
                })
                .to_string(),
            );
        }
        let mut sources: Vec<String> = topology
            .subscriptions
            .iter()
            .filter(|s| s.queue == spec.name)
            .map(|s| id.topic_arn(&s.topic))
            .collect();
        sources.sort();
        sources.dedup();
        if !sources.is_empty() {
            // One statement for all topics: far below the 20-statement and 8 KB limits.
            a.insert(
                "Policy".into(),
                serde_json::json!({
                    "Version": "2012-10-17",
                    "Statement": [{
                        "Sid": "sourceflow-topics",
                        "Effect": "Allow",
                        "Principal": {"Service": "sns.amazonaws.com"},
                        "Action": "sqs:SendMessage",
                        "Resource": id.queue_arn(&spec.name),
                        "Condition": {"ArnEquals": {"aws:SourceArn": sources}},
                    }],
                })
                .to_string(),
            );
        }
        a
    }

    /// How an existing queue differs from `wanted`: `(attribute, current, wanted)`; `None`
    /// when the queue does not exist.
    async fn queue_differences(
        &self,
        spec: &QueueSpec,
        wanted: &BTreeMap<String, String>,
    ) -> Result<Option<(String, Vec<(String, String, String)>)>> {
        match self.queue_url(&spec.name).await {
            Ok(url) => {
                let current = self
                    .inner
                    .sqs
                    .get_queue_attributes()
                    .queue_url(&url)
                    .attribute_names(QueueAttributeName::All)
                    .send()
                    .await
                    .map_err(|e| {
                        sdk_error("GetQueueAttributes", Resource::Queue(spec.name.clone()), &e)
                    })?;
                let current: HashMap<String, String> = current
                    .attributes()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.as_str().to_string(), v.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                let is_fifo = current.get("FifoQueue").is_some_and(|v| v == "true");
                if is_fifo != spec.fifo {
                    return Err(Error::Config(format!(
                        "queue `{}` exists with FifoQueue={is_fifo}; it cannot be changed: delete it or rename the route",
                        spec.name
                    )));
                }
                let mut changes = Vec::new();
                for (k, v) in wanted {
                    if k == "FifoQueue" {
                        continue;
                    }
                    if !same_attribute(k, current.get(k), v) {
                        let now = current.get(k).cloned().unwrap_or_else(|| "(unset)".into());
                        changes.push((k.clone(), now, v.clone()));
                    }
                }
                Ok(Some((url, changes)))
            }
            Err(Error::QueueDoesNotExist(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn ensure_queue(
        &self,
        spec: &QueueSpec,
        id: &Identity,
        topology: &Topology,
    ) -> Result<()> {
        let wanted = self.wanted_attributes(spec, id, topology);
        match self.queue_differences(spec, &wanted).await? {
            Some((url, changes)) => {
                if !changes.is_empty() {
                    let mut req = self.inner.sqs.set_queue_attributes().queue_url(&url);
                    for (k, _, v) in &changes {
                        req = req.attributes(QueueAttributeName::from(k.as_str()), v);
                    }
                    req.send().await.map_err(|e| {
                        sdk_error("SetQueueAttributes", Resource::Queue(spec.name.clone()), &e)
                    })?;
                    let names: Vec<_> = changes.iter().map(|(k, _, _)| k.as_str()).collect();
                    tracing::info!(queue = %spec.name, changed = ?names, "queue attributes updated");
                }
                Ok(())
            }
            None => {
                let mut req = self.inner.sqs.create_queue().queue_name(&spec.name);
                for (k, v) in &wanted {
                    req = req.attributes(QueueAttributeName::from(k.as_str()), v);
                }
                let out = req.send().await.map_err(|e| {
                    sdk_error("CreateQueue", Resource::Queue(spec.name.clone()), &e)
                })?;
                if let Some(url) = out.queue_url() {
                    self.inner
                        .urls
                        .write()
                        .insert(spec.name.clone(), url.to_string());
                }
                tracing::info!(queue = %spec.name, "queue created");
                Ok(())
            }
        }
    }

    /// True when the topic exists; an error when SNS cannot tell.
    async fn topic_exists(&self, name: &str, arn: &str) -> Result<bool> {
        match self
            .inner
            .sns
            .get_topic_attributes()
            .topic_arn(arn)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) => {
                let e = aws_error("GetTopicAttributes", Resource::Topic(name.to_string()), &e);
                if e.is_not_found() {
                    Ok(false)
                } else {
                    Err(Error::Transport {
                        transport: "aws",
                        operation: "GetTopicAttributes".into(),
                        source: Box::new(e),
                    })
                }
            }
        }
    }

    /// Validate mode: creates nothing, and lists every missing resource and every differing
    /// attribute.
    async fn validate(&self, topology: &Topology) -> Result<()> {
        let id = self.identity().await?.clone();
        let mut problems = Vec::new();
        for spec in &topology.queues {
            let wanted = self.wanted_attributes(spec, &id, topology);
            match self.queue_differences(spec, &wanted).await {
                Ok(None) => problems.push(format!("queue `{}` is missing", spec.name)),
                Ok(Some((_, diffs))) => {
                    for (k, now, want) in diffs {
                        problems.push(format!(
                            "queue `{}`: {k} is {now}, expected {want}",
                            spec.name
                        ));
                    }
                }
                Err(Error::Config(e)) => problems.push(e),
                Err(e) => return Err(e),
            }
        }
        for t in &topology.topics {
            if !self.topic_exists(&t.name, &id.topic_arn(&t.name)).await? {
                problems.push(format!("topic `{}` is missing", t.name));
            }
        }
        for sub in &topology.subscriptions {
            let arn = id.topic_arn(&sub.topic);
            let listed = self
                .inner
                .sns
                .list_subscriptions_by_topic()
                .topic_arn(&arn)
                .send()
                .await;
            let found = listed.ok().is_some_and(|l| {
                l.subscriptions()
                    .iter()
                    .any(|s| s.endpoint() == Some(id.queue_arn(&sub.queue).as_str()))
            });
            if !found {
                problems.push(format!(
                    "subscription of queue `{}` to topic `{}` is missing",
                    sub.queue, sub.topic
                ));
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(Error::Config(format!(
            "SOURCEFLOW_PROVISION=validate: the AWS resources do not match the routes:\n  - {}",
            problems.join("\n  - ")
        )))
    }

    /// The resources of `topology` that do not exist.
    pub(super) async fn missing_now(&self, topology: &Topology) -> Result<Vec<String>> {
        let mut missing = Vec::new();
        for q in &topology.queues {
            // A fresh lookup: the cache would hide a deleted queue.
            self.inner.urls.write().remove(&q.name);
            match self.queue_url(&q.name).await {
                Ok(_) => {}
                Err(Error::QueueDoesNotExist(_)) => missing.push(format!("queue {}", q.name)),
                Err(e) => return Err(e),
            }
        }
        for t in &topology.topics {
            let arn = self.topic_arn(&t.name).await?;
            if !self.topic_exists(&t.name, &arn).await? {
                missing.push(format!("topic {}", t.name));
            }
        }
        Ok(missing)
    }
}

/// Compares an attribute, reading JSON attributes as JSON (their text may be re-serialized).
fn same_attribute(key: &str, current: Option<&String>, wanted: &str) -> bool {
    let Some(current) = current else {
        return false;
    };
    if key == "Policy" || key == "RedrivePolicy" {
        let a: Option<serde_json::Value> = serde_json::from_str(current).ok();
        let b: Option<serde_json::Value> = serde_json::from_str(wanted).ok();
        return match (a, b) {
            (Some(mut a), Some(mut b)) => {
                normalize(&mut a);
                normalize(&mut b);
                a == b
            }
            _ => current == wanted,
        };
    }
    current == wanted
}

/// Numbers as strings and one-element lists as scalars compare equal, as AWS rewrites them.
fn normalize(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Number(n) => *v = serde_json::Value::String(n.to_string()),
        serde_json::Value::Array(a) if a.len() == 1 => {
            let mut one = a.remove(0);
            normalize(&mut one);
            *v = one;
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(normalize),
        serde_json::Value::Object(o) => o.values_mut().for_each(normalize),
        _ => {}
    }
}
