//! The exports and the operator command line against the emulator: the CloudFormation
//! template, deployed to the emulator's CloudFormation (tests/support/stack.sh, boto3), is
//! accepted by `SOURCEFLOW_PROVISION=validate` and carries messages; the command line's
//! broker commands (`validate`, `prune`, `dlq list|peek|redrive`) run as a process on a
//! deployed stack (the fixture of tests/cli).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::transport::aws::{AwsTransport, ProvisionMode};
use sourceflow::{command, event, handler, Context, State};
use tokio::sync::mpsc;

use super::{enabled, prefix};

pub const MODULE: &str = module_path!();

#[command(
    queue = "cfn-jobs.fifo",
    name = "cfn.RunJob.v1",
    visibility_timeout = "90s",
    high_throughput,
    tags(team = "jobs")
)]
#[derive(Debug, Clone, Serialize, Deserialize, sourceflow::schemars::JsonSchema)]
pub struct RunJob {
    #[entity_id]
    pub job: u64,
}

#[event(topic = "cfn-job-events", name = "cfn.JobDone.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobDone {
    pub job: u64,
}

#[derive(Clone)]
struct Done(mpsc::UnboundedSender<u64>);

#[handler]
async fn run_job(cmd: RunJob, ctx: &Context) -> sourceflow::Result<()> {
    ctx.raise(JobDone { job: cmd.job }).await
}

#[handler(retention = "1d")]
async fn job_done(evt: JobDone, State(done): State<Done>) {
    let _ = done.0.send(evt.job);
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Deploys `template` as stack `name` on the emulator's CloudFormation (waits for it).
fn deploy(name: &str, template: &serde_json::Value) {
    let file = std::env::temp_dir().join(format!("{name}.template.json"));
    std::fs::write(&file, template.to_string()).expect("write template");
    let out = Command::new(root().join("tests/support/stack.sh"))
        .args(["deploy", name])
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .expect("run stack.sh");
    assert!(
        out.status.success(),
        "stack {name} not deployed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn delete(name: &str) {
    let _ = Command::new(root().join("tests/support/stack.sh"))
        .args(["delete", name])
        .stdin(Stdio::null())
        .output();
}

fn service(t: &AwsTransport, p: &str, done: Done) -> sourceflow::Builder {
    sourceflow::builder()
        .service("cfn")
        .prefix(p)
        .transport(t.clone())
        .handlers(|h| h.module_path == MODULE)
        .state(done)
        .receive_wait(Duration::from_secs(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployed_cloudformation_template_passes_validate_and_carries_messages() {
    if !enabled() {
        return;
    }
    let p = prefix();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let t = AwsTransport::from_env()
        .await
        .expect("transport")
        .provision_mode(ProvisionMode::Validate);
    let plan = service(&t, &p, Done(tx.clone()))
        .plan()
        .await
        .expect("plan");
    let template = sourceflow::export::cloudformation(
        &plan,
        &sourceflow::export::CloudFormationOptions::default(),
    );

    // Before the stack exists, validate refuses to start: the check is live.
    let refused = service(&t, &p, Done(tx.clone()))
        .start()
        .await
        .expect_err("validate without the stack");
    let why = refused.to_string();
    assert!(
        why.contains(&format!("queue `{p}-cfn-jobs.fifo` is missing")),
        "{why}"
    );

    deploy(&p, &template);
    let app = service(&t, &p, Done(tx))
        .start()
        .await
        .unwrap_or_else(|e| panic!("validate refused the deployed stack: {e}"));
    assert!(
        app.inspect().await.expect("inspect").is_empty(),
        "the stack is what the routes need"
    );
    for job in 1..=3u64 {
        app.send(RunJob { job }).await.expect("send");
    }
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some(job)) => seen.push(job),
            _ => panic!("only {seen:?} of 3 jobs went command -> event -> subscriber queue"),
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, [1, 2, 3]);
    let health = app.health().await;
    assert_eq!(
        health.check("transport").map(|c| c.status),
        Some(sourceflow::health::Status::Healthy),
        "{health:?}"
    );
    app.shutdown().await.expect("shutdown");
    delete(&p);
}

// ---- the command line's broker commands, as a process ------------------------------------

/// The fixture binary of tests/cli, when this build has it (feature `test-fixtures`).
const FIXTURE: Option<&str> = option_env!("CARGO_BIN_EXE_sourceflow-cli-fixture");

fn cli(bin: &str, p: &str, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .env("SOURCEFLOW_TRANSPORT", "aws")
        .env("SOURCEFLOW_PREFIX", p)
        .env_remove("SOURCEFLOW_PROVISION")
        .stdin(Stdio::null())
        .output()
        .expect("run the fixture")
}

fn out(o: &Output) -> String {
    format!(
        "exit {:?}\n{}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_validates_prunes_and_handles_dead_letters() {
    if !enabled() {
        return;
    }
    let Some(bin) = FIXTURE else {
        println!("skipped: build with --features test-fixtures for the command-line fixture");
        return;
    };
    let p = prefix();
    let o = cli(bin, &p, &["validate"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "nothing deployed yet: {}",
        out(&o)
    );
    assert!(out(&o).contains(&format!("queue `{p}-cli-orders.fifo` is missing")));

    let o = cli(bin, &p, &["export", "cloudformation"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    let template: serde_json::Value = serde_json::from_slice(&o.stdout).expect("template");
    deploy(&p, &template);
    let o = cli(bin, &p, &["validate"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(out(&o).starts_with("exit Some(0)\nok: 6 queues, 1 topics and 1 subscriptions match"));

    // Drift on a queue the fixture owns: validate names it and exits 1.
    let t = AwsTransport::from_env().await.expect("transport");
    let orders = format!("{p}-cli-orders.fifo");
    let url = t.queue_url(&orders).await.expect("url");
    t.sqs()
        .set_queue_attributes()
        .queue_url(&url)
        .attributes(
            aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout,
            "31",
        )
        .send()
        .await
        .expect("drift");
    let o = cli(bin, &p, &["validate"]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(
        out(&o).contains(&format!(
            "queue `{orders}`: VisibilityTimeout is 31, expected 120"
        )),
        "{}",
        out(&o)
    );

    // A dead letter: listed, peeked (twice: it stays), redriven.
    let dlq = format!("{p}-cli-orders-dlq.fifo");
    let dlq_url = t.queue_url(&dlq).await.expect("dlq url");
    t.sqs()
        .send_message()
        .queue_url(&dlq_url)
        .message_body(r#"{"not":"an envelope"}"#)
        .message_group_id("g")
        .message_deduplication_id("d1")
        .message_attributes(
            "sourceflow.dlq_reason",
            aws_sdk_sqs::types::MessageAttributeValue::builder()
                .data_type("String")
                .string_value("not a sourceflow envelope")
                .build()
                .expect("attribute"),
        )
        .send()
        .await
        .expect("dead letter");
    let o = cli(bin, &p, &["dlq", "list"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    let line = out(&o)
        .lines()
        .find(|l| l.starts_with(&dlq))
        .map(str::to_string)
        .unwrap_or_default();
    assert_eq!(
        line.split_whitespace().collect::<Vec<_>>(),
        [dlq.as_str(), orders.as_str(), "1", "0"],
        "{}",
        out(&o)
    );
    for _ in 0..2 {
        let o = cli(bin, &p, &["dlq", "peek", &orders, "--max", "5"]);
        assert_eq!(o.status.code(), Some(0), "{}", out(&o));
        let text = out(&o);
        assert!(text.contains("reason: not a sourceflow envelope"), "{text}");
        assert!(text.contains(r#"body: {"not":"an envelope"}"#), "{text}");
        assert!(
            text.contains(&format!("1 message(s) in {dlq} (left in place)")),
            "{text}"
        );
    }
    let o = cli(bin, &p, &["dlq", "redrive", &dlq]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(out(&o).contains(&format!("moved 1 message(s) from {dlq} back to {orders}")));

    // A subscription of the service's queue to a topic it no longer handles.
    let stale_topic = format!("{p}-cli-retired");
    let topic_arn = t
        .sns()
        .create_topic()
        .name(&stale_topic)
        .send()
        .await
        .expect("topic")
        .topic_arn()
        .unwrap_or_default()
        .to_string();
    let id = t.identity().await.expect("identity").clone();
    let subscriber = format!("{p}-sourceflow-cli-fixture-cli-order-events");
    t.sns()
        .subscribe()
        .topic_arn(&topic_arn)
        .protocol("sqs")
        .endpoint(id.queue_arn(&subscriber))
        .send()
        .await
        .expect("subscribe");
    let o = cli(bin, &p, &["prune"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(out(&o).contains(&format!(
        "stale: subscription of queue {subscriber} to topic {stale_topic}"
    )));
    let o = cli(bin, &p, &["prune", "--yes"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(out(&o).contains("removed: subscription"), "{}", out(&o));
    let o = cli(bin, &p, &["prune"]);
    assert!(out(&o).contains("nothing to prune"), "{}", out(&o));
    delete(&p);
}
