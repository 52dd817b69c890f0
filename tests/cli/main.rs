//! The operator command line as a process: `sourceflow-cli-fixture` (tests/cli/fixture.rs),
//! a small service whose `main` is `sourceflow::cli::main()`. Help, usage errors (exit 2),
//! failures (exit 1, one line), and `topology`, `iam-policy` and `export` with the AWS
//! transport configured and no broker anywhere: the AWS endpoint is a loopback port that
//! counts connections, and must see none.
//!
//! With `SOURCEFLOW_TEST_TOOLS=1` (tests/run.sh sets it), the exports are also checked by
//! the real tools: `cfn-lint` (tests/support/cfn-lint.sh) and the official AsyncAPI parser
//! (tests/support/asyncapi.sh), each installed under .cache/ on first use.
//!
//! ```text
//! cargo test -p sourceflow --all-features --test cli
//! ```

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_sourceflow-cli-fixture");

/// A loopback port that accepts and counts connections without answering.
struct Endpoint(TcpListener);

impl Endpoint {
    fn new() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        Endpoint(l)
    }

    fn url(&self) -> String {
        format!("http://{}", self.0.local_addr().expect("addr"))
    }

    fn connections(&self) -> usize {
        let mut n = 0;
        while self.0.accept().is_ok() {
            n += 1;
        }
        n
    }
}

/// The fixture with a clean environment: the AWS transport, static test credentials, no
/// instance metadata, and `endpoint` as every AWS endpoint.
fn fixture(endpoint: &str) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SOURCEFLOW_TRANSPORT", "aws")
        .env("SOURCEFLOW_PREFIX", "clitest")
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_REGION", "eu-west-1")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(Stdio::null());
    c
}

fn run(c: &mut Command) -> Output {
    c.output().expect("run the fixture")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sourceflow-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    dir.join(name)
}

#[test]
fn help_is_useful_to_a_person() {
    let out = run(fixture("http://127.0.0.1:9").arg("--help"));
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    for word in [
        "serve",
        "topology",
        "iam-policy",
        "export",
        "validate",
        "prune",
        "dlq",
        "--prefix",
        "--service",
        "SOURCEFLOW_TRANSPORT",
        "Examples:",
    ] {
        assert!(help.contains(word), "`{word}` not in --help:\n{help}");
    }
    let out = run(fixture("http://127.0.0.1:9").args(["dlq", "--help"]));
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    for word in ["list", "peek", "redrive"] {
        assert!(help.contains(word), "`{word}` not in dlq --help:\n{help}");
    }
    let out = run(fixture("http://127.0.0.1:9").args(["prune", "--help"]));
    assert!(text(&out.stdout).contains("--yes"));
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        vec!["bogus"],
        vec!["dlq", "peek"],
        vec!["dlq", "peek", "q", "--max", "0"],
        vec!["export", "yaml"],
        vec!["iam-policy", "--provisioning", "sometimes"],
    ] {
        let out = run(fixture("http://127.0.0.1:9").args(&args));
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        let err = text(&out.stderr);
        assert!(
            err.starts_with("error:") && err.contains("--help"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn topology_needs_no_broker() {
    let endpoint = Endpoint::new();
    let out = run(fixture(&endpoint.url()).arg("topology"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let t = text(&out.stdout);
    for line in [
        "service sourceflow-cli-fixture (prefix clitest)",
        "QUEUE",
        "clitest-cli-orders.fifo",
        "clitest-cli-orders-dlq.fifo",
        "clitest-sourceflow-cli-fixture-cli-order-events",
        "clitest-cli-mail",
        "TOPIC",
        "clitest-cli-order-events -> clitest-sourceflow-cli-fixture-cli-order-events",
        r#"{"sourceflow.type":["cli.OrderPlaced.v1"]}"#,
        "cli.PlaceOrder.v1",
    ] {
        assert!(t.contains(line), "`{line}` not in:\n{t}");
    }
    let row = |name: &str| {
        t.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_default()
            .to_string()
    };
    let orders = row("clitest-cli-orders.fifo");
    assert!(
        orders.contains("consumed")
            && orders.contains("yes, high throughput")
            && orders.contains("2m")
            && orders.contains("team=orders"),
        "{orders}"
    );
    let mail = row("clitest-cli-mail");
    assert!(
        mail.contains("send-only") && mail.contains("30s") && mail.contains("none"),
        "{mail}"
    );
    assert_eq!(endpoint.connections(), 0, "topology must not contact AWS");
}

#[test]
fn iam_policy_needs_no_broker() {
    let endpoint = Endpoint::new();
    let out = run(fixture(&endpoint.url())
        .env("SOURCEFLOW_ACCOUNT_ID", "123456789012")
        .env("SOURCEFLOW_KMS_KEY_ID", "alias/payloads")
        .arg("iam-policy"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let p: Value = serde_json::from_slice(&out.stdout).expect("JSON policy");
    let text = p.to_string();
    assert!(text.contains("arn:aws:sqs:eu-west-1:123456789012:clitest-cli-orders.fifo"));
    assert!(text.contains("sqs:CreateQueue"), "create mode by default");
    assert!(text.contains("kms:DescribeKey") && text.contains("alias/payloads"));
    let out = run(fixture(&endpoint.url()).args(["iam-policy", "--provisioning", "validate"]));
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("sns:ListSubscriptions") && !text.contains("sqs:CreateQueue"));
    assert!(
        text.contains("${AWS::AccountId}"),
        "placeholders without SOURCEFLOW_ACCOUNT_ID"
    );
    assert_eq!(endpoint.connections(), 0, "iam-policy must not contact AWS");
}

fn export(endpoint: &Endpoint, what: &str) -> Value {
    let file = tmp(&format!("{what}.json"));
    let out = run(fixture(&endpoint.url())
        .args(["export", what, "--out"])
        .arg(&file));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty(), "--out writes nothing to stdout");
    serde_json::from_slice(&std::fs::read(&file).expect("exported file")).expect("JSON")
}

#[test]
fn exports_need_no_broker() {
    let endpoint = Endpoint::new();
    let t = export(&endpoint, "cloudformation");
    let orders = &t["Resources"]["QueueClitestCliOrdersFifo"];
    assert_eq!(orders["Type"], "AWS::SQS::Queue");
    assert_eq!(orders["Properties"]["QueueName"], "clitest-cli-orders.fifo");
    assert_eq!(orders["Properties"]["VisibilityTimeout"], 120);
    assert_eq!(
        orders["Properties"]["FifoThroughputLimit"],
        "perMessageGroupId"
    );
    assert_eq!(
        t["Resources"]["ServicePolicy"]["Type"],
        "AWS::IAM::ManagedPolicy"
    );
    let out = run(fixture(&endpoint.url()).args(["export", "asyncapi"]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let d: Value = serde_json::from_slice(&out.stdout).expect("JSON document on stdout");
    assert_eq!(d["asyncapi"], "3.0.0");
    let schemas = &d["components"]["schemas"];
    assert_eq!(
        schemas["cli.PlaceOrder.v1.Payload"]["properties"]["lines"]["items"]["$ref"],
        "#/components/schemas/cli.PlaceOrder.v1.Line",
        "the payload schema comes from the type's JsonSchema derive"
    );
    assert_eq!(
        schemas["cli.PlaceOrder.v1.Line"]["properties"]["quantity"]["type"],
        "integer"
    );
    let placed =
        &d["components"]["messages"]["cli.OrderPlaced.v1"]["payload"]["properties"]["payload"];
    assert!(
        placed["description"]
            .as_str()
            .is_some_and(|s| s.contains("does not derive `JsonSchema`")),
        "{placed}"
    );
    assert_eq!(endpoint.connections(), 0, "export must not contact AWS");
}

#[test]
fn failures_exit_1_with_one_line() {
    let endpoint = Endpoint::new();
    // Writing where nothing can be written.
    let out = run(fixture(&endpoint.url()).args([
        "export",
        "asyncapi",
        "--out",
        "/nonexistent-dir/x.json",
    ]));
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("error: cannot write /nonexistent-dir/x.json"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // The embedded transport has no broker to read.
    let out = run(fixture(&endpoint.url())
        .env("SOURCEFLOW_TRANSPORT", "memory")
        .arg("validate"));
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("set SOURCEFLOW_TRANSPORT=aws"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // A queue that is not the service's (checked before any call).
    let out = run(fixture(&endpoint.url()).args(["dlq", "peek", "nope"]));
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("queue `nope` is not one of this service's queues")
            && err.contains("clitest-cli-orders.fifo"),
        "{err}"
    );
    assert_eq!(endpoint.connections(), 0);
    // A broker that is not there: one line, no SDK dump.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", l.local_addr().expect("addr"));
        drop(l);
        url
    };
    for args in [vec!["validate"], vec!["dlq", "list"], vec!["prune"]] {
        let started = Instant::now();
        let out = run(fixture(&closed).args(&args));
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(started.elapsed() < Duration::from_secs(60));
    }
}

#[test]
fn serve_keeps_serving_until_sigterm() {
    // The embedded transport: serving needs no broker.
    let mut child = fixture("http://127.0.0.1:9")
        .env("SOURCEFLOW_TRANSPORT", "memory")
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "serve exited by itself"
    );
    let pid = child.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "serve did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(0));
}

// ---- the exports checked by the real tools ------------------------------------------------

fn tools() -> bool {
    if std::env::var("SOURCEFLOW_TEST_TOOLS").as_deref() != Ok("1") {
        println!("skipped: set SOURCEFLOW_TEST_TOOLS=1 (tests/run.sh does) to run cfn-lint and the AsyncAPI parser");
        return false;
    }
    true
}

fn support(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/support")
        .join(script)
}

/// cfn-lint finds no error in the template at `file` (its exit code: bit 1 = a failure to
/// run, 2 = errors, 4 = warnings, 8 = informational; only the first two fail).
fn assert_cfn_lint_accepts(file: &Path) {
    let out = check("cfn-lint.sh", file);
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code >= 0 && code & 3 == 0,
        "cfn-lint exit {code}:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn check(script: &str, file: &Path) -> Output {
    Command::new(support(script))
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .expect("run the checker")
}

#[test]
fn cfn_lint_reports_no_error_on_the_template() {
    if !tools() {
        return;
    }
    let endpoint = Endpoint::new();
    let template = export(&endpoint, "cloudformation");
    assert!(template["Resources"].get("IdempotencyTable").is_none());
    // With the DynamoDB idempotency store the template also holds its table; with the
    // claim check, its bucket and lifecycle rule.
    let file = tmp("lint-dynamodb.json");
    let out = run(fixture(&endpoint.url())
        .env("SOURCEFLOW_IDEMPOTENCY", "dynamodb://clitest-idempotency")
        .env("SOURCEFLOW_CLAIM_CHECK_BUCKET", "clitest-claims")
        .args(["export", "cloudformation", "--out"])
        .arg(&file));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let with_table: Value =
        serde_json::from_slice(&std::fs::read(&file).expect("read")).expect("JSON");
    assert_eq!(
        with_table["Resources"]["IdempotencyTable"]["Properties"]["TableName"],
        "clitest-idempotency"
    );
    let bucket = &with_table["Resources"]["ClaimCheckBucket"]["Properties"];
    assert_eq!(bucket["BucketName"], "clitest-claims");
    assert_eq!(
        bucket["LifecycleConfiguration"]["Rules"][0]["Prefix"],
        "clitest-claims/"
    );
    assert_cfn_lint_accepts(&file);
    let file = tmp("lint.json");
    std::fs::write(&file, template.to_string()).expect("write");
    assert_cfn_lint_accepts(&file);
    // The check can fail: a visibility timeout over SQS's limit is an error.
    let mut broken = template.clone();
    broken["Resources"]["QueueClitestCliOrdersFifo"]["Properties"]["VisibilityTimeout"] =
        99_999.into();
    std::fs::write(&file, broken.to_string()).expect("write");
    let out = check("cfn-lint.sh", &file);
    assert!(
        out.status.code().is_some_and(|c| c & 2 != 0),
        "cfn-lint missed an error: {}",
        text(&out.stdout)
    );
}

/// `export cloudformation --lambda-function …`: one event source mapping per consumed
/// queue, reporting batch item failures, with the batch size and maximum concurrency
/// asked for; a function timeout not below a queue's visibility timeout is refused (exit
/// 1, one line); the role gets the mappings' statement; cfn-lint accepts the template.
#[test]
fn the_template_maps_a_lambda_function_to_each_consumed_queue() {
    let endpoint = Endpoint::new();
    let arn = "arn:aws:lambda:eu-west-1:123456789012:function:clitest";
    let lambda = |timeout: &str| {
        let mut c = fixture(&endpoint.url());
        c.args(["export", "cloudformation", "--lambda-function", arn])
            .args(["--lambda-timeout", timeout, "--lambda-batch-size", "5"])
            .args(["--lambda-max-concurrency", "4"]);
        c
    };
    let file = tmp("lambda.json");
    let out = run(lambda("20").arg("--out").arg(&file));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let t: Value = serde_json::from_slice(&std::fs::read(&file).expect("read")).expect("JSON");
    let resources = t["Resources"].as_object().expect("resources");
    let mut mapped: Vec<String> = resources
        .values()
        .filter(|r| r["Type"] == "AWS::Lambda::EventSourceMapping")
        .map(|r| {
            let p = &r["Properties"];
            assert_eq!(p["FunctionName"], arn);
            assert_eq!(
                p["FunctionResponseTypes"],
                serde_json::json!(["ReportBatchItemFailures"])
            );
            assert_eq!(p["BatchSize"], 5);
            assert_eq!(p["ScalingConfig"]["MaximumConcurrency"], 4);
            let queue = p["EventSourceArn"]["Fn::GetAtt"][0]
                .as_str()
                .expect("a queue");
            resources[queue]["Properties"]["QueueName"]
                .as_str()
                .expect("name")
                .to_string()
        })
        .collect();
    mapped.sort();
    let topology = text(&run(fixture(&endpoint.url()).arg("topology")).stdout);
    let mut consumed: Vec<String> = topology
        .lines()
        .filter(|l| l.contains(" consumed"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|q| !q.contains("-dlq"))
        .collect();
    consumed.sort();
    assert!(!mapped.is_empty());
    assert_eq!(mapped, consumed, "one mapping per consumed queue");
    let statements = t["Resources"]["ServicePolicy"]["Properties"]["PolicyDocument"]["Statement"]
        .as_array()
        .expect("statements");
    assert!(statements.iter().any(|s| s["Sid"] == "LambdaEventSource"));

    // 45 s is the subscriber queue's visibility timeout: not below it.
    let out = run(&mut lambda("45"));
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("timeout (45 s) is not below the visibility timeout of queue `clitest-sourceflow-cli-fixture-cli-order-events` (45 s)"),
        "{err}"
    );
    assert_eq!(endpoint.connections(), 0);

    let out = run(fixture(&endpoint.url()).args(["iam-policy", "--lambda"]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("\"LambdaEventSource\""));

    if tools() {
        assert_cfn_lint_accepts(&file);
    }
}

#[test]
fn the_asyncapi_parser_validates_the_document() {
    if !tools() {
        return;
    }
    let endpoint = Endpoint::new();
    let doc = export(&endpoint, "asyncapi");
    let file = tmp("doc.json");
    std::fs::write(&file, doc.to_string()).expect("write");
    let out = check("asyncapi.sh", &file);
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{report}{}", text(&out.stderr));
    assert!(report.contains("valid AsyncAPI 3.0.0"), "{report}");
    // The check can fail: an operation on a channel that does not exist is an error.
    let mut broken = doc.clone();
    broken["operations"]["send.cli.PlaceOrder.v1"]["channel"]["$ref"] = "#/channels/nope".into();
    std::fs::write(&file, broken.to_string()).expect("write");
    let out = check("asyncapi.sh", &file);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the parser missed an error: {}",
        text(&out.stdout)
    );
}
