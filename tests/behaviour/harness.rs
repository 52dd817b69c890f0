//! A transport-neutral harness: which transport to test, fresh name prefixes, and helpers
//! that observe queues through the [`Transport`] trait only.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use sourceflow::encryption::LocalKeyProvider;
use sourceflow::envelope::{attr, OutgoingMessage};
use sourceflow::transport::{
    BatchError, EntryError, Receive, ReceivedMessage, Topology, Transport,
};
use sourceflow::{Builder, MemoryTransport, RetryPolicy};

/// The master key every service of the suite shares (tests that count key-provider calls
/// set their own).
pub const TEST_MASTER_KEY: [u8; 32] = [9u8; 32];

/// The bucket the suite's claim checks use (created by the first service that needs it).
pub const CLAIM_BUCKET: &str = "sourceflow-test-claims";

/// How long any expectation may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Which transport the suite runs against (`SOURCEFLOW_TEST_TRANSPORT`, default `memory`).
pub fn transport_kind() -> String {
    std::env::var("SOURCEFLOW_TEST_TRANSPORT").unwrap_or_else(|_| "memory".to_string())
}

/// One test's world: a transport and a name prefix of its own.
pub struct Harness {
    pub transport: Arc<dyn Transport>,
    pub prefix: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Harness {
    /// A fresh world for one test.
    pub async fn new() -> Harness {
        telemetry();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("t{}-{n}", std::process::id() % 100_000);
        let transport: Arc<dyn Transport> = match transport_kind().as_str() {
            "memory" => Arc::new(MemoryTransport::new()),
            #[cfg(feature = "aws")]
            "aws" => {
                check_loopback();
                Arc::new(
                    sourceflow::transport::aws::AwsTransport::from_env()
                        .await
                        .expect("AWS transport from the environment"),
                )
            }
            other => panic!("SOURCEFLOW_TEST_TRANSPORT={other} is not a transport this build has"),
        };
        Harness { transport, prefix }
    }

    /// A service of this world running only the handlers defined in `module` itself (not
    /// its submodules, which other tests use).
    pub fn service(&self, name: &str, module: &'static str) -> Builder {
        sourceflow::builder()
            .service(name)
            .prefix(self.prefix.clone())
            .transport_arc(self.transport.clone())
            .handlers(move |h| h.module_path == module)
            .retry(RetryPolicy::exponential(
                Duration::from_millis(20),
                Duration::from_millis(200),
            ))
            .receive_wait(Duration::from_secs(1))
            .shutdown_timeout(Duration::from_secs(10))
            .key_provider(LocalKeyProvider::new(TEST_MASTER_KEY, "test-local"))
    }

    /// The claim check of this world's services: the suite's bucket, a key prefix of this
    /// test's own.
    pub fn claim_check(&self) -> sourceflow::ClaimCheck {
        sourceflow::ClaimCheck::bucket(CLAIM_BUCKET).prefix(format!("{}-claims", self.prefix))
    }

    /// The object store of the transport (S3, or the embedded one).
    pub fn objects(&self) -> Arc<dyn sourceflow::claim_check::ObjectStore> {
        self.transport
            .object_store()
            .expect("the transport has an object store")
    }

    /// Sends a raw body with raw attributes, as a foreign producer would.
    pub async fn send_raw(
        &self,
        queue: &str,
        body: &str,
        attributes: &[(&str, &str)],
        group: Option<&str>,
    ) {
        let id = uuid::Uuid::new_v4().to_string();
        let m = OutgoingMessage {
            body: body.into(),
            attributes: attributes
                .iter()
                .map(|(k, v)| (k.to_string().into(), (*v).into()))
                .collect(),
            group_id: group.map(str::to_string),
            dedup_id: group.map(|_| id.clone()),
            delay: None,
            wire_name: "raw".into(),
            message_id: id,
        };
        self.transport.send(queue, vec![m]).await.expect("raw send");
    }

    /// Receives and deletes until `expected` messages were read from `queue` or patience
    /// runs out; returns what was read.
    pub async fn drain(&self, queue: &str, expected: usize) -> Vec<ReceivedMessage> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while out.len() < expected && tokio::time::Instant::now() < deadline {
            let got = self
                .transport
                .receive(queue, receive(10, Duration::from_secs(1)))
                .await
                .expect("receive");
            if !got.is_empty() {
                let receipts = got.iter().map(|m| m.receipt.clone()).collect();
                self.transport
                    .delete(queue, receipts)
                    .await
                    .expect("delete");
            }
            out.extend(got);
        }
        out
    }

    /// Asserts that `queue` yields nothing for `wait`.
    pub async fn assert_empty(&self, queue: &str, wait: Duration) {
        let got = self
            .transport
            .receive(queue, receive(10, wait))
            .await
            .expect("receive");
        assert!(
            got.is_empty(),
            "expected `{queue}` to be empty, got {:?}",
            got.iter().map(|m| &m.body).collect::<Vec<_>>()
        );
    }
}

/// What the suite captures of tracing: finished OpenTelemetry spans, and every log line
/// (debug and up) as text.
pub struct Captured {
    pub spans: InMemorySpanExporter,
    pub logs: Arc<Mutex<String>>,
}

static TELEMETRY: OnceLock<Captured> = OnceLock::new();

/// Installs (once) the suite's global subscriber: spans to an in-memory OpenTelemetry
/// exporter, logs to a buffer, and `RUST_LOG`-filtered output (default `sourceflow=warn`)
/// to the test's stdout.
pub fn telemetry() -> &'static Captured {
    TELEMETRY.get_or_init(|| {
        let spans = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(spans.clone())
            .build();
        let tracer = provider.tracer("sourceflow-tests");
        let logs: Arc<Mutex<String>> = Arc::default();
        let sink = logs.clone();
        let capture = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || CaptureWriter(sink.clone()))
            .with_filter(tracing_subscriber::filter::LevelFilter::DEBUG);
        let console = tracing_subscriber::fmt::layer()
            .with_test_writer()
            .with_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "sourceflow=warn".into()),
            );
        // The layer the README recommends, so that these tests prove trace propagation
        // with its settings (no context activation).
        let otel = sourceflow::telemetry::layer(tracer)
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
        let _ = tracing_subscriber::registry()
            .with(otel)
            .with(capture)
            .with(console)
            .try_init();
        // Keep the provider alive for the whole run.
        std::mem::forget(provider);
        Captured { spans, logs }
    })
}

struct CaptureWriter(Arc<Mutex<String>>);

impl std::io::Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .expect("log buffer")
            .push_str(&String::from_utf8_lossy(buf));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A receive of up to `max` messages waiting `wait`, invisible for 30 s.
pub fn receive(max: usize, wait: Duration) -> Receive {
    Receive {
        max,
        wait,
        visibility: Duration::from_secs(30),
    }
}

/// The dead-letter reason attribute of a message, if any.
pub fn dlq_reason(m: &ReceivedMessage) -> Option<&str> {
    sourceflow::envelope::attribute(&m.attributes, attr::DLQ_REASON)
}

/// Waits until `check` is true, polling; panics with `what` after [`PATIENCE`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A test that talks to an AWS API must only ever reach loopback, unless told it runs
/// against real AWS on purpose (`SOURCEFLOW_TEST_REAL_AWS=1`).
#[cfg(feature = "aws")]
fn check_loopback() {
    if std::env::var("SOURCEFLOW_TEST_REAL_AWS").as_deref() == Ok("1") {
        return;
    }
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap_or_default();
    assert!(
        endpoint.starts_with("http://127.0.0.1") || endpoint.starts_with("http://localhost"),
        "AWS_ENDPOINT_URL={endpoint:?} is not loopback; start the emulator with tests/support/emulator.sh, or set SOURCEFLOW_TEST_REAL_AWS=1 for real AWS"
    );
    assert_eq!(
        std::env::var("AWS_EC2_METADATA_DISABLED").as_deref(),
        Ok("true"),
        "set AWS_EC2_METADATA_DISABLED=true so the SDK never queries instance metadata"
    );
}

/// A transport around another with switches, standing in for a broker that is away
/// (`down`: every call fails), a loop that is stuck (`hang_receive`: receives never
/// return), a publish that fails (`fail_publishes`: the next N publishes fail on the
/// broker's side), that the broker refuses (`refuse_publishes`: the next N) or whose answer
/// is late (`late_publish_ms`: every publish goes out, then answers that much later); it
/// counts the `send` calls it passes on (`sends`, `sent_entries`).
#[derive(Clone)]
pub struct Faulty {
    pub inner: Arc<dyn Transport>,
    pub down: Arc<std::sync::atomic::AtomicBool>,
    pub hang_receive: Arc<std::sync::atomic::AtomicBool>,
    pub fail_publishes: Arc<AtomicU32>,
    pub refuse_publishes: Arc<AtomicU32>,
    pub late_publish_ms: Arc<std::sync::atomic::AtomicU64>,
    /// The object store (claim check) cannot be reached while set.
    pub objects_down: Arc<std::sync::atomic::AtomicBool>,
    /// `send` calls made, and the entries they carried.
    pub sends: Arc<AtomicU32>,
    pub sent_entries: Arc<AtomicU32>,
}

/// The inner transport's object store, unreachable while `down` is set.
struct FaultyObjects {
    inner: Arc<dyn sourceflow::claim_check::ObjectStore>,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl FaultyObjects {
    fn check(&self) -> Result<(), sourceflow::claim_check::ObjectError> {
        match self.down.load(Ordering::SeqCst) {
            true => Err(sourceflow::claim_check::ObjectError::Unavailable {
                store: "faulty",
                reason: "connection refused".into(),
            }),
            false => Ok(()),
        }
    }
}

#[async_trait::async_trait]
impl sourceflow::claim_check::ObjectStore for FaultyObjects {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    async fn put(
        &self,
        bucket: &str,
        key: &str,
        bytes: Vec<u8>,
        content_type: &str,
    ) -> Result<(), sourceflow::claim_check::ObjectError> {
        self.check()?;
        self.inner.put(bucket, key, bytes, content_type).await
    }
    async fn get(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<Vec<u8>>, sourceflow::claim_check::ObjectError> {
        self.check()?;
        self.inner.get(bucket, key).await
    }
}

impl Faulty {
    pub fn new(inner: Arc<dyn Transport>) -> Self {
        Faulty {
            inner,
            down: Arc::default(),
            hang_receive: Arc::default(),
            fail_publishes: Arc::default(),
            refuse_publishes: Arc::default(),
            late_publish_ms: Arc::default(),
            objects_down: Arc::default(),
            sends: Arc::default(),
            sent_entries: Arc::default(),
        }
    }

    fn check(&self) -> sourceflow::Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(sourceflow::Error::Transport {
                transport: "faulty",
                operation: "any".into(),
                source: "connection refused".into(),
            });
        }
        Ok(())
    }

    fn check_batch(&self, operation: &'static str, dest: &str, n: usize) -> Result<(), BatchError> {
        self.check()
            .map_err(|e| BatchError::all(operation, dest, n, EntryError::Transient(e.to_string())))
    }
}

#[async_trait::async_trait]
impl Transport for Faulty {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn object_store(&self) -> Option<Arc<dyn sourceflow::claim_check::ObjectStore>> {
        let inner = self.inner.object_store()?;
        Some(Arc::new(FaultyObjects {
            inner,
            down: self.objects_down.clone(),
        }))
    }
    async fn provision(&self, topology: &Topology) -> sourceflow::Result<()> {
        self.check()?;
        self.inner.provision(topology).await
    }
    async fn send(&self, queue: &str, messages: Vec<OutgoingMessage>) -> Result<(), BatchError> {
        self.sends.fetch_add(1, Ordering::SeqCst);
        self.sent_entries
            .fetch_add(messages.len() as u32, Ordering::SeqCst);
        self.check_batch("SendMessageBatch", queue, messages.len())?;
        self.inner.send(queue, messages).await
    }
    async fn publish(&self, topic: &str, messages: Vec<OutgoingMessage>) -> Result<(), BatchError> {
        self.check_batch("PublishBatch", topic, messages.len())?;
        let take = |n: &AtomicU32| {
            n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        };
        let error = if take(&self.fail_publishes) {
            Some(EntryError::Transient("throttled".into()))
        } else if take(&self.refuse_publishes) {
            Some(EntryError::Refused(
                "InvalidParameterValue: refused by the test".into(),
            ))
        } else {
            None
        };
        if let Some(error) = error {
            return Err(BatchError::all(
                "PublishBatch",
                topic,
                messages.len(),
                error,
            ));
        }
        let published = self.inner.publish(topic, messages).await;
        let late = self.late_publish_ms.load(Ordering::SeqCst);
        if late > 0 {
            tokio::time::sleep(Duration::from_millis(late)).await;
        }
        published
    }
    async fn receive(
        &self,
        queue: &str,
        request: Receive,
    ) -> sourceflow::Result<Vec<ReceivedMessage>> {
        self.check()?;
        if self.hang_receive.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.inner.receive(queue, request).await
    }
    async fn delete(
        &self,
        queue: &str,
        receipts: Vec<sourceflow::transport::Receipt>,
    ) -> Result<(), BatchError> {
        self.check_batch("DeleteMessageBatch", queue, receipts.len())?;
        self.inner.delete(queue, receipts).await
    }
    async fn change_visibility(
        &self,
        queue: &str,
        receipts: Vec<sourceflow::transport::Receipt>,
        timeout: Duration,
    ) -> Result<(), BatchError> {
        self.check_batch("ChangeMessageVisibilityBatch", queue, receipts.len())?;
        self.inner.change_visibility(queue, receipts, timeout).await
    }
    async fn dead_letter(
        &self,
        queue: &str,
        dead_letter_queue: &str,
        message: &ReceivedMessage,
        reason: &str,
    ) -> sourceflow::Result<()> {
        self.check()?;
        self.inner
            .dead_letter(queue, dead_letter_queue, message, reason)
            .await
    }
    async fn queue_depth(
        &self,
        queue: &str,
    ) -> sourceflow::Result<Option<sourceflow::transport::QueueDepth>> {
        self.check()?;
        self.inner.queue_depth(queue).await
    }
    async fn missing(&self, topology: &Topology) -> sourceflow::Result<Vec<String>> {
        self.check()?;
        self.inner.missing(topology).await
    }
    async fn end_receives(&self, queue: &str) {
        self.inner.end_receives(queue).await
    }
}

/// A SQLite idempotency store (and its pool, for the test's own tables) in a fresh file
/// under the temporary directory; `tag` names the file after the test.
#[cfg(feature = "sqlite")]
pub async fn fresh_sqlite(tag: &str) -> sourceflow::idempotency::SqliteIdempotencyStore {
    let file = format!("sourceflow-{tag}-{}.db", uuid::Uuid::new_v4());
    let path = std::env::temp_dir().join(file);
    sourceflow::idempotency::SqliteIdempotencyStore::connect(&format!(
        "sqlite://{}?mode=rwc",
        path.display()
    ))
    .await
    .expect("sqlite")
}

/// Whether a metric point's attributes include all of `with`.
fn has_all<'a>(
    attrs: impl Iterator<Item = &'a opentelemetry::KeyValue>,
    with: &[(&str, &str)],
) -> bool {
    let attrs: Vec<_> = attrs.collect();
    with.iter().all(|(k, v)| {
        attrs.iter().any(|kv| {
            kv.key.as_str() == *k && kv.value == opentelemetry::Value::from(v.to_string())
        })
    })
}

/// What `read` takes from each metric named `name` in the latest export, summed.
fn metric_total(
    exporter: &opentelemetry_sdk::metrics::InMemoryMetricExporter,
    name: &str,
    read: impl Fn(&opentelemetry_sdk::metrics::data::AggregatedMetrics) -> u64,
) -> u64 {
    let Some(rm) = exporter.get_finished_metrics().expect("metrics").pop() else {
        return 0;
    };
    rm.scope_metrics()
        .flat_map(|sm| sm.metrics())
        .filter(|m| m.name() == name)
        .map(|m| read(m.data()))
        .sum()
}

/// Sum of a u64 counter's points whose attributes include all of `with` (latest export).
pub fn counter(
    exporter: &opentelemetry_sdk::metrics::InMemoryMetricExporter,
    name: &str,
    with: &[(&str, &str)],
) -> u64 {
    use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
    metric_total(exporter, name, |data| match data {
        AggregatedMetrics::U64(MetricData::Sum(sum)) => sum
            .data_points()
            .filter(|dp| has_all(dp.attributes(), with))
            .map(|dp| dp.value())
            .sum(),
        _ => 0,
    })
}

/// Count of a histogram's recordings whose attributes include all of `with` (latest export).
pub fn recordings(
    exporter: &opentelemetry_sdk::metrics::InMemoryMetricExporter,
    name: &str,
    with: &[(&str, &str)],
) -> u64 {
    use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
    metric_total(exporter, name, |data| match data {
        AggregatedMetrics::F64(MetricData::Histogram(hist)) => hist
            .data_points()
            .filter(|dp| has_all(dp.attributes(), with))
            .map(|dp| dp.count())
            .sum(),
        _ => 0,
    })
}
