//! The bootstrapper: `provision` in its three modes, `inspect` for validation and `prune`,
//! and `missing` for health checks. Control plane only: nothing here runs per message.
//!
//! Ownership follows the topology (see [`crate::topology`]): queues this service consumes
//! (and their dead-letter queues) are created and corrected attribute by attribute — a
//! second start changes nothing; queues it only sends to are created with their declared
//! settings when missing and never corrected; topics are created with `CreateTopic`, which
//! is idempotent (their ARNs come from the account, never from `ListTopics`). An existing
//! subscription whose `FilterPolicy`, `FilterPolicyScope` or `RawMessageDelivery` differs is
//! corrected with `SetSubscriptionAttributes` — re-sending `Subscribe` with other attributes
//! is what SNS refuses ("Subscription already exists with different attributes").
//! Subscriptions of the service's queues to topics it no longer handles are reported by
//! `inspect` and removed by `prune`, never at startup.

mod bucket;
mod queues;
mod subscriptions;

use super::errors::{sdk_error, Resource};
use super::AwsTransport;
use crate::error::{Error, Result};
use crate::topology::{Finding, Ownership, Topology};

/// What `provision` does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProvisionMode {
    /// Create what is missing, correct what differs (the default).
    #[default]
    Create,
    /// Create nothing; fail listing every missing resource, differing attribute and stale
    /// subscription.
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
            ProvisionMode::Assume => Ok(()),
            ProvisionMode::Validate => {
                let findings = self.inspect_now(topology).await?;
                if findings.is_empty() {
                    return Ok(());
                }
                let lines: Vec<String> = findings.iter().map(|f| f.to_string()).collect();
                Err(Error::Config(format!(
                    "SOURCEFLOW_PROVISION=validate: the AWS resources do not match the routes:\n  - {}",
                    lines.join("\n  - ")
                )))
            }
            ProvisionMode::Create => self.create(topology).await,
        }
    }

    /// Creates what is missing and corrects what this service owns.
    async fn create(&self, topology: &Topology) -> Result<()> {
        let id = self.identity().await?.clone();
        for spec in &topology.queues {
            match spec.ownership {
                Ownership::Consumed => self.ensure_owned_queue(spec, &id, topology).await?,
                Ownership::SendOnly => self.ensure_queue_exists(spec, &id, topology).await?,
            }
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
            self.ensure_subscription(s, &id).await?;
        }
        if let Some(bucket) = &topology.bucket {
            self.ensure_bucket(bucket).await?;
        }
        Ok(())
    }

    /// Everything that differs, changing nothing.
    pub(super) async fn inspect_now(&self, topology: &Topology) -> Result<Vec<Finding>> {
        let id = self.identity().await?.clone();
        let mut findings = Vec::new();
        for spec in &topology.queues {
            findings.extend(self.inspect_queue(spec, &id, topology).await?);
        }
        for t in &topology.topics {
            if !self.topic_exists(&t.name, &id.topic_arn(&t.name)).await? {
                findings.push(Finding::Missing {
                    resource: format!("topic `{}`", t.name),
                });
            }
        }
        for s in &topology.subscriptions {
            findings.extend(self.inspect_subscription(s, &id).await?);
        }
        findings.extend(self.stale_subscriptions(topology, &id).await?);
        if let Some(bucket) = &topology.bucket {
            findings.extend(self.inspect_bucket(bucket).await?);
        }
        Ok(findings)
    }

    /// The resources of `topology` that do not exist, subscriptions included.
    pub(super) async fn missing_now(&self, topology: &Topology) -> Result<Vec<String>> {
        let id = self.identity().await?.clone();
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
            if !self.topic_exists(&t.name, &id.topic_arn(&t.name)).await? {
                missing.push(format!("topic {}", t.name));
            }
        }
        for s in &topology.subscriptions {
            let topic_arn = id.topic_arn(&s.topic);
            if self.topic_exists(&s.topic, &topic_arn).await?
                && self
                    .find_subscription(&s.topic, &topic_arn, &id.queue_arn(&s.queue))
                    .await?
                    .is_none()
            {
                missing.push(format!("subscription {} -> {}", s.topic, s.queue));
            }
        }
        Ok(missing)
    }
}
