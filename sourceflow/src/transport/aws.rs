//! The AWS transport: SQS queues and SNS topics through the official AWS SDK for Rust.
//!
//! Configuration comes from `aws-config`'s standard chain (environment, profile, SSO,
//! instance role), and `AWS_ENDPOINT_URL` (or the per-service variants) points it at an
//! emulator. Clients are built once and shared by every clone of the transport.
//!
//! `provision` is the bootstrapper: it reads the account from STS, then creates what is
//! missing — queues (standard or FIFO with `ContentBasedDeduplication=false`, visibility
//! timeout, retention, a `RedrivePolicy` to each dead-letter queue, and a single-statement
//! access policy that lets exactly the subscribed topics send), topics (standard or FIFO)
//! and subscriptions (`RawMessageDelivery=true`, a filter policy on `sourceflow.type`). An
//! existing resource is compared attribute by attribute and changed only where it differs,
//! so a second start makes no changes. Topic ARNs come from `CreateTopic`, which is
//! idempotent, never from `ListTopics`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::{
    MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use parking_lot::RwLock;
use tokio::sync::OnceCell;

use super::{
    BatchError, EntryError, QueueDepth, QueueSpec, Receive, ReceivedMessage, Topology, Transport,
};
use super::{SNS_MAX_MESSAGE_BYTES, SQS_MAX_MESSAGE_BYTES};
use crate::envelope::{attr, OutgoingMessage};
use crate::error::{BoxError, Error, Result};

/// Longest visibility timeout SQS accepts.
const MAX_VISIBILITY_SECS: u64 = super::MAX_VISIBILITY.as_secs();
/// Retention of a dead-letter queue (the SQS maximum): time to look and redrive.
const DLQ_RETENTION_SECS: u64 = 14 * 24 * 60 * 60;
/// Retention of other queues (the SQS default).
const QUEUE_RETENTION_SECS: u64 = 4 * 24 * 60 * 60;

/// The account, region and partition the transport works in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// AWS account id (from STS `GetCallerIdentity`).
    pub account: String,
    /// Region.
    pub region: String,
    /// Partition (`aws`, `aws-cn`, …).
    pub partition: String,
}

impl Identity {
    /// The ARN of an SQS queue.
    pub fn queue_arn(&self, name: &str) -> String {
        format!(
            "arn:{}:sqs:{}:{}:{name}",
            self.partition, self.region, self.account
        )
    }

    /// The ARN of an SNS topic.
    pub fn topic_arn(&self, name: &str) -> String {
        format!(
            "arn:{}:sns:{}:{}:{name}",
            self.partition, self.region, self.account
        )
    }
}

struct Inner {
    sqs: aws_sdk_sqs::Client,
    sns: aws_sdk_sns::Client,
    sts: aws_sdk_sts::Client,
    region: String,
    identity: OnceCell<Identity>,
    urls: RwLock<HashMap<String, String>>,
    mode: ProvisionMode,
    sends: Batchers<OutgoingMessage>,
    deletes: Batchers<String>,
}

/// Counts the HTTP requests of the SDK clients it is attached to (an SDK interceptor): what
/// AWS bills for. Attach it with [`AwsTransport::from_sdk_config_counted`], or to any SDK
/// client config with `.interceptor(counter.clone())`.
#[derive(Debug, Clone, Default)]
pub struct RequestCounter(Arc<std::sync::atomic::AtomicU64>);

impl RequestCounter {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests counted so far.
    pub fn total(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Back to zero.
    pub fn reset(&self) {
        self.0.store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

impl aws_sdk_sqs::config::Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "sourceflow.request-counter"
    }

    fn read_before_transmit(
        &self,
        _context: &aws_sdk_sqs::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &aws_sdk_sqs::config::RuntimeComponents,
        _cfg: &mut aws_sdk_sqs::config::ConfigBag,
    ) -> std::result::Result<(), aws_sdk_sqs::error::BoxError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// How long a batcher waits for more work before it calls SQS with what it has.
pub const LINGER: Duration = Duration::from_millis(5);

type Job<T> = (Vec<T>, tokio::sync::oneshot::Sender<Result<()>>);
type Batchers<T> = parking_lot::Mutex<HashMap<String, tokio::sync::mpsc::UnboundedSender<Job<T>>>>;

/// What a batcher does with what it gathered.
#[derive(Clone, Copy)]
enum Batch {
    Send,
    Delete,
}

impl Batch {
    fn operation(self) -> &'static str {
        match self {
            Batch::Send => "SendMessageBatch",
            Batch::Delete => "DeleteMessageBatch",
        }
    }
}

/// Gathers jobs for one queue and flushes them together. Ends with the transport.
async fn batch_worker<T: Send + 'static>(
    inner: std::sync::Weak<Inner>,
    queue: String,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Job<T>>,
    kind: Batch,
) where
    Vec<T>: Flush,
{
    while let Some(first) = rx.recv().await {
        let mut count = first.0.len();
        let mut jobs = vec![first];
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while count < 10 {
            tokio::select! {
                biased;
                job = rx.recv() => match job {
                    Some(job) => {
                        count += job.0.len();
                        jobs.push(job);
                    }
                    None => break,
                },
                _ = &mut linger => break,
            }
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let transport = AwsTransport { inner };
        let mut items = Vec::with_capacity(count);
        let mut replies = Vec::with_capacity(jobs.len());
        for (mut job, reply) in jobs {
            items.append(&mut job);
            replies.push(reply);
        }
        let result = items.flush(&transport, &queue).await;
        for reply in replies {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(Error::InvalidReceipt(q)) => Err(Error::InvalidReceipt(q.clone())),
                Err(Error::QueueDoesNotExist(q)) => Err(Error::QueueDoesNotExist(q.clone())),
                Err(e) => Err(transport_error(kind.operation(), e.to_string())),
            };
            let _ = reply.send(r);
        }
    }
}

/// One batch call for what a batcher gathered.
#[async_trait]
trait Flush {
    async fn flush(self, t: &AwsTransport, queue: &str) -> Result<()>;
}

#[async_trait]
impl Flush for Vec<OutgoingMessage> {
    async fn flush(self, t: &AwsTransport, queue: &str) -> Result<()> {
        t.send_now(queue, self).await
    }
}

#[async_trait]
impl Flush for Vec<String> {
    async fn flush(self, t: &AwsTransport, queue: &str) -> Result<()> {
        t.delete_now(queue, self).await
    }
}

/// SQS and SNS through the AWS SDK. Cheap to clone.
#[derive(Clone)]
pub struct AwsTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AwsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsTransport")
            .field("region", &self.inner.region)
            .field("identity", &self.inner.identity.get())
            .finish()
    }
}

fn transport_error(operation: &str, e: impl Into<BoxError>) -> Error {
    Error::Transport {
        transport: "aws",
        operation: operation.to_string(),
        source: e.into(),
    }
}

/// The SDK error with its service message (the SDK's `Display` alone says little). The
/// error type is shared by every SDK crate, so this serves SQS and SNS alike.
fn sdk_error<E, R>(operation: &str, e: aws_sdk_sqs::error::SdkError<E, R>) -> Error
where
    E: std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let text = format!("{}", aws_sdk_sqs::error::DisplayErrorContext(&e));
    transport_error(operation, text)
}

/// The error for entries of a batch call that AWS refused: `(id, code, message)` each.
fn refused<'a>(
    operation: &str,
    entries: impl Iterator<Item = (&'a str, &'a str, Option<&'a str>)>,
) -> Error {
    let why: Vec<String> = entries
        .map(|(id, code, message)| format!("{id}: {code} {}", message.unwrap_or("")))
        .collect();
    transport_error(
        operation,
        format!(
            "{} of the batch were refused: {}",
            why.len(),
            why.join("; ")
        ),
    )
}

fn secs_ceil(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The SDK configuration from the standard AWS chain, with sourceflow's retry and timeout
/// settings; one clear error when no region is configured.
pub(crate) async fn load_sdk_config() -> Result<aws_config::SdkConfig> {
    let cfg = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .retry_config(
            aws_config::retry::RetryConfig::standard()
                .with_max_attempts(5)
                .with_initial_backoff(Duration::from_millis(100)),
        )
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(30))
                .build(),
        )
        .load()
        .await;
    if cfg.region().is_none() {
        return Err(Error::Config(
            "no AWS region is configured: set AWS_REGION (or a profile's region)".into(),
        ));
    }
    Ok(cfg)
}

/// `SOURCEFLOW_PROVISION`, else [`ProvisionMode::Create`].
pub(crate) fn provision_mode_from_env() -> Result<ProvisionMode> {
    match std::env::var("SOURCEFLOW_PROVISION") {
        Ok(m) if !m.is_empty() => m.parse(),
        _ => Ok(ProvisionMode::Create),
    }
}

impl AwsTransport {
    /// A transport from the standard AWS configuration chain. Fails at once, with one clear
    /// error, when no region is configured.
    pub async fn from_env() -> Result<Self> {
        let cfg = load_sdk_config().await?;
        let mode = provision_mode_from_env()?;
        Ok(Self::from_sdk_config(&cfg).provision_mode(mode))
    }

    /// Sets what `provision` does (default: from `SOURCEFLOW_PROVISION` in
    /// [`from_env`](Self::from_env), else create).
    pub fn provision_mode(self, mode: ProvisionMode) -> Self {
        let inner = Inner {
            sqs: self.inner.sqs.clone(),
            sns: self.inner.sns.clone(),
            sts: self.inner.sts.clone(),
            region: self.inner.region.clone(),
            identity: OnceCell::new(),
            urls: RwLock::new(self.inner.urls.read().clone()),
            mode,
            sends: Default::default(),
            deletes: Default::default(),
        };
        AwsTransport {
            inner: Arc::new(inner),
        }
    }

    /// A transport from an SDK configuration.
    pub fn from_sdk_config(cfg: &aws_config::SdkConfig) -> Self {
        AwsTransport {
            inner: Arc::new(Inner {
                sqs: aws_sdk_sqs::Client::new(cfg),
                sns: aws_sdk_sns::Client::new(cfg),
                sts: aws_sdk_sts::Client::new(cfg),
                region: cfg
                    .region()
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "us-east-1".into()),
                identity: OnceCell::new(),
                urls: RwLock::new(HashMap::new()),
                mode: ProvisionMode::Create,
                sends: Default::default(),
                deletes: Default::default(),
            }),
        }
    }

    /// Like [`from_sdk_config`](Self::from_sdk_config), counting every HTTP request the SQS
    /// and SNS clients make (retries included) in `counter`.
    pub fn from_sdk_config_counted(cfg: &aws_config::SdkConfig, counter: &RequestCounter) -> Self {
        let sqs = aws_sdk_sqs::config::Builder::from(cfg)
            .interceptor(counter.clone())
            .build();
        let sns = aws_sdk_sns::config::Builder::from(cfg)
            .interceptor(counter.clone())
            .build();
        let t = Self::from_sdk_config(cfg);
        AwsTransport {
            inner: Arc::new(Inner {
                sqs: aws_sdk_sqs::Client::from_conf(sqs),
                sns: aws_sdk_sns::Client::from_conf(sns),
                sts: t.inner.sts.clone(),
                region: t.inner.region.clone(),
                identity: OnceCell::new(),
                urls: RwLock::new(HashMap::new()),
                mode: ProvisionMode::Create,
                sends: Default::default(),
                deletes: Default::default(),
            }),
        }
    }

    /// The SQS client, for tools and tests.
    pub fn sqs(&self) -> &aws_sdk_sqs::Client {
        &self.inner.sqs
    }

    /// The SNS client, for tools and tests.
    pub fn sns(&self) -> &aws_sdk_sns::Client {
        &self.inner.sns
    }

    /// Account, region and partition, from STS `GetCallerIdentity` (asked once). Missing or
    /// wrong credentials fail here, with one clear error.
    pub async fn identity(&self) -> Result<&Identity> {
        self.inner
            .identity
            .get_or_try_init(|| async {
                let call = self.inner.sts.get_caller_identity().send();
                let out = tokio::time::timeout(Duration::from_secs(20), call)
                    .await
                    .map_err(|_| {
                        Error::Config(
                            "AWS STS did not answer within 20 s: check AWS_ENDPOINT_URL and the network".into(),
                        )
                    })?
                    .map_err(|e| {
                        Error::Config(format!(
                            "AWS credentials are missing or invalid (STS GetCallerIdentity failed): {}",
                            aws_sdk_sts::error::DisplayErrorContext(&e)
                        ))
                    })?;
                let account = out.account().unwrap_or_default().to_string();
                let partition = out
                    .arn()
                    .and_then(|a| a.split(':').nth(1))
                    .unwrap_or("aws")
                    .to_string();
                Ok(Identity {
                    account,
                    region: self.inner.region.clone(),
                    partition,
                })
            })
            .await
    }

    /// The URL of a queue: cached, or from `GetQueueUrl`.
    pub async fn queue_url(&self, name: &str) -> Result<String> {
        if let Some(u) = self.inner.urls.read().get(name) {
            return Ok(u.clone());
        }
        let out = self
            .inner
            .sqs
            .get_queue_url()
            .queue_name(name)
            .send()
            .await
            .map_err(|e| {
                let text = format!("{}", aws_sdk_sqs::error::DisplayErrorContext(&e));
                if text.contains("NonExistentQueue") || text.contains("QueueDoesNotExist") {
                    Error::QueueDoesNotExist(name.to_string())
                } else {
                    transport_error("GetQueueUrl", text)
                }
            })?;
        let url = out
            .queue_url()
            .ok_or_else(|| transport_error("GetQueueUrl", "no URL in the answer"))?
            .to_string();
        self.inner
            .urls
            .write()
            .insert(name.to_string(), url.clone());
        Ok(url)
    }

    async fn topic_arn(&self, name: &str) -> Result<String> {
        Ok(self.identity().await?.topic_arn(name))
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
                .min(MAX_VISIBILITY_SECS)
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
                    .map_err(|e| sdk_error("GetQueueAttributes", e))?;
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
                    req.send()
                        .await
                        .map_err(|e| sdk_error("SetQueueAttributes", e))?;
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
                let out = req.send().await.map_err(|e| sdk_error("CreateQueue", e))?;
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

    /// Sends now, in batches of ten.
    async fn send_now(&self, queue: &str, messages: Vec<OutgoingMessage>) -> Result<()> {
        let url = self.queue_url(queue).await?;
        for chunk in messages.chunks(10) {
            let mut entries = Vec::with_capacity(chunk.len());
            for (i, m) in chunk.iter().enumerate() {
                m.check_size(queue, SQS_MAX_MESSAGE_BYTES)?;
                let mut e = SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(&m.body)
                    .set_message_attributes(Some(sqs_attributes(m)?));
                if let Some(g) = &m.group_id {
                    e = e.message_group_id(g);
                }
                if let Some(d) = &m.dedup_id {
                    e = e.message_deduplication_id(d);
                }
                if let Some(d) = m.delay {
                    e = e.delay_seconds(secs_ceil(d).min(900) as i32);
                }
                entries.push(
                    e.build()
                        .map_err(|e| transport_error("SendMessageBatch", e))?,
                );
            }
            let mut pending = entries;
            for attempt in 0..3 {
                let out = self
                    .inner
                    .sqs
                    .send_message_batch()
                    .queue_url(&url)
                    .set_entries(Some(pending.clone()))
                    .send()
                    .await
                    .map_err(|e| sdk_error("SendMessageBatch", e))?;
                let failed = out.failed();
                if failed.is_empty() {
                    break;
                }
                let retryable: Vec<&str> = failed
                    .iter()
                    .filter(|f| !f.sender_fault())
                    .map(|f| f.id())
                    .collect();
                if retryable.len() < failed.len() || attempt == 2 {
                    return Err(refused(
                        "SendMessageBatch",
                        failed.iter().map(|f| (f.id(), f.code(), f.message())),
                    ));
                }
                pending.retain(|e| retryable.contains(&e.id()));
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            }
        }
        Ok(())
    }

    /// Deletes now, in batches of ten.
    async fn delete_now(&self, queue: &str, receipts: Vec<String>) -> Result<()> {
        use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;
        let url = self.queue_url(queue).await?;
        for chunk in receipts.chunks(10) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r)
                        .build()
                        .map_err(|e| transport_error("DeleteMessageBatch", e))
                })
                .collect::<Result<Vec<_>>>()?;
            let out = self
                .inner
                .sqs
                .delete_message_batch()
                .queue_url(&url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| sdk_error("DeleteMessageBatch", e))?;
            if let Some(f) = out.failed().first() {
                return Err(if f.code().contains("ReceiptHandleIsInvalid") {
                    Error::InvalidReceipt(queue.to_string())
                } else {
                    transport_error(
                        "DeleteMessageBatch",
                        format!("{} {}", f.code(), f.message().unwrap_or("")),
                    )
                });
            }
        }
        Ok(())
    }

    /// Hands `items` to the queue's batcher, which gathers what concurrent callers hand it
    /// for up to [`LINGER`] (or until ten are waiting) and makes one batch call for all.
    async fn coalesce<T: Send + 'static>(
        &self,
        batchers: &Batchers<T>,
        queue: &str,
        items: Vec<T>,
        kind: Batch,
    ) -> Result<()>
    where
        Vec<T>: Flush,
    {
        if items.is_empty() {
            return Ok(());
        }
        let tx = {
            let mut map = batchers.lock();
            map.entry(queue.to_string())
                .or_insert_with(|| {
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    tokio::spawn(batch_worker(
                        Arc::downgrade(&self.inner),
                        queue.to_string(),
                        rx,
                        kind,
                    ));
                    tx
                })
                .clone()
        };
        let (done, result) = tokio::sync::oneshot::channel();
        tx.send((items, done))
            .map_err(|_| transport_error(kind.operation(), "the batcher has stopped"))?;
        result
            .await
            .map_err(|_| transport_error(kind.operation(), "the batcher dropped the request"))?
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
            let arn = id.topic_arn(&t.name);
            match self
                .inner
                .sns
                .get_topic_attributes()
                .topic_arn(&arn)
                .send()
                .await
            {
                Ok(_) => {}
                Err(e) => {
                    let text = format!("{}", aws_sdk_sns::error::DisplayErrorContext(&e));
                    if text.contains("NotFound") {
                        problems.push(format!("topic `{}` is missing", t.name));
                    } else {
                        return Err(transport_error("GetTopicAttributes", text));
                    }
                }
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
}

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

fn sqs_attributes(m: &OutgoingMessage) -> Result<HashMap<String, MessageAttributeValue>> {
    m.attributes
        .iter()
        .map(|(k, v)| {
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value(v)
                .build()
                .map(|a| (k.clone(), a))
                .map_err(|e| transport_error("SendMessage", e))
        })
        .collect()
}

#[async_trait]
impl Transport for AwsTransport {
    fn name(&self) -> &'static str {
        "aws"
    }

    async fn provision(&self, topology: &Topology) -> Result<()> {
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
            req.send().await.map_err(|e| sdk_error("CreateTopic", e))?;
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
            req.send().await.map_err(|e| sdk_error("Subscribe", e))?;
        }
        Ok(())
    }

    async fn send(
        &self,
        queue: &str,
        messages: Vec<OutgoingMessage>,
    ) -> std::result::Result<(), BatchError> {
        let total = messages.len();
        // Sizes first: one oversize message must not fail the batch it would share.
        for m in &messages {
            if let Err(e) = m.check_size(queue, SQS_MAX_MESSAGE_BYTES) {
                return Err(BatchError::all(
                    "SendMessageBatch",
                    queue,
                    total,
                    EntryError::Refused(e.to_string()),
                ));
            }
        }
        self.coalesce(&self.inner.sends, queue, messages, Batch::Send)
            .await
            .map_err(|e| whole("SendMessageBatch", queue, total, e))
    }

    async fn publish(
        &self,
        topic: &str,
        messages: Vec<OutgoingMessage>,
    ) -> std::result::Result<(), BatchError> {
        let total = messages.len();
        self.publish_now(topic, messages)
            .await
            .map_err(|e| whole("PublishBatch", topic, total, e))
    }

    async fn receive(&self, queue: &str, request: Receive) -> Result<Vec<ReceivedMessage>> {
        self.receive_now(queue, request).await
    }

    async fn delete(
        &self,
        queue: &str,
        receipts: Vec<String>,
    ) -> std::result::Result<(), BatchError> {
        let total = receipts.len();
        self.coalesce(&self.inner.deletes, queue, receipts, Batch::Delete)
            .await
            .map_err(|e| whole("DeleteMessageBatch", queue, total, e))
    }

    async fn change_visibility(
        &self,
        queue: &str,
        receipts: Vec<String>,
        timeout: Duration,
    ) -> std::result::Result<(), BatchError> {
        let total = receipts.len();
        let mut failed = Vec::new();
        for (i, r) in receipts.iter().enumerate() {
            if let Err(e) = self.change_visibility_now(queue, r, timeout).await {
                failed.push((i, entry_error(e)));
            }
        }
        if failed.is_empty() {
            return Ok(());
        }
        Err(BatchError {
            operation: "ChangeMessageVisibility",
            destination: queue.to_string(),
            total,
            failed,
        })
    }

    async fn dead_letter(
        &self,
        queue: &str,
        dead_letter_queue: &str,
        message: &ReceivedMessage,
        reason: &str,
    ) -> Result<()> {
        self.dead_letter_now(queue, dead_letter_queue, message, reason)
            .await
    }

    async fn queue_depth(&self, queue: &str) -> Result<Option<QueueDepth>> {
        self.queue_depth_now(queue).await
    }

    async fn missing(&self, topology: &Topology) -> Result<Vec<String>> {
        self.missing_now(topology).await
    }
}

/// A failure of a whole call, reported for each of its `total` entries.
fn whole(operation: &'static str, destination: &str, total: usize, e: Error) -> BatchError {
    match e {
        Error::Batch(b) => b,
        other => BatchError::all(operation, destination, total, entry_error(other)),
    }
}

/// The entry error for a failed call.
fn entry_error(e: Error) -> EntryError {
    match e {
        Error::InvalidReceipt(_) => EntryError::InvalidReceipt,
        Error::QueueDoesNotExist(q) | Error::TopicDoesNotExist(q) => {
            EntryError::NoSuchDestination(q)
        }
        Error::MessageTooLarge { .. } | Error::Unsupported(_) => EntryError::Refused(e.to_string()),
        other => EntryError::Transient(other.to_string()),
    }
}

impl AwsTransport {
    async fn publish_now(&self, topic: &str, messages: Vec<OutgoingMessage>) -> Result<()> {
        use aws_sdk_sns::types::{MessageAttributeValue as SnsAttr, PublishBatchRequestEntry};
        let arn = self.topic_arn(topic).await?;
        for chunk in messages.chunks(10) {
            let mut entries = Vec::with_capacity(chunk.len());
            for (i, m) in chunk.iter().enumerate() {
                m.check_size(topic, SNS_MAX_MESSAGE_BYTES)?;
                let mut attrs = HashMap::new();
                for (k, v) in &m.attributes {
                    attrs.insert(
                        k.clone(),
                        SnsAttr::builder()
                            .data_type("String")
                            .string_value(v)
                            .build()
                            .map_err(|e| transport_error("PublishBatch", e))?,
                    );
                }
                let mut e = PublishBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message(&m.body)
                    .set_message_attributes(Some(attrs));
                if let Some(g) = &m.group_id {
                    e = e.message_group_id(g);
                }
                if let Some(d) = &m.dedup_id {
                    e = e.message_deduplication_id(d);
                }
                entries.push(e.build().map_err(|e| transport_error("PublishBatch", e))?);
            }
            let out = self
                .inner
                .sns
                .publish_batch()
                .topic_arn(&arn)
                .set_publish_batch_request_entries(Some(entries))
                .send()
                .await
                .map_err(|e| sdk_error("PublishBatch", e))?;
            let failed = out.failed();
            if !failed.is_empty() {
                return Err(refused(
                    "PublishBatch",
                    failed.iter().map(|f| (f.id(), f.code(), f.message())),
                ));
            }
        }
        Ok(())
    }

    async fn receive_now(&self, queue: &str, request: Receive) -> Result<Vec<ReceivedMessage>> {
        let (max, wait) = (request.max, request.wait);
        let url = self.queue_url(queue).await?;
        let out = self
            .inner
            .sqs
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(max.clamp(1, 10) as i32)
            .wait_time_seconds(secs_ceil(wait).min(20) as i32)
            .visibility_timeout(secs_ceil(request.visibility).min(MAX_VISIBILITY_SECS) as i32)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
            .send()
            .await
            .map_err(|e| sdk_error("ReceiveMessage", e))?;
        let received_at = tokio::time::Instant::now();
        Ok(out
            .messages()
            .iter()
            .map(|m| {
                let system = m.attributes();
                let get = |n: MessageSystemAttributeName| system.and_then(|s| s.get(&n)).cloned();
                ReceivedMessage {
                    received_at,
                    broker_id: m.message_id().unwrap_or_default().to_string(),
                    receipt: m.receipt_handle().unwrap_or_default().to_string(),
                    body: m.body().unwrap_or_default().to_string(),
                    attributes: m
                        .message_attributes()
                        .map(|a| {
                            let mut v: Vec<(String, String)> = a
                                .iter()
                                .filter_map(|(k, v)| {
                                    Some((k.clone(), v.string_value()?.to_string()))
                                })
                                .collect();
                            v.sort();
                            v
                        })
                        .unwrap_or_default(),
                    receive_count: get(MessageSystemAttributeName::ApproximateReceiveCount)
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(1),
                    group_id: get(MessageSystemAttributeName::MessageGroupId),
                }
            })
            .collect())
    }

    async fn change_visibility_now(
        &self,
        queue: &str,
        receipt: &str,
        timeout: Duration,
    ) -> Result<()> {
        let url = self.queue_url(queue).await?;
        self.inner
            .sqs
            .change_message_visibility()
            .queue_url(&url)
            .receipt_handle(receipt)
            .visibility_timeout(secs_ceil(timeout).min(MAX_VISIBILITY_SECS) as i32)
            .send()
            .await
            .map_err(|e| sdk_error("ChangeMessageVisibility", e))?;
        Ok(())
    }

    async fn dead_letter_now(
        &self,
        queue: &str,
        dlq: &str,
        message: &ReceivedMessage,
        reason: &str,
    ) -> Result<()> {
        let dlq_url = self.queue_url(dlq).await?;
        let mut attributes: HashMap<String, MessageAttributeValue> = HashMap::new();
        for (k, v) in message
            .attributes
            .iter()
            .filter(|(k, _)| k != attr::DLQ_REASON)
            .chain(std::iter::once(&(
                attr::DLQ_REASON.to_string(),
                reason.chars().take(1000).collect(),
            )))
        {
            attributes.insert(
                k.clone(),
                MessageAttributeValue::builder()
                    .data_type("String")
                    .string_value(v)
                    .build()
                    .map_err(|e| transport_error("SendMessage", e))?,
            );
        }
        let mut req = self
            .inner
            .sqs
            .send_message()
            .queue_url(&dlq_url)
            .message_body(&message.body)
            .set_message_attributes(Some(attributes));
        if dlq.ends_with(".fifo") {
            req = req
                .message_group_id(
                    message
                        .group_id
                        .clone()
                        .unwrap_or_else(|| "dead-letter".into()),
                )
                .message_deduplication_id(&message.broker_id);
        }
        req.send().await.map_err(|e| sdk_error("SendMessage", e))?;
        self.coalesce(
            &self.inner.deletes,
            queue,
            vec![message.receipt.clone()],
            Batch::Delete,
        )
        .await
    }

    async fn queue_depth_now(&self, queue: &str) -> Result<Option<QueueDepth>> {
        let url = self.queue_url(queue).await?;
        let out = self
            .inner
            .sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
            .map_err(|e| sdk_error("GetQueueAttributes", e))?;
        let get = |n: QueueAttributeName| {
            out.attributes()
                .and_then(|a| a.get(&n))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok(Some(QueueDepth {
            visible: get(QueueAttributeName::ApproximateNumberOfMessages),
            in_flight: get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
            delayed: get(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
        }))
    }

    async fn missing_now(&self, topology: &Topology) -> Result<Vec<String>> {
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
            if let Err(e) = self
                .inner
                .sns
                .get_topic_attributes()
                .topic_arn(&arn)
                .send()
                .await
            {
                let text = format!("{}", aws_sdk_sns::error::DisplayErrorContext(&e));
                if text.contains("NotFound") {
                    missing.push(format!("topic {}", t.name));
                } else {
                    return Err(transport_error("GetTopicAttributes", text));
                }
            }
        }
        Ok(missing)
    }
}
