//! Queues: the attributes and tags a queue should have, how an existing one differs, and
//! creating or correcting it as its ownership allows.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_sqs::types::QueueAttributeName;

use super::super::errors::{aws_error, sdk_error, Resource};
use super::super::sqs::secs_ceil;
use super::super::{AwsTransport, Identity};
use crate::error::{Error, Result};
use crate::topology::{Finding, QueueSpec, ServerSideEncryption, Topology};
use crate::transport::MAX_VISIBILITY;

/// An existing queue: its URL, attributes and tags.
struct Existing {
    url: String,
    attributes: HashMap<String, String>,
}

impl AwsTransport {
    /// A queue this service owns: created when missing, corrected where it differs.
    pub(super) async fn ensure_owned_queue(
        &self,
        spec: &QueueSpec,
        id: &Identity,
        topology: &Topology,
    ) -> Result<()> {
        let wanted = wanted_attributes(spec, id, topology);
        let Some(existing) = self.existing_queue(spec).await? else {
            return self.create_queue(spec, &wanted).await;
        };
        let changes = differences(&existing.attributes, &wanted);
        if !changes.is_empty() {
            let mut req = self
                .inner
                .sqs
                .set_queue_attributes()
                .queue_url(&existing.url);
            for (k, _, v) in &changes {
                req = req.attributes(QueueAttributeName::from(k.as_str()), v);
            }
            req.send().await.map_err(|e| {
                sdk_error("SetQueueAttributes", Resource::Queue(spec.name.clone()), &e)
            })?;
            let names: Vec<_> = changes.iter().map(|(k, _, _)| k.as_str()).collect();
            tracing::info!(queue = %spec.name, changed = ?names, "queue attributes corrected");
        }
        self.ensure_tags(spec, &existing.url).await
    }

    /// A queue this service only sends to: created with its declared settings when missing,
    /// never changed otherwise (its consumer owns it).
    pub(super) async fn ensure_queue_exists(
        &self,
        spec: &QueueSpec,
        id: &Identity,
        topology: &Topology,
    ) -> Result<()> {
        match self.queue_url(&spec.name).await {
            Ok(_) => Ok(()),
            Err(Error::QueueDoesNotExist(_)) => {
                let wanted = wanted_attributes(spec, id, topology);
                self.create_queue(spec, &wanted).await
            }
            Err(e) => Err(e),
        }
    }

    async fn create_queue(
        &self,
        spec: &QueueSpec,
        wanted: &BTreeMap<String, String>,
    ) -> Result<()> {
        let mut req = self.inner.sqs.create_queue().queue_name(&spec.name);
        for (k, v) in wanted {
            req = req.attributes(QueueAttributeName::from(k.as_str()), v);
        }
        for (k, v) in &spec.settings.tags {
            req = req.tags(k, v);
        }
        let out = req
            .send()
            .await
            .map_err(|e| sdk_error("CreateQueue", Resource::Queue(spec.name.clone()), &e))?;
        if let Some(url) = out.queue_url() {
            self.inner
                .urls
                .write()
                .insert(spec.name.clone(), url.to_string());
        }
        tracing::info!(queue = %spec.name, ownership = ?spec.ownership, "queue created");
        Ok(())
    }

    /// The queue's URL and attributes; `None` when it does not exist. A queue that exists
    /// with the other FIFO-ness cannot be fixed: an error says so.
    async fn existing_queue(&self, spec: &QueueSpec) -> Result<Option<Existing>> {
        let url = match self.queue_url(&spec.name).await {
            Ok(url) => url,
            Err(Error::QueueDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let out = self
            .inner
            .sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::All)
            .send()
            .await
            .map_err(|e| sdk_error("GetQueueAttributes", Resource::Queue(spec.name.clone()), &e))?;
        let attributes: HashMap<String, String> = out
            .attributes()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.as_str().to_string(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let is_fifo = attributes.get("FifoQueue").is_some_and(|v| v == "true");
        if is_fifo != spec.fifo {
            return Err(Error::Config(format!(
                "queue `{}` exists with FifoQueue={is_fifo}; that cannot be changed: delete it or rename the route",
                spec.name
            )));
        }
        Ok(Some(Existing { url, attributes }))
    }

    /// The tags the queue lacks or has with another value (tags of others stay).
    async fn tag_differences(
        &self,
        spec: &QueueSpec,
        url: &str,
    ) -> Result<Vec<(String, String, String)>> {
        if spec.settings.tags.is_empty() {
            return Ok(Vec::new());
        }
        let out = self
            .inner
            .sqs
            .list_queue_tags()
            .queue_url(url)
            .send()
            .await
            .map_err(|e| sdk_error("ListQueueTags", Resource::Queue(spec.name.clone()), &e))?;
        let current = out.tags().cloned().unwrap_or_default();
        Ok(spec
            .settings
            .tags
            .iter()
            .filter(|(k, v)| current.get(*k) != Some(v))
            .map(|(k, v)| {
                let now = current.get(k).cloned().unwrap_or_else(|| "(unset)".into());
                (k.clone(), now, v.clone())
            })
            .collect())
    }

    async fn ensure_tags(&self, spec: &QueueSpec, url: &str) -> Result<()> {
        let changes = self.tag_differences(spec, url).await?;
        if changes.is_empty() {
            return Ok(());
        }
        let mut req = self.inner.sqs.tag_queue().queue_url(url);
        for (k, _, v) in &changes {
            req = req.tags(k, v);
        }
        req.send()
            .await
            .map_err(|e| sdk_error("TagQueue", Resource::Queue(spec.name.clone()), &e))?;
        tracing::info!(queue = %spec.name, tags = changes.len(), "queue tags corrected");
        Ok(())
    }

    /// How a queue differs from the topology: missing, or (owned queues) its attributes
    /// and tags.
    pub(super) async fn inspect_queue(
        &self,
        spec: &QueueSpec,
        id: &Identity,
        topology: &Topology,
    ) -> Result<Vec<Finding>> {
        let resource = format!("queue `{}`", spec.name);
        let existing = match self.existing_queue(spec).await {
            Ok(Some(e)) => e,
            Ok(None) => return Ok(vec![Finding::Missing { resource }]),
            Err(Error::Config(why)) => {
                return Ok(vec![Finding::Differs {
                    resource,
                    attribute: "FifoQueue".into(),
                    current: (!spec.fifo).to_string(),
                    wanted: format!("{} ({why})", spec.fifo),
                }])
            }
            Err(e) => return Err(e),
        };
        if spec.ownership != crate::topology::Ownership::Consumed {
            return Ok(Vec::new());
        }
        let wanted = wanted_attributes(spec, id, topology);
        let mut findings: Vec<Finding> = differences(&existing.attributes, &wanted)
            .into_iter()
            .map(|(attribute, current, wanted)| Finding::Differs {
                resource: resource.clone(),
                attribute,
                current,
                wanted,
            })
            .collect();
        for (k, current, wanted) in self.tag_differences(spec, &existing.url).await? {
            findings.push(Finding::Differs {
                resource: resource.clone(),
                attribute: format!("tag `{k}`"),
                current,
                wanted,
            });
        }
        Ok(findings)
    }

    /// True when the topic exists; an error when SNS cannot tell.
    pub(super) async fn topic_exists(&self, name: &str, arn: &str) -> Result<bool> {
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
                    Err(e.into_error("GetTopicAttributes"))
                }
            }
        }
    }
}

/// The attributes a queue should have.
fn wanted_attributes(
    spec: &QueueSpec,
    id: &Identity,
    topology: &Topology,
) -> BTreeMap<String, String> {
    let s = &spec.settings;
    let mut a = BTreeMap::new();
    let visibility = secs_ceil(s.visibility_timeout).min(MAX_VISIBILITY.as_secs());
    a.insert("VisibilityTimeout".to_string(), visibility.to_string());
    a.insert(
        "MessageRetentionPeriod".into(),
        s.retention.as_secs().to_string(),
    );
    a.insert("DelaySeconds".into(), s.delay.as_secs().to_string());
    if spec.fifo {
        a.insert("FifoQueue".into(), "true".into());
        a.insert("ContentBasedDeduplication".into(), "false".into());
        let (scope, limit) = match s.high_throughput {
            true => ("messageGroup", "perMessageGroupId"),
            false => ("queue", "perQueue"),
        };
        a.insert("DeduplicationScope".into(), scope.into());
        a.insert("FifoThroughputLimit".into(), limit.into());
    }
    match &s.encryption {
        ServerSideEncryption::SqsManaged => {
            a.insert("SqsManagedSseEnabled".into(), "true".into());
        }
        ServerSideEncryption::Kms(key) => {
            a.insert("KmsMasterKeyId".into(), key.clone());
        }
        ServerSideEncryption::Disabled => {
            a.insert("SqsManagedSseEnabled".into(), "false".into());
        }
    }
    if let Some(d) = &spec.dead_letter {
        let redrive = serde_json::json!({
            "deadLetterTargetArn": id.queue_arn(&d.queue),
            "maxReceiveCount": d.max_receive_count,
        });
        a.insert("RedrivePolicy".into(), redrive.to_string());
    }
    if let Some(policy) = access_policy(spec, id, topology) {
        a.insert("Policy".into(), policy.to_string());
    }
    a
}

/// The queue's access policy (see [`Topology::access_policy`]), with this account's ARNs.
pub(crate) fn access_policy(
    spec: &QueueSpec,
    id: &Identity,
    topology: &Topology,
) -> Option<serde_json::Value> {
    topology.access_policy(&spec.name, id.queue_arn(&spec.name).into(), |t| {
        id.topic_arn(t).into()
    })
}

/// `(attribute, current, wanted)` for every attribute that differs.
fn differences(
    current: &HashMap<String, String>,
    wanted: &BTreeMap<String, String>,
) -> Vec<(String, String, String)> {
    wanted
        .iter()
        .filter(|(k, _)| k.as_str() != "FifoQueue")
        .filter(|(k, v)| !same_attribute(k, current.get(k.as_str()), v))
        .map(|(k, v)| {
            let now = current.get(k).cloned().unwrap_or_else(|| "(unset)".into());
            (k.clone(), now, v.clone())
        })
        .collect()
}

/// Compares an attribute, reading JSON attributes as JSON (their text may be re-serialized)
/// and an unset attribute as its SQS default.
fn same_attribute(key: &str, current: Option<&String>, wanted: &str) -> bool {
    let default = match key {
        "DelaySeconds" => Some("0"),
        "DeduplicationScope" => Some("queue"),
        "FifoThroughputLimit" => Some("perQueue"),
        "SqsManagedSseEnabled" => Some("false"),
        _ => None,
    };
    let Some(current) = current.map(String::as_str).or(default) else {
        return false;
    };
    if key == "Policy" || key == "RedrivePolicy" {
        return same_json(current, wanted);
    }
    current == wanted
}

/// Two JSON texts with the same meaning, as AWS rewrites them (numbers as strings,
/// one-element lists as scalars).
pub(crate) fn same_json(a: &str, b: &str) -> bool {
    let parsed = (
        serde_json::from_str::<serde_json::Value>(a),
        serde_json::from_str::<serde_json::Value>(b),
    );
    match parsed {
        (Ok(mut a), Ok(mut b)) => {
            normalize(&mut a);
            normalize(&mut b);
            a == b
        }
        _ => a == b,
    }
}

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
