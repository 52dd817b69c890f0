//! AWS-specific tests against a real AWS API (the emulator from tests/support/emulator.sh,
//! or real AWS with SOURCEFLOW_TEST_REAL_AWS=1): what provisioning created, inspected
//! through the SDK; idempotent re-provisioning; correction of drifted attributes; KMS
//! envelope encryption, data-key caching and key rotation; the claim check's bucket and objects.
//!
//! ```text
//! eval "$(tests/support/emulator.sh start)"
//! SOURCEFLOW_TEST_AWS=1 cargo test -p sourceflow --test aws
//! ```

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::QueueAttributeName;
use serde::{Deserialize, Serialize};
use sourceflow::encryption::{
    context, CacheLimits, DataKey, EncryptionContext, Encryptor, KeyProvider, KmsKeyProvider,
    PlainKey,
};
use sourceflow::naming::Naming;
use sourceflow::transport::aws::AwsTransport;
use sourceflow::{command, event, handler};

#[path = "../common/emulator.rs"]
mod emulator;

pub(crate) fn enabled() -> bool {
    emulator::enabled("SOURCEFLOW_TEST_AWS", "tests/run.sh does")
}

/// Log lines of this test binary, as text (sourceflow logs what it creates and changes).
#[derive(Clone, Default)]
struct Logs(Arc<std::sync::Mutex<String>>);

impl Logs {
    /// Takes the lines that mention `needle` (tests run in parallel; each has its prefix).
    fn take(&self, needle: &str) -> String {
        let all = std::mem::take(&mut *self.0.lock().expect("logs"));
        all.lines()
            .filter(|l| l.contains(needle))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .expect("logs")
            .push_str(&String::from_utf8_lossy(buf));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() -> Logs {
    static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let sink = logs.clone();
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_env_filter("sourceflow=info")
            .with_writer(move || sink.clone())
            .try_init();
        logs
    })
    .clone()
}

pub(crate) fn prefix() -> String {
    format!("aws{}", fastrand::u32(..) % 1_000_000)
}

#[command(queue = "aws-orders.fifo", name = "awstest.PlaceOrder.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlaceOrder {
    #[entity_id]
    pub order_id: u64,
}

#[event(topic = "aws-order-events", name = "awstest.OrderPlaced.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: u64,
}

#[handler]
async fn place(_cmd: PlaceOrder) {}

#[handler]
async fn placed(_evt: OrderPlaced) {}

async fn attributes(t: &AwsTransport, queue: &str) -> std::collections::HashMap<String, String> {
    let url = t.queue_url(queue).await.expect("url");
    t.sqs()
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .expect("attributes")
        .attributes()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.as_str().to_string(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

async fn start(t: &AwsTransport, prefix: &str) -> sourceflow::Handle {
    sourceflow::builder()
        .service("shop")
        .prefix(prefix)
        .transport(t.clone())
        .handlers(|h| h.module_path == module_path!())
        .max_receive_count(7)
        .visibility_timeout(Duration::from_secs(45))
        .receive_wait(Duration::from_secs(1))
        .start()
        .await
        .expect("start")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_creates_exactly_what_the_routes_need() {
    if !enabled() {
        return;
    }
    let t = AwsTransport::from_env().await.expect("transport");
    let p = prefix();
    let app = start(&t, &p).await;
    let id = t.identity().await.expect("identity").clone();

    let orders = app.queue_of::<PlaceOrder>();
    assert_eq!(orders, format!("{p}-aws-orders.fifo"));
    let a = attributes(&t, &orders).await;
    assert_eq!(a.get("FifoQueue").map(String::as_str), Some("true"));
    assert_eq!(
        a.get("ContentBasedDeduplication").map(String::as_str),
        Some("false")
    );
    assert_eq!(a.get("VisibilityTimeout").map(String::as_str), Some("45"));
    let redrive: serde_json::Value =
        serde_json::from_str(a.get("RedrivePolicy").expect("redrive")).expect("json");
    assert_eq!(
        redrive["deadLetterTargetArn"],
        id.queue_arn(&Naming::dead_letter(&orders))
    );
    // The broker's own limit is the safety net above the 7 handler attempts (ten times,
    // at least 100): sourceflow dead-letters first, with a reason.
    assert_eq!(
        redrive["maxReceiveCount"].to_string().trim_matches('"'),
        "100"
    );
    let dlq = attributes(&t, &Naming::dead_letter(&orders)).await;
    assert_eq!(
        dlq.get("MessageRetentionPeriod").map(String::as_str),
        Some("1209600")
    );

    // The subscriber queue: one statement letting exactly the topic send.
    let sub_queue = app.subscriber_queue_of::<OrderPlaced>();
    assert_eq!(sub_queue, format!("{p}-shop-aws-order-events"));
    let topic_arn = id.topic_arn(&app.topic_of::<OrderPlaced>());
    let policy: serde_json::Value = serde_json::from_str(
        attributes(&t, &sub_queue)
            .await
            .get("Policy")
            .expect("policy"),
    )
    .expect("json");
    let statements = policy["Statement"].as_array().expect("statements");
    assert_eq!(statements.len(), 1);
    let source = &statements[0]["Condition"]["ArnEquals"]["aws:SourceArn"];
    assert!(
        source == &serde_json::json!([topic_arn.clone()])
            || source == &serde_json::json!(topic_arn.clone()),
        "{source}"
    );
    assert_eq!(statements[0]["Action"], "sqs:SendMessage");

    // The subscription: raw delivery, filtered to the handled type.
    let subs = t
        .sns()
        .list_subscriptions_by_topic()
        .topic_arn(&topic_arn)
        .send()
        .await
        .expect("subscriptions");
    let subs = subs.subscriptions();
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].endpoint(), Some(id.queue_arn(&sub_queue).as_str()));
    let sub_attrs = t
        .sns()
        .get_subscription_attributes()
        .subscription_arn(subs[0].subscription_arn().expect("arn"))
        .send()
        .await
        .expect("attributes");
    let sub_attrs = sub_attrs.attributes().expect("attributes");
    assert_eq!(
        sub_attrs.get("RawMessageDelivery").map(String::as_str),
        Some("true")
    );
    assert!(sub_attrs
        .get("FilterPolicy")
        .is_some_and(|f| f.contains("awstest.OrderPlaced.v1")));
    app.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_start_changes_nothing_and_drift_is_corrected() {
    if !enabled() {
        return;
    }
    let t = AwsTransport::from_env().await.expect("transport");
    let p = prefix();
    let logs = capture_logs();
    let first = start(&t, &p).await;
    let orders = first.queue_of::<PlaceOrder>();
    first.shutdown().await.expect("shutdown");
    let created = logs.take(&p);
    assert!(
        created.contains("queue created") && created.contains(&orders),
        "{created}"
    );
    let second = start(&t, &p).await;
    second.shutdown().await.expect("shutdown");
    let again = logs.take(&p);
    assert!(
        !again.contains("queue created") && !again.contains("queue attributes corrected"),
        "the second start changed something:\n{again}"
    );

    // Someone changes an attribute by hand: the next start puts it back.
    let url = t.queue_url(&orders).await.expect("url");
    t.sqs()
        .set_queue_attributes()
        .queue_url(&url)
        .attributes(QueueAttributeName::VisibilityTimeout, "5")
        .send()
        .await
        .expect("drift");
    let third = start(&t, &p).await;
    third.shutdown().await.expect("shutdown");
    let corrected = attributes(&t, &orders).await;
    assert_eq!(
        corrected.get("VisibilityTimeout").map(String::as_str),
        Some("45")
    );
    let fixed = logs.take(&p);
    assert!(
        fixed.contains("queue attributes corrected") && fixed.contains("VisibilityTimeout"),
        "{fixed}"
    );
}

/// Counts the calls that reach KMS.
struct Counting {
    inner: KmsKeyProvider,
    generate: AtomicU32,
    decrypt: AtomicU32,
}

#[async_trait]
impl KeyProvider for Counting {
    fn name(&self) -> &'static str {
        "kms-counting"
    }
    async fn generate_data_key(&self, c: &EncryptionContext) -> sourceflow::Result<DataKey> {
        self.generate.fetch_add(1, Ordering::SeqCst);
        self.inner.generate_data_key(c).await
    }
    async fn decrypt_data_key(
        &self,
        e: &[u8],
        c: &EncryptionContext,
    ) -> sourceflow::Result<PlainKey> {
        self.decrypt.fetch_add(1, Ordering::SeqCst);
        self.inner.decrypt_data_key(e, c).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_encryption_caches_keys_and_survives_rotation() {
    if !enabled() {
        return;
    }
    let cfg = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    let kms = aws_sdk_kms::Client::new(&cfg);
    // The provider's own client counts what reaches KMS, with the SDK interceptor.
    let counted = sourceflow::transport::aws::RequestCounter::new();
    let counted_kms = aws_sdk_kms::Client::from_conf(
        aws_sdk_kms::config::Builder::from(&cfg)
            .interceptor(counted.clone())
            .build(),
    );
    let key1 = kms
        .create_key()
        .send()
        .await
        .expect("key")
        .key_metadata()
        .expect("meta")
        .key_id()
        .to_string();
    let key2 = kms
        .create_key()
        .send()
        .await
        .expect("key")
        .key_metadata()
        .expect("meta")
        .key_id()
        .to_string();
    let alias = format!("alias/{}", prefix());
    kms.create_alias()
        .alias_name(&alias)
        .target_key_id(&key1)
        .send()
        .await
        .expect("alias");

    let provider = Arc::new(Counting {
        inner: KmsKeyProvider::new(counted_kms, &alias)
            .described()
            .await
            .expect("usable"),
        generate: AtomicU32::new(0),
        decrypt: AtomicU32::new(0),
    });
    let enc = Encryptor::new(provider.clone(), CacheLimits::default());
    let ctx = context("awstest.PlaceOrder.v1", "orders.fifo");
    let mut sealed = Vec::new();
    for i in 0..10_000u32 {
        sealed.push(
            enc.seal(format!("{{\"n\":{i}}}").as_bytes(), &ctx)
                .await
                .expect("seal"),
        );
    }
    for s in sealed.iter().step_by(97) {
        enc.open(s, &ctx).await.expect("open");
    }
    assert_eq!(
        provider.generate.load(Ordering::SeqCst),
        1,
        "one GenerateDataKey for 10,000 messages"
    );
    assert_eq!(
        provider.decrypt.load(Ordering::SeqCst),
        1,
        "one Decrypt per distinct data key"
    );
    assert_eq!(
        counted.total(),
        3,
        "KMS saw DescribeKey, one GenerateDataKey and one Decrypt for 10,000 messages"
    );
    assert!(sealed[0].kid.contains(&key1), "{}", sealed[0].kid);

    // Rotation: the alias now names another key. Old messages still open (KMS finds the key
    // from the ciphertext); new ones use the new key.
    kms.update_alias()
        .alias_name(&alias)
        .target_key_id(&key2)
        .send()
        .await
        .expect("rotate");
    let fresh = Encryptor::new(
        Arc::new(KmsKeyProvider::new(kms.clone(), &alias)),
        CacheLimits::default(),
    );
    let opened = fresh
        .open(&sealed[1], &ctx)
        .await
        .expect("old message after rotation");
    assert_eq!(opened.as_slice(), b"{\"n\":1}");
    let new = fresh.seal(b"{}", &ctx).await.expect("seal");
    assert!(new.kid.contains(&key2), "{}", new.kid);
    // The context is bound in KMS too: another destination does not open.
    assert!(fresh
        .open(&sealed[2], &context("awstest.PlaceOrder.v1", "other"))
        .await
        .is_err());
}

/// A TCP proxy to the emulator that can be cut and restored, standing in for the emulator
/// going away and coming back.
struct Cable {
    addr: std::net::SocketAddr,
    up: Arc<std::sync::atomic::AtomicBool>,
    cut: Arc<tokio::sync::Notify>,
}

impl Cable {
    async fn to(target: String) -> Cable {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let cut = Arc::new(tokio::sync::Notify::new());
        let (up2, cut2) = (up.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused/reset
                }
                let target = target.clone();
                let cut = cut2.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.notified() => {}
                    }
                });
            }
        });
        Cable { addr, up, cut }
    }

    fn set(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            self.cut.notify_waiters();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_unhealthy_while_the_broker_is_away_and_recovers() {
    use sourceflow::health::Status;
    if !enabled() {
        return;
    }
    let endpoint = std::env::var("AWS_ENDPOINT_URL").expect("endpoint");
    let target = endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let cable = Cable::to(target).await;
    let cfg = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(format!("http://{}", cable.addr))
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(1))
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .operation_timeout(Duration::from_secs(2))
                .build(),
        )
        .load()
        .await;
    let t = AwsTransport::from_sdk_config(&cfg);
    let app = start(&t, &prefix()).await;
    assert_eq!(
        app.health().await.status,
        Status::Healthy,
        "{:#?}",
        app.health().await
    );

    cable.set(false);
    let report = app.health().await;
    assert_eq!(report.status, Status::Unhealthy, "{report:#?}");
    assert!(
        report
            .check("transport")
            .expect("transport")
            .detail
            .contains("unreachable")
            || report
                .check("transport")
                .expect("transport")
                .detail
                .contains("no answer"),
        "{report:#?}"
    );

    cable.set(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let report = app.health().await;
        if report.status == Status::Healthy {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still not healthy: {report:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_mode_lists_what_is_missing_or_different_and_assume_mode_calls_nothing() {
    use sourceflow::transport::aws::ProvisionMode;
    if !enabled() {
        return;
    }
    let t = AwsTransport::from_env().await.expect("transport");
    let p = prefix();
    let validate = t.clone().provision_mode(ProvisionMode::Validate);
    let err = sourceflow::builder()
        .service("shop")
        .prefix(&p)
        .transport(validate.clone())
        .handlers(|h| h.module_path == module_path!())
        .start()
        .await
        .expect_err("nothing exists yet");
    let text = err.to_string();
    assert!(
        text.contains(&format!("queue `{p}-aws-orders.fifo` is missing")),
        "{text}"
    );
    assert!(
        text.contains(&format!("topic `{p}-aws-order-events` is missing")),
        "{text}"
    );
    assert!(text.contains("subscription of queue"), "{text}");

    // Create, then drift one attribute: validate names it, attribute by attribute.
    let app = start(&t, &p).await;
    let orders = app.queue_of::<PlaceOrder>();
    app.shutdown().await.expect("shutdown");
    let url = t.queue_url(&orders).await.expect("url");
    t.sqs()
        .set_queue_attributes()
        .queue_url(&url)
        .attributes(QueueAttributeName::VisibilityTimeout, "5")
        .send()
        .await
        .expect("drift");
    let err = sourceflow::builder()
        .service("shop")
        .prefix(&p)
        .transport(validate)
        .handlers(|h| h.module_path == module_path!())
        .max_receive_count(7)
        .visibility_timeout(Duration::from_secs(45))
        .start()
        .await
        .expect_err("drifted");
    let text = err.to_string();
    assert!(
        text.contains(&format!(
            "queue `{orders}`: VisibilityTimeout is 5, expected 45"
        )),
        "{text}"
    );
    assert_eq!(
        text.matches("\n  - ").count(),
        1,
        "only the drifted attribute: {text}"
    );

    // Assume: no provisioning calls at all; what is missing shows up when used.
    let other = prefix();
    let assume = sourceflow::builder()
        .service("shop")
        .prefix(&other)
        .transport(t.clone().provision_mode(ProvisionMode::Assume))
        .handlers(|_| false)
        .start()
        .await
        .expect("assume starts without calls");
    let err = assume
        .send(PlaceOrder { order_id: 1 })
        .await
        .expect_err("the queue was never created");
    // Per entry since the transport contract reports each entry (the dispatcher may map a
    // batch of one back to the plain error).
    let missing = match &err {
        sourceflow::Error::QueueDoesNotExist(_) => true,
        sourceflow::Error::Batch(b) => {
            b.failed.len() == 1
                && matches!(
                    b.error_of(0),
                    Some(sourceflow::transport::EntryError::NoSuchDestination(_))
                )
        }
        _ => false,
    };
    assert!(missing, "{err}");
    assume.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partially_refused_batch_is_reported_and_the_rest_delivered() {
    use sourceflow::envelope::OutgoingMessage;
    use sourceflow::transport::{EntryError, Transport};
    if !enabled() {
        return;
    }
    let t = AwsTransport::from_env().await.expect("transport");
    let queue = format!("{}-partial", prefix());
    t.sqs()
        .create_queue()
        .queue_name(&queue)
        .send()
        .await
        .expect("queue");
    let msg = |body: &str| OutgoingMessage {
        body: body.into(),
        attributes: vec![("sourceflow.type".into(), "raw".into())].into(),
        group_id: None,
        dedup_id: None,
        delay: None,
        wire_name: "raw".into(),
        message_id: format!("m{}", fastrand::u64(..)),
    };
    // SQS refuses characters outside its allowed set, entry by entry.
    let err = t
        .send(
            &queue,
            vec![msg("first"), msg("bad \u{1} body"), msg("third")],
        )
        .await
        .expect_err("one entry is refused");
    assert_eq!(err.total, 3);
    assert_eq!(
        err.failed_indices().collect::<Vec<_>>(),
        vec![1],
        "exactly the bad entry: {err}"
    );
    assert!(
        matches!(err.error_of(1), Some(EntryError::Refused(_))),
        "a sender fault is refused, not retried: {err}"
    );
    // What the caller sees through `?` in a handler.
    let text = sourceflow::Error::from(err).to_string();
    assert!(
        text.contains("1 of 3 entries not done") && !text.contains('\n'),
        "{text}"
    );
    let mut bodies = Vec::new();
    for _ in 0..5 {
        for m in t
            .receive(
                &queue,
                sourceflow::transport::Receive {
                    max: 10,
                    wait: Duration::from_secs(1),
                    visibility: Duration::from_secs(30),
                },
            )
            .await
            .expect("receive")
        {
            bodies.push(m.body.to_string());
        }
        if bodies.len() == 2 {
            break;
        }
    }
    bodies.sort();
    assert_eq!(
        bodies,
        vec!["first".to_string(), "third".to_string()],
        "the rest were delivered"
    );
}

// ---- the data plane: per-entry results, coalescing, checks before the wire ---------------

mod claim_check;
mod data_plane;
mod topology;

// ---- the exports deployed, and the command line's broker commands ------------------------

mod exports;

// ---- the test harness, live ----------------------------------------------------------------

#[cfg(feature = "testing")]
mod testing_live;

// ---- a worker killed mid-handler ---------------------------------------------------------

#[cfg(feature = "sqlite")]
mod crash {
    use super::*;
    use sourceflow::idempotency::SqliteIdempotencyStore;
    use sourceflow::State;

    pub const MODULE: &str = module_path!();

    #[command(queue = "aws-ledger", name = "awstest.PostEntry.v1")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct PostEntry {
        pub entry: String,
    }

    /// The side effect: a row per entry counting how often it was posted, plus a row saying
    /// a handler started (so the parent knows when to kill).
    #[handler]
    async fn post_entry(
        cmd: PostEntry,
        State(db): State<sqlx::SqlitePool>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO started (entry, pid) VALUES ($1, $2)")
            .bind(&cmd.entry)
            .bind(std::process::id() as i64)
            .execute(&db)
            .await?;
        // The first worker is killed here, before the effect.
        tokio::time::sleep(Duration::from_secs(3)).await;
        sqlx::query(
            "INSERT INTO effects (entry, n) VALUES ($1, 1) ON CONFLICT (entry) DO UPDATE SET n = effects.n + 1",
        )
        .bind(&cmd.entry)
        .execute(&db)
        .await?;
        Ok(())
    }

    /// Where a worker keeps its claims.
    #[derive(Clone)]
    pub enum Claims {
        /// In the SQLite file that also holds the effects.
        Sqlite,
        /// Whatever `SOURCEFLOW_IDEMPOTENCY` says (the child process of the DynamoDB case:
        /// `dynamodb://<table>`, reached through `AWS_ENDPOINT_URL_DYNAMODB`).
        FromEnv,
        /// In this DynamoDB store.
        #[cfg(feature = "dynamodb")]
        DynamoDb(sourceflow::idempotency::DynamoDbIdempotencyStore),
    }

    pub async fn service(prefix: &str, db_url: &str, claims: Claims) -> sourceflow::Handle {
        let pool = sqlx::SqlitePool::connect(db_url).await.expect("effects db");
        for ddl in [
            "CREATE TABLE IF NOT EXISTS effects (entry TEXT PRIMARY KEY, n BIGINT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS started (entry TEXT, pid BIGINT)",
        ] {
            sqlx::query(ddl).execute(&pool).await.expect("ddl");
        }
        let builder = sourceflow::builder()
            .service("ledger")
            .prefix(prefix)
            .transport(AwsTransport::from_env().await.expect("transport"))
            .handlers_in(MODULE)
            .state(pool)
            // A short visibility timeout (and so a short lease) lets the test finish quickly.
            .visibility_timeout(Duration::from_secs(2))
            .receive_wait(Duration::from_secs(1));
        let builder = match claims {
            Claims::Sqlite => builder.idempotency(
                SqliteIdempotencyStore::connect(db_url)
                    .await
                    .expect("store"),
            ),
            Claims::FromEnv => builder,
            #[cfg(feature = "dynamodb")]
            Claims::DynamoDb(store) => builder.idempotency(store),
        };
        builder.start().await.expect("start")
    }
}

/// Runs only as the child process of the test below.
#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the worker process of worker_killed_mid_handler_is_replaced_and_the_effect_happens_once"]
async fn worker_process() {
    let (Ok(prefix), Ok(db)) = (std::env::var("CRASH_PREFIX"), std::env::var("CRASH_DB")) else {
        return;
    };
    let claims = match std::env::var("CRASH_CLAIMS").as_deref() {
        Ok("env") => crash::Claims::FromEnv,
        _ => crash::Claims::Sqlite,
    };
    let _app = crash::service(&prefix, &db, claims).await;
    // Serve until killed.
    tokio::time::sleep(Duration::from_secs(120)).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_handler_is_replaced_and_the_effect_happens_once() {
    if !enabled() {
        return;
    }
    killed_worker_is_replaced(prefix(), &[], crash::Claims::Sqlite).await;
}

/// The same with the claims in DynamoDB: the killed worker found its store through
/// `SOURCEFLOW_IDEMPOTENCY=dynamodb://<table>` (and the emulator through
/// `AWS_ENDPOINT_URL_DYNAMODB`), as a deployed service would.
#[cfg(all(feature = "sqlite", feature = "dynamodb"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_handler_with_claims_in_dynamodb() {
    if !enabled() {
        return;
    }
    let Some(endpoint) = dynamodb::endpoint("worker_killed_mid_handler_with_claims_in_dynamodb")
    else {
        return;
    };
    let table = dynamodb::table("crash");
    let child_env = [
        ("CRASH_CLAIMS", "env".to_string()),
        ("SOURCEFLOW_IDEMPOTENCY", format!("dynamodb://{table}")),
        ("AWS_ENDPOINT_URL_DYNAMODB", endpoint.clone()),
    ];
    let client = dynamodb::client(&endpoint);
    let store = sourceflow::idempotency::DynamoDbIdempotencyStore::open(
        client.clone(),
        &table,
        sourceflow::transport::aws::ProvisionMode::Create,
    )
    .await
    .expect("claims table");
    killed_worker_is_replaced(prefix(), &child_env, crash::Claims::DynamoDb(store.clone())).await;
    assert_eq!(
        store.count_exact().await.expect("count"),
        1,
        "one completed claim, taken over from the killed worker"
    );
    dynamodb::drop_table(&client, &table).await;
}

#[cfg(feature = "dynamodb")]
#[path = "../common/dynamodb.rs"]
mod dynamodb;

/// Starts a worker process, kills it with SIGKILL in the middle of the handler, starts a
/// replacement in this process with `claims`, and checks that the effect happened once.
#[cfg(feature = "sqlite")]
async fn killed_worker_is_replaced(p: String, child_env: &[(&str, String)], claims: crash::Claims) {
    let path = std::env::temp_dir().join(format!("sourceflow-crash-{p}.db"));
    let db = format!("sqlite://{}?mode=rwc", path.display());
    // The parent provisions, sends, and watches; it runs no handler itself yet.
    let sender = sourceflow::builder()
        .service("ledger-client")
        .prefix(&p)
        .transport(AwsTransport::from_env().await.expect("transport"))
        .handlers(|_| false)
        .start()
        .await
        .expect("sender");
    let pool = sqlx::SqlitePool::connect(&db).await.expect("pool");

    let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args(["--ignored", "--exact", "worker_process", "--nocapture"])
        .env("CRASH_PREFIX", &p)
        .env("CRASH_DB", &db)
        .envs(child_env.iter().map(|(k, v)| (k, v)))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("worker process");
    let entry = format!("entry-{p}");
    // Wait for the child's listener, then send.
    tokio::time::sleep(Duration::from_secs(2)).await;
    sender
        .send(crash::PostEntry {
            entry: entry.clone(),
        })
        .await
        .expect("send");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let started: Option<i64> =
            sqlx::query_scalar("SELECT count(*) FROM started WHERE entry = $1")
                .bind(&entry)
                .fetch_optional(&pool)
                .await
                .unwrap_or(None);
        if started.unwrap_or(0) >= 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker never started the handler"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    #[cfg(feature = "dynamodb")]
    if let crash::Claims::DynamoDb(store) = &claims {
        assert_eq!(
            store.count_exact().await.expect("count"),
            1,
            "the worker process holds its claim in DynamoDB"
        );
    }
    // SIGKILL in the middle of the handler: no cleanup, no release, no return to the queue.
    child.kill().expect("kill");
    let _ = child.wait();

    // Another worker takes over once the visibility timeout and the claim's lease run out.
    let replacement = crash::service(&p, &db, claims).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n: Option<i64> = sqlx::query_scalar("SELECT n FROM effects WHERE entry = $1")
            .bind(&entry)
            .fetch_optional(&pool)
            .await
            .unwrap_or(None);
        if n == Some(1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the message was not processed after the crash"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let n: i64 = sqlx::query_scalar("SELECT n FROM effects WHERE entry = $1")
        .bind(&entry)
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(n, 1, "the effect happened exactly once");
    let starts: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT pid) FROM started WHERE entry = $1")
            .bind(&entry)
            .fetch_one(&pool)
            .await
            .expect("starts");
    assert_eq!(
        starts, 2,
        "started in the killed worker, finished in its replacement"
    );
    let queue = replacement.queue_of::<crash::PostEntry>();
    let depth = replacement
        .transport()
        .queue_depth(&Naming::dead_letter(&queue))
        .await
        .expect("depth")
        .expect("known");
    assert_eq!(depth.total(), 0, "nothing went to the dead-letter queue");
    replacement.shutdown().await.expect("shutdown");
    sender.shutdown().await.expect("shutdown");
    let _ = std::fs::remove_file(&path);
}
