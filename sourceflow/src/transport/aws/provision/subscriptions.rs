//! Subscriptions: finding the one of a queue on a topic, creating it or correcting its
//! attributes in place, the stale ones, and removing those (`prune`).

use std::collections::{BTreeMap, HashSet};

use super::super::errors::{aws_error, sdk_error, Resource};
use super::super::{AwsTransport, Identity};
use super::queues::same_json;
use crate::error::Result;
use crate::topology::{Finding, SubscriptionSpec, Topology};

/// The attributes a subscription should have.
fn wanted(spec: &SubscriptionSpec) -> BTreeMap<&'static str, String> {
    let mut a = BTreeMap::new();
    a.insert("RawMessageDelivery", "true".to_string());
    if let Some(f) = &spec.filter {
        a.insert("FilterPolicy", f.to_string());
        a.insert("FilterPolicyScope", "MessageAttributes".to_string());
    }
    a
}

fn resource(spec: &SubscriptionSpec) -> Resource {
    Resource::Subscription {
        topic: spec.topic.clone(),
        queue: spec.queue.clone(),
    }
}

impl AwsTransport {
    /// The ARN of the subscription of `queue_arn` to `topic_arn`, if there is one.
    pub(super) async fn find_subscription(
        &self,
        topic: &str,
        topic_arn: &str,
        queue_arn: &str,
    ) -> Result<Option<String>> {
        let mut token: Option<String> = None;
        loop {
            let out = self
                .inner
                .sns
                .list_subscriptions_by_topic()
                .topic_arn(topic_arn)
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| {
                    sdk_error(
                        "ListSubscriptionsByTopic",
                        Resource::Topic(topic.to_string()),
                        &e,
                    )
                })?;
            let found = out
                .subscriptions()
                .iter()
                .find(|s| s.endpoint() == Some(queue_arn) && s.protocol() == Some("sqs"));
            if let Some(s) = found {
                return Ok(s.subscription_arn().map(str::to_string));
            }
            match out.next_token() {
                Some(t) => token = Some(t.to_string()),
                None => return Ok(None),
            }
        }
    }

    /// `(attribute, current, wanted)` for every attribute of an existing subscription that
    /// differs.
    async fn subscription_differences(
        &self,
        spec: &SubscriptionSpec,
        arn: &str,
    ) -> Result<Vec<(&'static str, String, String)>> {
        let out = self
            .inner
            .sns
            .get_subscription_attributes()
            .subscription_arn(arn)
            .send()
            .await
            .map_err(|e| sdk_error("GetSubscriptionAttributes", resource(spec), &e))?;
        let current = out.attributes().cloned().unwrap_or_default();
        let mut diffs = Vec::new();
        for (k, v) in wanted(spec) {
            let now = current.get(k).cloned();
            let same = match (k, now.as_deref()) {
                ("FilterPolicy", Some(c)) => same_json(c, &v),
                // An unset scope is SNS's default.
                ("FilterPolicyScope", None) => v == "MessageAttributes",
                (_, c) => c == Some(v.as_str()),
            };
            if !same {
                diffs.push((k, now.unwrap_or_else(|| "(unset)".into()), v));
            }
        }
        // A filter this service no longer wants.
        if spec.filter.is_none() && current.get("FilterPolicy").is_some_and(|f| !f.is_empty()) {
            let now = current.get("FilterPolicy").cloned().unwrap_or_default();
            diffs.push(("FilterPolicy", now, String::new()));
        }
        Ok(diffs)
    }

    /// Subscribes the queue, or corrects the existing subscription's attributes in place.
    pub(super) async fn ensure_subscription(
        &self,
        spec: &SubscriptionSpec,
        id: &Identity,
    ) -> Result<()> {
        let (topic_arn, queue_arn) = (id.topic_arn(&spec.topic), id.queue_arn(&spec.queue));
        let Some(arn) = self
            .find_subscription(&spec.topic, &topic_arn, &queue_arn)
            .await?
        else {
            let mut req = self
                .inner
                .sns
                .subscribe()
                .topic_arn(&topic_arn)
                .protocol("sqs")
                .endpoint(&queue_arn)
                .return_subscription_arn(true);
            for (k, v) in wanted(spec) {
                req = req.attributes(k, v);
            }
            req.send()
                .await
                .map_err(|e| sdk_error("Subscribe", resource(spec), &e))?;
            tracing::info!(topic = %spec.topic, queue = %spec.queue, "subscribed");
            return Ok(());
        };
        for (k, _, v) in self.subscription_differences(spec, &arn).await? {
            self.inner
                .sns
                .set_subscription_attributes()
                .subscription_arn(&arn)
                .attribute_name(k)
                .attribute_value(v)
                .send()
                .await
                .map_err(|e| sdk_error("SetSubscriptionAttributes", resource(spec), &e))?;
            tracing::info!(topic = %spec.topic, queue = %spec.queue, attribute = k, "subscription corrected");
        }
        Ok(())
    }

    /// How a subscription differs: missing, or its attributes.
    pub(super) async fn inspect_subscription(
        &self,
        spec: &SubscriptionSpec,
        id: &Identity,
    ) -> Result<Vec<Finding>> {
        let name = format!(
            "subscription of queue `{}` to topic `{}`",
            spec.queue, spec.topic
        );
        let topic_arn = id.topic_arn(&spec.topic);
        if !self.topic_exists(&spec.topic, &topic_arn).await? {
            // The topic's own finding says it all.
            return Ok(vec![Finding::Missing { resource: name }]);
        }
        let queue_arn = id.queue_arn(&spec.queue);
        let Some(arn) = self
            .find_subscription(&spec.topic, &topic_arn, &queue_arn)
            .await?
        else {
            return Ok(vec![Finding::Missing { resource: name }]);
        };
        Ok(self
            .subscription_differences(spec, &arn)
            .await?
            .into_iter()
            .map(|(attribute, current, wanted)| Finding::Differs {
                resource: name.clone(),
                attribute: attribute.to_string(),
                current,
                wanted,
            })
            .collect())
    }

    /// Subscriptions of this service's queues — those it consumes, and those named like its
    /// subscriber queues — to topics its routes do not subscribe them to.
    pub(super) async fn stale_subscriptions(
        &self,
        topology: &Topology,
        id: &Identity,
    ) -> Result<Vec<Finding>> {
        let wanted: HashSet<(String, String)> = topology
            .subscriptions
            .iter()
            .map(|s| (id.topic_arn(&s.topic), id.queue_arn(&s.queue)))
            .collect();
        let ours: HashSet<String> = topology.consumed().map(|q| id.queue_arn(&q.name)).collect();
        let prefix = topology.subscriber_prefix.as_ref().map(|p| id.queue_arn(p));
        let mut stale = Vec::new();
        for (topic_arn, endpoint) in self.all_sqs_subscriptions().await? {
            let mine = ours.contains(&endpoint)
                || prefix
                    .as_ref()
                    .is_some_and(|p| endpoint.starts_with(p.as_str()));
            if mine && !wanted.contains(&(topic_arn.clone(), endpoint.clone())) {
                stale.push(Finding::Stale {
                    topic: last_segment(&topic_arn),
                    queue: last_segment(&endpoint),
                });
            }
        }
        Ok(stale)
    }

    /// Every SQS subscription of the account and region: `(topic ARN, queue ARN)`.
    async fn all_sqs_subscriptions(&self) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .inner
                .sns
                .list_subscriptions()
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| sdk_error("ListSubscriptions", Resource::Account, &e))?;
            for s in page.subscriptions() {
                if let (Some("sqs"), Some(t), Some(q)) = (s.protocol(), s.topic_arn(), s.endpoint())
                {
                    out.push((t.to_string(), q.to_string()));
                }
            }
            match page.next_token() {
                Some(t) => token = Some(t.to_string()),
                None => return Ok(out),
            }
        }
    }

    /// Removes the subscription of `queue` to `topic`; not finding it is no error.
    pub(in crate::transport::aws) async fn unsubscribe_now(
        &self,
        topic: &str,
        queue: &str,
    ) -> Result<()> {
        let id = self.identity().await?.clone();
        let topic_arn = id.topic_arn(topic);
        let Some(arn) = self
            .find_subscription(topic, &topic_arn, &id.queue_arn(queue))
            .await?
        else {
            return Ok(());
        };
        self.inner
            .sns
            .unsubscribe()
            .subscription_arn(&arn)
            .send()
            .await
            .map_err(|e| {
                let r = Resource::Subscription {
                    topic: topic.to_string(),
                    queue: queue.to_string(),
                };
                aws_error("Unsubscribe", r, &e).into_error("Unsubscribe")
            })?;
        tracing::info!(topic, queue, "unsubscribed");
        Ok(())
    }
}

/// `name` of `arn:aws:sqs:region:account:name`.
fn last_segment(arn: &str) -> String {
    arn.rsplit(':').next().unwrap_or(arn).to_string()
}
