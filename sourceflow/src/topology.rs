//! The resources a service needs, as its compiled routes describe them: one model that
//! drives provisioning, validation, health, the IAM policy and the exports.
//!
//! **Ownership.** A service owns the queues it *consumes*: their settings, dead-letter
//! queues, redrive policies, access policies and subscriptions are created and corrected
//! to match its routes. Queues it only *sends to* are made sure to exist — created with the
//! settings the command type declares when missing, never corrected afterwards (the
//! consuming service owns them). Topics are created idempotently by every service that
//! publishes or subscribes.

use std::collections::BTreeMap;
use std::time::Duration;

/// Retention of a queue unless its route says otherwise (the SQS default, 4 days).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(4 * 24 * 60 * 60);
/// Retention of a dead-letter queue (the SQS maximum, 14 days): time to look and redrive.
pub const DEAD_LETTER_RETENTION: Duration = Duration::from_secs(14 * 24 * 60 * 60);

/// Everything a service needs to exist before it sends or listens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    /// Queues, dead-letter queues included (listed before the queues that use them).
    pub queues: Vec<QueueSpec>,
    /// Topics.
    pub topics: Vec<TopicSpec>,
    /// Subscriptions of this service's queues to topics.
    pub subscriptions: Vec<SubscriptionSpec>,
    /// The name every subscriber queue of this service starts with (`{prefix}-{service}-`),
    /// to find subscriptions it no longer needs; `None` when unknown.
    pub subscriber_prefix: Option<String>,
    /// The bucket large payloads go to ([`crate::claim_check`]), when the claim check is on.
    pub bucket: Option<BucketSpec>,
}

/// The claim check's bucket: created in `create` mode with a lifecycle rule that expires
/// the service's stored payloads, checked by `validate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketSpec {
    /// The bucket's name.
    pub name: String,
    /// The key prefix this service writes under (no trailing `/`).
    pub prefix: String,
    /// Days after which stored payloads expire (the lifecycle rule's `Expiration`).
    pub expiration_days: u32,
}

impl BucketSpec {
    /// The id of the lifecycle rule sourceflow keeps on the bucket for `prefix`.
    pub fn rule_id(&self) -> String {
        format!("sourceflow-expire-{}", self.prefix.replace('/', "-"))
    }
}

impl Topology {
    /// The queue named `name`.
    pub fn queue(&self, name: &str) -> Option<&QueueSpec> {
        self.queues.iter().find(|q| q.name == name)
    }

    /// The queues this service consumes (not their dead-letter queues).
    pub fn consumed(&self) -> impl Iterator<Item = &QueueSpec> {
        self.queues
            .iter()
            .filter(|q| q.ownership == Ownership::Consumed && q.dead_letter.is_some())
    }

    /// The topics `queue` is subscribed to, sorted, each once.
    pub fn topics_of(&self, queue: &str) -> Vec<&str> {
        let mut topics: Vec<&str> = self
            .subscriptions
            .iter()
            .filter(|s| s.queue == queue)
            .map(|s| s.topic.as_str())
            .collect();
        topics.sort_unstable();
        topics.dedup();
        topics
    }

    /// The access policy of `queue`: one statement letting exactly the topics it is
    /// subscribed to send to it (`aws:SourceArn`), far below the 20-statement and 8 KB
    /// limits; `None` for a queue subscribed to nothing. ARNs come from `queue_arn` and
    /// `topic_arn`, so the provisioner (ARN strings) and the CloudFormation export
    /// (`Fn::GetAtt`/`Ref`) write the same document.
    pub fn access_policy(
        &self,
        queue: &str,
        queue_arn: serde_json::Value,
        topic_arn: impl FnMut(&str) -> serde_json::Value,
    ) -> Option<serde_json::Value> {
        let topics = self.topics_of(queue);
        if topics.is_empty() {
            return None;
        }
        let sources: Vec<serde_json::Value> = topics.into_iter().map(topic_arn).collect();
        Some(serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Sid": "sourceflow-topics",
                "Effect": "Allow",
                "Principal": {"Service": "sns.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": sources}},
            }],
        }))
    }
}

/// Who creates and corrects a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// This service consumes it (or it is the dead-letter queue of one it consumes):
    /// created, and corrected when its attributes differ.
    Consumed,
    /// This service only sends to it: created with the declared settings when missing,
    /// never corrected (its consumer owns it).
    SendOnly,
}

/// A queue to provision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    /// Full name, prefix included.
    pub name: String,
    /// FIFO queue (name ends in `.fifo`).
    pub fifo: bool,
    /// Who creates and corrects it.
    pub ownership: Ownership,
    /// Its attributes.
    pub settings: QueueSettings,
    /// Its dead-letter queue and the receive count after which the broker moves messages
    /// there. `None` for a dead-letter queue itself.
    pub dead_letter: Option<DeadLetterSpec>,
}

impl QueueSpec {
    /// A consumed queue with default settings, FIFO when the name ends in `.fifo`.
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        QueueSpec {
            fifo: name.ends_with(".fifo"),
            name,
            ownership: Ownership::Consumed,
            settings: QueueSettings::default(),
            dead_letter: None,
        }
    }

    /// With a dead-letter queue after `max_receive_count` receives.
    pub fn with_dead_letter(mut self, queue: impl Into<String>, max_receive_count: u32) -> Self {
        self.dead_letter = Some(DeadLetterSpec {
            queue: queue.into(),
            max_receive_count,
        });
        self
    }

    /// With these settings.
    pub fn with_settings(mut self, settings: QueueSettings) -> Self {
        self.settings = settings;
        self
    }

    /// With this ownership.
    pub fn owned_as(mut self, ownership: Ownership) -> Self {
        self.ownership = ownership;
        self
    }
}

/// A queue's attributes, from its route (or the builder's defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSettings {
    /// `VisibilityTimeout`: how long a received message stays invisible.
    pub visibility_timeout: Duration,
    /// `MessageRetentionPeriod`.
    pub retention: Duration,
    /// `DelaySeconds`: every message's delivery is delayed this much.
    pub delay: Duration,
    /// FIFO high throughput: `DeduplicationScope=messageGroup`,
    /// `FifoThroughputLimit=perMessageGroupId`.
    pub high_throughput: bool,
    /// Server-side encryption at rest.
    pub encryption: ServerSideEncryption,
    /// Resource tags.
    pub tags: BTreeMap<String, String>,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            visibility_timeout: Duration::from_secs(30),
            retention: DEFAULT_RETENTION,
            delay: Duration::ZERO,
            high_throughput: false,
            encryption: ServerSideEncryption::SqsManaged,
            tags: BTreeMap::new(),
        }
    }
}

/// How SQS encrypts a queue's messages at rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerSideEncryption {
    /// SQS-managed keys (`SqsManagedSseEnabled=true`; SQS's default for new queues).
    SqsManaged,
    /// A KMS key (`KmsMasterKeyId`): its id, ARN or alias.
    Kms(String),
    /// None (`SqsManagedSseEnabled=false`).
    Disabled,
}

/// Where a queue's messages go after too many receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterSpec {
    /// The dead-letter queue's full name.
    pub queue: String,
    /// Receives after which the broker moves a message (SQS `maxReceiveCount`): sourceflow's
    /// safety net above its own handler attempts.
    pub max_receive_count: u32,
}

/// A topic to provision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// Full name, prefix included.
    pub name: String,
    /// FIFO topic (name ends in `.fifo`).
    pub fifo: bool,
}

impl TopicSpec {
    /// A topic, FIFO when the name ends in `.fifo`.
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        TopicSpec {
            fifo: name.ends_with(".fifo"),
            name,
        }
    }
}

/// A subscription of a queue to a topic, with raw message delivery and a filter policy on
/// message attributes (`FilterPolicyScope=MessageAttributes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionSpec {
    /// Topic full name.
    pub topic: String,
    /// Queue full name.
    pub queue: String,
    /// The SNS filter policy (a JSON object); `None` delivers everything.
    pub filter: Option<serde_json::Value>,
}

impl SubscriptionSpec {
    /// A subscription that delivers everything.
    pub fn new(topic: impl Into<String>, queue: impl Into<String>) -> Self {
        SubscriptionSpec {
            topic: topic.into(),
            queue: queue.into(),
            filter: None,
        }
    }

    /// Delivers only these wire names (a filter on the `sourceflow.type` attribute).
    pub fn types<I: IntoIterator<Item = S>, S: Into<String>>(mut self, types: I) -> Self {
        let types: Vec<String> = types.into_iter().map(Into::into).collect();
        self.filter =
            (!types.is_empty()).then(|| serde_json::json!({ crate::envelope::attr::TYPE: types }));
        self
    }

    /// With this filter policy (`None`: everything).
    pub fn filtered(mut self, filter: Option<serde_json::Value>) -> Self {
        self.filter = filter;
        self
    }
}

/// A difference between what the broker has and what the topology needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The resource does not exist.
    Missing {
        /// `queue x`, `topic y`, `subscription of queue x to topic y`.
        resource: String,
    },
    /// An attribute of an owned resource differs.
    Differs {
        /// The resource, as in [`Finding::Missing`].
        resource: String,
        /// The attribute (`VisibilityTimeout`, `FilterPolicy`, a tag, …).
        attribute: String,
        /// What it is.
        current: String,
        /// What the routes want.
        wanted: String,
    },
    /// A subscription of one of this service's queues to a topic it no longer handles:
    /// removed only by `prune`, never at startup.
    Stale {
        /// The topic's full name.
        topic: String,
        /// The queue's full name.
        queue: String,
    },
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::Missing { resource } => write!(f, "{resource} is missing"),
            Finding::Differs {
                resource,
                attribute,
                current,
                wanted,
            } => write!(f, "{resource}: {attribute} is {current}, expected {wanted}"),
            Finding::Stale { topic, queue } => write!(
                f,
                "queue `{queue}` is still subscribed to topic `{topic}`, which no handler of this service needs (`prune` removes it)"
            ),
        }
    }
}
