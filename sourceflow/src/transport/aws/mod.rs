//! The AWS transport: SQS queues and SNS topics through the official AWS SDK for Rust.
//!
//! Configuration comes from `aws-config`'s standard chain (environment, profile, SSO,
//! instance role), and `AWS_ENDPOINT_URL` (or the per-service variants) points it at an
//! emulator. Clients are built once and shared by every clone of the transport.
//!
//! The data plane reports per entry, as [`Transport`] asks:
//!
//! * **Checks before the wire.** An entry SQS or SNS would refuse (over the size limit, a
//!   delay over [`MAX_DELAY`](crate::transport::MAX_DELAY), a delay on a FIFO queue or on
//!   any topic, a visibility timeout over 12 hours) is refused alone, and never clamped:
//!   emulators accept some of these, AWS does not.
//! * **Coalescing** (`batcher`). Sends, publishes, deletes and visibility changes of
//!   concurrent callers for one destination share batch calls; each caller hears only about
//!   its own entries, indexed as it gave them.
//! * **Batch calls** (`sqs`, `sns`) of at most 10 entries and the service's payload limit
//!   (1 MiB for SQS, 256 KiB for SNS), with the entries that failed transiently retried on
//!   their own (`retry`); nothing done is done twice.
//! * **One-line errors** (`errors`): operation, resource, AWS code and message.
//!
//! `provision` (the bootstrapper) lives in `provision`; the claim check's object store
//! (S3) in `s3`.

mod batcher;
mod errors;
#[cfg(test)]
mod fake;
mod provision;
mod retry;
mod s3;
mod sns;
mod sqs;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::RwLock;
use tokio::sync::OnceCell;

pub(crate) use self::provision::provision_mode_from_env;
pub use self::provision::ProvisionMode;

use self::batcher::{reindex, Batchers, Failures};
use self::errors::{aws_error, sdk_error, Resource};
use self::sns::PublishFlush;
use self::sqs::{DeleteFlush, SendFlush, VisibilityFlush};
use super::{
    BatchError, EntryError, GroupHold, QueueDepth, Receipt, Receive, ReceivedMessage, Topology,
    Transport,
};
use crate::envelope::OutgoingMessage;
use crate::error::{Error, Result};

/// The AWS transport's [`Transport::receive_linger`].
pub const RECEIVE_LINGER: Duration = Duration::from_millis(50);

/// How long a batcher waits for more work before it calls SQS or SNS with what it has.
pub const LINGER: Duration = Duration::from_millis(5);

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
    sends: Batchers<SendFlush>,
    publishes: Batchers<PublishFlush>,
    deletes: Batchers<DeleteFlush>,
    visibility: Batchers<VisibilityFlush>,
}

impl Inner {
    fn new(
        sqs: aws_sdk_sqs::Client,
        sns: aws_sdk_sns::Client,
        sts: aws_sdk_sts::Client,
        region: String,
        mode: ProvisionMode,
        urls: HashMap<String, String>,
    ) -> Self {
        Inner {
            sqs,
            sns,
            sts,
            region,
            identity: OnceCell::new(),
            urls: RwLock::new(urls),
            mode,
            sends: Batchers::default(),
            publishes: Batchers::default(),
            deletes: Batchers::default(),
            visibility: Batchers::default(),
        }
    }
}

/// Counts the HTTP requests of the SDK clients it is attached to (an SDK interceptor): what
/// AWS bills for. Attach it with [`AwsTransport::from_sdk_config_counted`], or to any SDK
/// client config with `.interceptor(counter.clone())`.
#[derive(Debug, Clone, Default)]
pub struct RequestCounter(Arc<Counts>);

#[derive(Debug, Default)]
struct Counts {
    total: std::sync::atomic::AtomicU64,
    by_operation: parking_lot::Mutex<HashMap<String, u64>>,
}

impl RequestCounter {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests counted so far.
    pub fn total(&self) -> u64 {
        self.0.total.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Requests counted so far by API operation (`SendMessageBatch`, `ReceiveMessage`,
    /// `PublishBatch`, …), most first; `unknown` for a request whose operation could not
    /// be read.
    pub fn by_operation(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .0
            .by_operation
            .lock()
            .iter()
            .map(|(op, n)| (op.clone(), *n))
            .collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out
    }

    /// Back to zero.
    pub fn reset(&self) {
        self.0.total.store(0, std::sync::atomic::Ordering::Relaxed);
        self.0.by_operation.lock().clear();
    }
}

/// The API operation of a request: SQS (JSON protocol) names it in `X-Amz-Target`
/// (`AmazonSQS.ReceiveMessage`), SNS (query protocol) in the body's `Action=` field; S3
/// (REST) by its method, the claim check's only calls being `PutObject` and `GetObject`.
fn operation_of<'a>(target: Option<&'a str>, body: Option<&'a [u8]>, method: &str) -> &'a str {
    if let Some(target) = target {
        return target.rsplit('.').next().unwrap_or(target);
    }
    match method {
        "PUT" => return "PutObject",
        "GET" => return "GetObject",
        _ => {}
    }
    body.and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|form| form.split('&').find_map(|kv| kv.strip_prefix("Action=")))
        .unwrap_or("unknown")
}

impl aws_sdk_sqs::config::Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "sourceflow.request-counter"
    }

    fn read_before_transmit(
        &self,
        context: &aws_sdk_sqs::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &aws_sdk_sqs::config::RuntimeComponents,
        _cfg: &mut aws_sdk_sqs::config::ConfigBag,
    ) -> std::result::Result<(), aws_sdk_sqs::error::BoxError> {
        self.0
            .total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let request = context.request();
        let op = operation_of(
            request.headers().get("x-amz-target"),
            request.body().bytes(),
            request.method(),
        );
        let mut counts = self.0.by_operation.lock();
        match counts.get_mut(op) {
            Some(n) => *n += 1,
            None => {
                counts.insert(op.to_string(), 1);
            }
        }
        Ok(())
    }
}

pub use s3::S3ObjectStore;

/// SQS and SNS through the AWS SDK, and S3 for large payloads. Cheap to clone.
#[derive(Clone)]
pub struct AwsTransport {
    inner: Arc<Inner>,
    /// The claim check's object store; `None` for a transport built from SQS/SNS clients
    /// alone (see [`with_object_store`](Self::with_object_store)).
    s3: Option<S3ObjectStore>,
}

impl std::fmt::Debug for AwsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsTransport")
            .field("region", &self.inner.region)
            .field("identity", &self.inner.identity.get())
            .finish()
    }
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
        let i = &self.inner;
        AwsTransport {
            inner: Arc::new(Inner::new(
                i.sqs.clone(),
                i.sns.clone(),
                i.sts.clone(),
                i.region.clone(),
                mode,
                i.urls.read().clone(),
            )),
            s3: self.s3.clone(),
        }
    }

    /// With this object store for large payloads ([`crate::claim_check`]).
    pub fn with_object_store(mut self, store: S3ObjectStore) -> Self {
        self.s3 = Some(store);
        self
    }

    /// The S3 object store, for tools and tests.
    pub fn s3(&self) -> Option<&S3ObjectStore> {
        self.s3.as_ref()
    }

    /// A transport from an SDK configuration.
    pub fn from_sdk_config(cfg: &aws_config::SdkConfig) -> Self {
        Self::from_clients(
            aws_sdk_sqs::Client::new(cfg),
            aws_sdk_sns::Client::new(cfg),
            aws_sdk_sts::Client::new(cfg),
        )
        .with_object_store(S3ObjectStore::from_sdk_config(cfg))
    }

    /// Like [`from_sdk_config`](Self::from_sdk_config), counting every HTTP request the SQS,
    /// SNS and S3 clients make (retries included) in `counter`.
    pub fn from_sdk_config_counted(cfg: &aws_config::SdkConfig, counter: &RequestCounter) -> Self {
        let sqs = aws_sdk_sqs::config::Builder::from(cfg)
            .interceptor(counter.clone())
            .build();
        let sns = aws_sdk_sns::config::Builder::from(cfg)
            .interceptor(counter.clone())
            .build();
        Self::from_clients(
            aws_sdk_sqs::Client::from_conf(sqs),
            aws_sdk_sns::Client::from_conf(sns),
            aws_sdk_sts::Client::new(cfg),
        )
        .with_object_store(S3ObjectStore::new(s3::client(cfg, Some(counter))))
    }

    /// A transport from clients configured by the caller (their own interceptors, retry
    /// settings or HTTP client). The region is the SQS client's.
    pub fn from_clients(
        sqs: aws_sdk_sqs::Client,
        sns: aws_sdk_sns::Client,
        sts: aws_sdk_sts::Client,
    ) -> Self {
        let region = sqs
            .config()
            .region()
            .map(|r| r.to_string())
            .unwrap_or_else(|| "us-east-1".into());
        AwsTransport {
            inner: Arc::new(Inner::new(
                sqs,
                sns,
                sts,
                region,
                ProvisionMode::Create,
                HashMap::new(),
            )),
            s3: None,
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
                        let e = aws_error("GetCallerIdentity", Resource::Account, &e);
                        Error::Config(format!(
                            "AWS credentials are missing or invalid (STS GetCallerIdentity failed): {}",
                            e.detail()
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
            .map_err(|e| sdk_error("GetQueueUrl", Resource::Queue(name.to_string()), &e))?;
        let url = out
            .queue_url()
            .ok_or_else(|| Error::Transport {
                transport: "aws",
                operation: "GetQueueUrl".into(),
                source: format!("queue `{name}`: no URL in the answer").into(),
            })?
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

    /// Forgets a queue's URL after SQS said the queue does not exist (it may be created
    /// again, under another URL on some emulators).
    fn forget_url_if_missing(&self, queue: &str, failures: &Failures) {
        if failures
            .iter()
            .any(|(_, e)| matches!(e, EntryError::NoSuchDestination(_)))
        {
            self.inner.urls.write().remove(queue);
        }
    }

    /// The URL of a queue for a batch call of `positions.len()` entries: on failure, every
    /// one of them fails with the reason.
    async fn url_for(
        &self,
        queue: &str,
        positions: &[usize],
    ) -> std::result::Result<String, Failures> {
        self.queue_url(queue).await.map_err(|e| {
            let why = entry_error(e);
            positions.iter().map(|i| (*i, why.clone())).collect()
        })
    }

    /// Deletes through the queue's batcher; failures indexed as `receipts`.
    async fn delete_entries(&self, queue: &str, receipts: Vec<Receipt>) -> Failures {
        if receipts.is_empty() {
            return Vec::new();
        }
        let positions: Vec<usize> = (0..receipts.len()).collect();
        let url = match self.url_for(queue, &positions).await {
            Ok(url) => url,
            Err(failures) => return failures,
        };
        let failures = self
            .inner
            .deletes
            .submit(queue, receipts, || DeleteFlush {
                sqs: self.inner.sqs.clone(),
                queue: queue.to_string(),
                url,
            })
            .await;
        self.forget_url_if_missing(queue, &failures);
        failures
    }
}

/// The entry error for a call that failed before any batch call (a URL or ARN lookup).
fn entry_error(e: Error) -> EntryError {
    match e {
        Error::QueueDoesNotExist(q) | Error::TopicDoesNotExist(q) => {
            EntryError::NoSuchDestination(q)
        }
        Error::InvalidReceipt(_) => EntryError::InvalidReceipt,
        other => EntryError::Transient(errors::one_line(&other.to_string())),
    }
}

/// `Ok` when nothing failed, else the caller's [`BatchError`].
fn outcome(
    operation: &'static str,
    destination: &str,
    total: usize,
    mut failed: Failures,
) -> std::result::Result<(), BatchError> {
    if failed.is_empty() {
        return Ok(());
    }
    failed.sort_by_key(|(i, _)| *i);
    Err(BatchError {
        operation,
        destination: destination.to_string(),
        total,
        failed,
    })
}

/// [`checked`] for messages to send or publish: a refused message also holds back the
/// later messages of its FIFO group (see [`GroupHold`]).
fn checked_messages(
    messages: Vec<OutgoingMessage>,
    mut check: impl FnMut(&OutgoingMessage) -> std::result::Result<(), EntryError>,
) -> (Vec<OutgoingMessage>, Vec<usize>, Failures) {
    let mut hold = GroupHold::default();
    checked(messages, |m| {
        if let Some(held) = hold.check(m) {
            return Err(held);
        }
        check(m).inspect_err(|_| hold.stop(m))
    })
}

/// Splits a caller's entries into those to send and those refused by `check`; the first
/// comes with each kept entry's position in the caller's input.
fn checked<T>(
    entries: Vec<T>,
    mut check: impl FnMut(&T) -> std::result::Result<(), EntryError>,
) -> (Vec<T>, Vec<usize>, Failures) {
    let mut kept = Vec::with_capacity(entries.len());
    let mut positions = Vec::with_capacity(entries.len());
    let mut refused = Vec::new();
    for (i, e) in entries.into_iter().enumerate() {
        match check(&e) {
            Ok(()) => {
                kept.push(e);
                positions.push(i);
            }
            Err(why) => refused.push((i, why)),
        }
    }
    (kept, positions, refused)
}

#[async_trait]
impl Transport for AwsTransport {
    fn name(&self) -> &'static str {
        "aws"
    }

    async fn provision(&self, topology: &Topology) -> Result<()> {
        self.provision_now(topology).await
    }

    fn object_store(&self) -> Option<Arc<dyn crate::claim_check::ObjectStore>> {
        self.s3
            .clone()
            .map(|s| Arc::new(s) as Arc<dyn crate::claim_check::ObjectStore>)
    }

    /// 50 ms: each receive is a billed request, and under load a pause this short lets one
    /// receive take a full batch instead of several taking one or two each.
    fn receive_linger(&self) -> Duration {
        RECEIVE_LINGER
    }

    async fn send(
        &self,
        queue: &str,
        messages: Vec<OutgoingMessage>,
    ) -> std::result::Result<(), BatchError> {
        let total = messages.len();
        let (kept, positions, mut failed) =
            checked_messages(messages, |m| sqs::check_send(queue, m));
        if !kept.is_empty() {
            match self.url_for(queue, &positions).await {
                Ok(url) => {
                    let f = self
                        .inner
                        .sends
                        .submit(queue, kept, || SendFlush {
                            sqs: self.inner.sqs.clone(),
                            queue: queue.to_string(),
                            url,
                        })
                        .await;
                    self.forget_url_if_missing(queue, &f);
                    failed.extend(reindex(f, &positions));
                }
                Err(f) => failed.extend(f),
            }
        }
        outcome("SendMessageBatch", queue, total, failed)
    }

    async fn publish(
        &self,
        topic: &str,
        messages: Vec<OutgoingMessage>,
    ) -> std::result::Result<(), BatchError> {
        let total = messages.len();
        let (kept, positions, mut failed) =
            checked_messages(messages, |m| sns::check_publish(topic, m));
        if !kept.is_empty() {
            match self.topic_arn(topic).await {
                Ok(arn) => {
                    let f = self
                        .inner
                        .publishes
                        .submit(topic, kept, || PublishFlush {
                            sns: self.inner.sns.clone(),
                            topic: topic.to_string(),
                            arn,
                        })
                        .await;
                    failed.extend(reindex(f, &positions));
                }
                Err(e) => {
                    let why = entry_error(e);
                    failed.extend(positions.iter().map(|i| (*i, why.clone())));
                }
            }
        }
        outcome("PublishBatch", topic, total, failed)
    }

    async fn receive(&self, queue: &str, request: Receive) -> Result<Vec<ReceivedMessage>> {
        let url = self.queue_url(queue).await?;
        let result = sqs::receive(&self.inner.sqs, queue, &url, request).await;
        if let Err(Error::QueueDoesNotExist(_)) = &result {
            self.inner.urls.write().remove(queue);
        }
        result
    }

    async fn delete(
        &self,
        queue: &str,
        receipts: Vec<Receipt>,
    ) -> std::result::Result<(), BatchError> {
        let total = receipts.len();
        let failed = self.delete_entries(queue, receipts).await;
        outcome("DeleteMessageBatch", queue, total, failed)
    }

    async fn change_visibility(
        &self,
        queue: &str,
        receipts: Vec<Receipt>,
        timeout: Duration,
    ) -> std::result::Result<(), BatchError> {
        const OPERATION: &str = "ChangeMessageVisibilityBatch";
        let total = receipts.len();
        if total == 0 {
            return Ok(());
        }
        let seconds = sqs::check_visibility(timeout)
            .map_err(|why| BatchError::all(OPERATION, queue, total, why))?;
        let positions: Vec<usize> = (0..total).collect();
        let failed = match self.url_for(queue, &positions).await {
            Ok(url) => {
                let changes = receipts.into_iter().map(|r| (r, seconds)).collect();
                let f = self
                    .inner
                    .visibility
                    .submit(queue, changes, || VisibilityFlush {
                        sqs: self.inner.sqs.clone(),
                        queue: queue.to_string(),
                        url,
                    })
                    .await;
                self.forget_url_if_missing(queue, &f);
                f
            }
            Err(f) => f,
        };
        outcome(OPERATION, queue, total, failed)
    }

    /// Sends a copy to `dead_letter_queue` (`SendMessage`; on a FIFO queue in the message's
    /// group, deduplicated by the broker's message id), then deletes the original through
    /// the delete batcher. If the delete fails the error says so: the copy is in the
    /// dead-letter queue, and the original will be received again and moved again (a second
    /// copy; on a FIFO dead-letter queue within the deduplication window, a duplicate that
    /// SQS drops).
    async fn dead_letter(
        &self,
        queue: &str,
        dead_letter_queue: &str,
        message: &ReceivedMessage,
        reason: &str,
    ) -> Result<()> {
        let dlq_url = self.queue_url(dead_letter_queue).await?;
        sqs::copy_to_dead_letter(
            &self.inner.sqs,
            dead_letter_queue,
            &dlq_url,
            message,
            reason,
        )
        .await?;
        let failed = self
            .delete_entries(queue, vec![message.receipt.clone()])
            .await;
        match failed.into_iter().next() {
            None => Ok(()),
            Some((_, why)) => Err(Error::Transport {
                transport: "aws",
                operation: "DeleteMessageBatch".into(),
                source: format!(
                    "queue `{queue}`: the message was copied to `{dead_letter_queue}` but not deleted ({why}); it will be received again and dead-lettered again"
                )
                .into(),
            }),
        }
    }

    async fn queue_depth(&self, queue: &str) -> Result<Option<QueueDepth>> {
        let url = self.queue_url(queue).await?;
        Ok(Some(sqs::depth(&self.inner.sqs, queue, &url).await?))
    }

    async fn missing(&self, topology: &Topology) -> Result<Vec<String>> {
        self.missing_now(topology).await
    }

    async fn inspect(&self, topology: &Topology) -> Result<Vec<crate::topology::Finding>> {
        self.inspect_now(topology).await
    }

    async fn unsubscribe(&self, topic: &str, queue: &str) -> Result<()> {
        self.unsubscribe_now(topic, queue).await
    }
}
