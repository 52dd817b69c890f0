//! Topology on AWS, read back through the SDK: per-route settings, ownership (a sender
//! never changes a queue its consumer owns), validate naming subscription differences and
//! stale subscriptions, health including subscriptions and the KMS key.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;
use serde::{Deserialize, Serialize};
use sourceflow::naming::Naming;
use sourceflow::transport::aws::{AwsTransport, ProvisionMode};
use sourceflow::{command, event, handler};

use super::{enabled, prefix};

pub const MODULE: &str = module_path!();

#[command(
    queue = "aws-settings-reports",
    name = "awstopo.BuildReport.v1",
    visibility_timeout = "2m",
    retention = "7d",
    delay = "30s",
    max_receive_count = 4,
    sse = "none",
    tags(team = "reports", tier = "batch")
)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildReport {
    pub id: u64,
}

#[command(
    queue = "aws-settings-ledger.fifo",
    name = "awstopo.Post.v1",
    high_throughput
)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Post {
    #[entity_id]
    pub account: u64,
}

#[command(queue = "aws-owned-jobs", name = "awstopo.Job.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
}

#[event(topic = "aws-topo-events", name = "awstopo.Placed.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Placed {
    pub id: u64,
}

#[event(topic = "aws-topo-events", name = "awstopo.Refunded.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refunded {
    pub id: u64,
}

#[event(topic = "aws-topo-audit", name = "awstopo.Audited.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Audited {
    pub id: u64,
}

#[handler]
async fn build_report(_cmd: BuildReport) {}

#[handler]
async fn post(_cmd: Post) {}

#[handler]
async fn job(_cmd: Job) {}

#[handler]
async fn placed(_evt: Placed) {}

#[handler]
async fn refunded(_evt: Refunded) {}

#[handler]
async fn audited(_evt: Audited) {}

/// A service of this module running exactly the handlers named.
fn service(
    t: &AwsTransport,
    prefix: &str,
    name: &str,
    handlers: &'static [&'static str],
) -> sourceflow::Builder {
    sourceflow::builder()
        .service(name)
        .prefix(prefix)
        .transport(t.clone())
        .handlers(move |h| h.module_path == MODULE && handlers.contains(&h.name))
        .receive_wait(Duration::from_secs(1))
}

async fn attributes(t: &AwsTransport, queue: &str) -> HashMap<String, String> {
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

async fn visibility(t: &AwsTransport, queue: &str) -> String {
    attributes(t, queue)
        .await
        .get("VisibilityTimeout")
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_settings_are_provisioned_as_declared() {
    if !enabled() {
        return;
    }
    let t = AwsTransport::from_env().await.expect("transport");
    let p = prefix();
    let app = service(&t, &p, "settings", &["build_report", "post"])
        .start()
        .await
        .expect("start");
    let reports = app.queue_of::<BuildReport>();
    let a = attributes(&t, &reports).await;
    let get = |k: &str| a.get(k).map(String::as_str);
    assert_eq!(get("VisibilityTimeout"), Some("120"));
    assert_eq!(get("MessageRetentionPeriod"), Some("604800"));
    assert_eq!(get("DelaySeconds"), Some("30"));
    assert_eq!(get("SqsManagedSseEnabled"), Some("false"));
    let redrive: serde_json::Value =
        serde_json::from_str(get("RedrivePolicy").expect("redrive")).expect("json");
    assert_eq!(
        redrive["maxReceiveCount"].to_string().trim_matches('"'),
        "100",
        "the broker's safety net above the 4 handler attempts"
    );
    let url = t.queue_url(&reports).await.expect("url");
    let tags = t
        .sqs()
        .list_queue_tags()
        .queue_url(url)
        .send()
        .await
        .expect("tags")
        .tags()
        .cloned()
        .unwrap_or_default();
    assert_eq!(tags.get("team").map(String::as_str), Some("reports"));
    assert_eq!(tags.get("tier").map(String::as_str), Some("batch"));
    let dlq = attributes(&t, &Naming::dead_letter(&reports)).await;
    assert_eq!(
        dlq.get("MessageRetentionPeriod").map(String::as_str),
        Some("1209600")
    );
    let ledger = attributes(&t, &app.queue_of::<Post>()).await;
    assert_eq!(
        ledger.get("DeduplicationScope").map(String::as_str),
        Some("messageGroup")
    );
    assert_eq!(
        ledger.get("FifoThroughputLimit").map(String::as_str),
        Some("perMessageGroupId")
    );
    app.shutdown().await.expect("shutdown");
    // A second start finds nothing to correct.
    let again = service(&t, &p, "settings", &["build_report", "post"])
        .transport(t.clone().provision_mode(ProvisionMode::Validate))
        .start()
        .await
        .expect("the provisioned settings validate");
    again.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_never_changes_a_queue_its_consumer_owns() {
    if !enabled() {
        return;
    }
    let t = AwsTransport::from_env().await.expect("transport");
    let p = prefix();
    let consumer =
        || service(&t, &p, "consumer", &["job"]).visibility_timeout(Duration::from_secs(45));
    let sender = || service(&t, &p, "sender", &[]).visibility_timeout(Duration::from_secs(20));
    let queue = format!("{p}-aws-owned-jobs");

    // A sender that starts first creates the missing queue with its settings...
    sender()
        .start()
        .await
        .expect("sender")
        .shutdown()
        .await
        .expect("stop");
    assert_eq!(visibility(&t, &queue).await, "20");
    // ...its consumer then owns it: corrected to the consumer's settings.
    consumer()
        .start()
        .await
        .expect("consumer")
        .shutdown()
        .await
        .expect("stop");
    assert_eq!(visibility(&t, &queue).await, "45");
    // Deploys alternate: no more flipping.
    for _ in 0..2 {
        sender()
            .start()
            .await
            .expect("sender")
            .shutdown()
            .await
            .expect("stop");
        assert_eq!(visibility(&t, &queue).await, "45", "the sender changed it");
        consumer()
            .start()
            .await
            .expect("consumer")
            .shutdown()
            .await
            .expect("stop");
        assert_eq!(visibility(&t, &queue).await, "45");
    }
    // Drift by hand: the sender leaves it, the consumer corrects it.
    let url = t.queue_url(&queue).await.expect("url");
    t.sqs()
        .set_queue_attributes()
        .queue_url(&url)
        .attributes(QueueAttributeName::VisibilityTimeout, "10")
        .send()
        .await
        .expect("drift");
    sender()
        .start()
        .await
        .expect("sender")
        .shutdown()
        .await
        .expect("stop");
    assert_eq!(
        visibility(&t, &queue).await,
        "10",
        "a sender never corrects"
    );
    consumer()
        .start()
        .await
        .expect("consumer")
        .shutdown()
        .await
        .expect("stop");
    assert_eq!(visibility(&t, &queue).await, "45", "its consumer does");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_names_subscription_differences_and_stale_subscriptions() {
    if !enabled() {
        return;
    }
    let t = AwsTransport::from_env().await.expect("transport");
    let p = prefix();
    service(&t, &p, "auditor", &["placed", "refunded", "audited"])
        .start()
        .await
        .expect("start")
        .shutdown()
        .await
        .expect("stop");
    // The next release handles `Placed` only.
    let err = service(&t, &p, "auditor", &["placed"])
        .transport(t.clone().provision_mode(ProvisionMode::Validate))
        .start()
        .await
        .expect_err("the subscriptions differ");
    let text = err.to_string();
    let events_queue = format!("{p}-auditor-aws-topo-events");
    assert!(
        text.contains(&format!(
            "subscription of queue `{events_queue}` to topic `{p}-aws-topo-events`: FilterPolicy is"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "queue `{p}-auditor-aws-topo-audit` is still subscribed to topic `{p}-aws-topo-audit`"
        )),
        "{text}"
    );
    // Creating corrects the filter but leaves the stale subscription to `prune`.
    let app = service(&t, &p, "auditor", &["placed"])
        .start()
        .await
        .expect("start");
    let findings = app.inspect().await.expect("inspect");
    assert_eq!(
        findings.len(),
        1,
        "only the stale subscription: {findings:?}"
    );
    assert_eq!(app.prune().await.expect("prune").len(), 1);
    assert!(app.inspect().await.expect("inspect").is_empty());
    app.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_a_subscription_removed_behind_the_services_back() {
    use sourceflow::health::Status;
    if !enabled() {
        return;
    }
    let t = AwsTransport::from_env().await.expect("transport");
    let p = prefix();
    let app = service(&t, &p, "watched", &["placed"])
        .start()
        .await
        .expect("start");
    assert_eq!(app.health().await.status, Status::Healthy);
    let id = t.identity().await.expect("identity").clone();
    let topic = id.topic_arn(&app.topic_of::<Placed>());
    let subs = t
        .sns()
        .list_subscriptions_by_topic()
        .topic_arn(&topic)
        .send()
        .await
        .expect("list");
    for s in subs.subscriptions() {
        if let Some(arn) = s.subscription_arn() {
            t.sns()
                .unsubscribe()
                .subscription_arn(arn)
                .send()
                .await
                .expect("unsubscribe");
        }
    }
    let report = app.health().await;
    assert_eq!(report.status, Status::Unhealthy, "{report:#?}");
    let detail = &report.check("transport").expect("transport").detail;
    assert!(detail.contains("subscription"), "{detail}");
    app.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_the_kms_key() {
    use sourceflow::health::Status;
    if !enabled() {
        return;
    }
    let cfg = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    let kms = aws_sdk_kms::Client::new(&cfg);
    let key = kms
        .create_key()
        .send()
        .await
        .expect("key")
        .key_metadata()
        .expect("meta")
        .key_id()
        .to_string();
    let provider = sourceflow::encryption::KmsKeyProvider::new(kms.clone(), &key)
        .described()
        .await
        .expect("key usable");
    let t = AwsTransport::from_env().await.expect("transport");
    let app = service(&t, &prefix(), "keyed", &["placed"])
        .key_provider(provider)
        .start()
        .await
        .expect("start");
    let check = app
        .health()
        .await
        .check("encryption key")
        .cloned()
        .expect("check");
    assert_eq!(check.status, Status::Healthy, "{check:?}");
    kms.disable_key()
        .key_id(&key)
        .send()
        .await
        .expect("disable");
    let check = app
        .health()
        .await
        .check("encryption key")
        .cloned()
        .expect("check");
    assert_eq!(check.status, Status::Unhealthy, "{check:?}");
    assert!(check.detail.contains("disabled"), "{check:?}");
    app.shutdown().await.expect("shutdown");
}
