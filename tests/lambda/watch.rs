//! The orders example's function (`examples/orders_lambda.rs`) as a process: under
//! `cargo lambda watch` (the Lambda runtime API emulator of cargo-lambda, installed from
//! PyPI by tests/support/cargo-lambda.sh) invoked with `cargo lambda invoke --data-file`,
//! and on a bare runtime API of the test's own with no reachable AWS endpoint.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use aws_lambda_events::event::sqs::SqsBatchResponse;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::orders::{self, ProcessPayment};
use super::{creating, enabled, failures, prefix, sender, Sqs};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// cargo-lambda, installed under .cache/ on first use.
fn cargo_lambda() -> PathBuf {
    let out = std::process::Command::new(repo().join("tests/support/cargo-lambda.sh"))
        .arg("--install")
        .stderr(Stdio::inherit())
        .output()
        .expect("tests/support/cargo-lambda.sh runs");
    assert!(out.status.success(), "cargo-lambda could not be installed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// `--no-default-features --features …` as this test binary was built: the example is
/// then built with the library this test already compiled, not a second time.
fn features() -> Vec<String> {
    let on = [
        ("aws", cfg!(feature = "aws")),
        ("cli", cfg!(feature = "cli")),
        ("health-http", cfg!(feature = "health-http")),
        ("sqlite", cfg!(feature = "sqlite")),
        ("postgres", cfg!(feature = "postgres")),
        ("dynamodb", cfg!(feature = "dynamodb")),
        ("failpoints", cfg!(feature = "failpoints")),
        ("testing", cfg!(feature = "testing")),
        ("test-fixtures", cfg!(feature = "test-fixtures")),
        ("lambda", cfg!(feature = "lambda")),
    ];
    let list: Vec<&str> = on.iter().filter(|(_, on)| *on).map(|(f, _)| *f).collect();
    vec![
        "--no-default-features".into(),
        "--features".into(),
        list.join(","),
    ]
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    l.local_addr().expect("addr").port()
}

/// A child process in a process group of its own, killed with it when dropped.
struct Group(tokio::process::Child);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pid) = self.0.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", "--", &format!("-{pid}")])
                .status();
        }
    }
}

fn payment(order_id: u64, amount_cents: u64) -> ProcessPayment {
    ProcessPayment {
        order_id,
        amount_cents,
    }
}

/// Two payments that go through, one over the card limit, a poison record; the function
/// runs one record at a time and the card network fails the first charge: exactly that
/// record comes back, the rejection and the poison are dead-lettered with their reasons,
/// and the other two were charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_function_under_cargo_lambda_watch_reports_its_failures() {
    if !enabled() {
        return;
    }
    let bin = cargo_lambda();
    let p = prefix();
    // The queues and topics, created by the test (the function itself assumes them).
    let payments = orders::service(Default::default(), Default::default())
        .service("payments")
        .prefix(&p)
        .transport(creating().await)
        .handlers(|h| h.destination == "payments");
    sourceflow::lambda::Function::new(payments)
        .await
        .expect("provisioned");
    let app = sender(&p).await;
    let sqs = Sqs::new().await;
    for (id, cents) in [(1, 1_500), (2, 2_000_000), (3, 2_500), (4, 3_500)] {
        app.send(payment(id + 1000 * fastrand::u64(1..1000), cents))
            .await
            .expect("send");
    }
    let queue = format!("{p}-payments");
    sqs.send_raw(&queue, "poison", &Default::default()).await;
    let event = sqs.event(&queue, 5, Duration::from_secs(10)).await;
    assert_eq!(event.records.len(), 5);
    // Run one at a time, the first charge fails: the first record under the limit.
    let charged: Vec<(String, u64)> = event
        .records
        .iter()
        .filter_map(|r| {
            let env: serde_json::Value = serde_json::from_str(r.body.as_deref()?).ok()?;
            let cents = env.pointer("/payload/amount_cents")?.as_u64()?;
            let order = env.pointer("/payload/order_id")?.as_u64()?;
            (cents <= orders::CARD_LIMIT_CENTS)
                .then(|| (r.message_id.clone().unwrap_or_default(), order))
        })
        .collect();
    assert_eq!(charged.len(), 3, "three payments under the limit");
    let data = std::env::temp_dir().join(format!("{p}-batch.json"));
    std::fs::write(&data, serde_json::to_vec(&event).expect("json")).expect("write the batch");

    let port = free_port().to_string();
    let mut watch = tokio::process::Command::new(&bin);
    watch
        .args(["lambda", "watch", "-p", "sourceflow"])
        .args(features())
        .args(["--example", "orders_lambda", "--ignore-changes", "-q"])
        .args(["-A", "127.0.0.1", "-P", &port])
        .current_dir(repo())
        .env("SOURCEFLOW_PREFIX", &p)
        .env("SOURCEFLOW_CONCURRENCY", "1")
        .env("ORDERS_LAMBDA_OUTAGES", "1")
        .env_remove("SOURCEFLOW_PROVISION")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0);
    let mut watch = Group(watch.spawn().expect("cargo lambda watch starts"));
    let mut out = BufReader::new(watch.0.stdout.take().expect("stdout")).lines();
    let printed = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Ok(Some(l)) = out.next_line().await {
            println!("watch: {l}");
            all.push(l);
        }
        all
    });
    wait_for_port(&port).await;
    let invoked = tokio::process::Command::new(&bin)
        .args([
            "lambda",
            "invoke",
            "-A",
            "127.0.0.1",
            "-P",
            &port,
            "-o",
            "json",
        ])
        .arg("--data-file")
        .arg(&data)
        .current_dir(repo())
        .output();
    let invoked = tokio::time::timeout(Duration::from_secs(300), invoked)
        .await
        .expect("the invocation answers (the first builds the example)")
        .expect("cargo lambda invoke runs");
    let _ = std::fs::remove_file(&data);
    assert!(
        invoked.status.success(),
        "cargo lambda invoke: {}",
        String::from_utf8_lossy(&invoked.stderr)
    );
    let response: SqsBatchResponse =
        serde_json::from_slice(&invoked.stdout).expect("an SQS batch response");
    assert_eq!(failures(&response), vec![charged[0].0.clone()]);
    let mut reasons = sqs.reasons(&format!("{queue}-dlq"), 2).await;
    reasons.sort();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].contains("amount over the card limit"),
        "{reasons:?}"
    );
    assert!(reasons[1].starts_with("undecodable message"), "{reasons:?}");
    drop(watch);
    let lines = printed.await.expect("output");
    for (_, order) in &charged[1..] {
        let line = format!("[payments] ProcessPayment #{order} charged");
        assert!(
            lines.iter().any(|l| l.contains(&line)),
            "{line} in {lines:?}"
        );
    }
    assert!(
        !lines
            .iter()
            .any(|l| l.contains(&format!("#{} charged", charged[0].1))),
        "the failed charge was not reported charged"
    );
}

async fn wait_for_port(port: &str) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cargo lambda watch did not listen on {port}");
}

/// The example binary, built like `cargo lambda watch` builds it.
fn example() -> PathBuf {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "sourceflow"])
        .args(features())
        .args(["--example", "orders_lambda"])
        .current_dir(repo())
        .status()
        .expect("cargo runs");
    assert!(status.success(), "the example builds");
    let exe = std::env::current_exe().expect("test binary");
    let profile = exe.parent().and_then(Path::parent).expect("target/debug");
    profile.join("examples/orders_lambda")
}

/// A runtime API that only notes the first poll for an invocation: what the function
/// asked, or `None` when it exited (or did not ask) within `within`.
async fn first_poll(
    child: &mut tokio::process::Child,
    api: tokio::net::TcpListener,
    within: Duration,
) -> Option<String> {
    let poll = async {
        let (mut s, _) = api.accept().await.ok()?;
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).await.ok()?;
        let _ = s.shutdown().await;
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        head.lines().next().map(str::to_string)
    };
    tokio::select! {
        got = tokio::time::timeout(within, poll) => got.ok().flatten(),
        _ = child.wait() => None,
    }
}

/// Cold start: the function builds everything and asks for its first invocation without
/// a single AWS call (`assume` is its default): here every AWS endpoint is a closed port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_function_starts_without_calling_aws() {
    if !enabled() {
        return;
    }
    let exe = example();
    let closed = free_port();
    let api = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = api.local_addr().expect("addr");
    let mut child = tokio::process::Command::new(&exe)
        .env("AWS_LAMBDA_RUNTIME_API", addr.to_string())
        .env("AWS_LAMBDA_FUNCTION_NAME", "orders_lambda")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{closed}"))
        .env("SOURCEFLOW_PREFIX", prefix())
        .env_remove("SOURCEFLOW_PROVISION")
        .kill_on_drop(true)
        .spawn()
        .expect("the example runs");
    let got = first_poll(&mut child, api, Duration::from_secs(20)).await;
    let _ = child.kill().await;
    assert_eq!(
        got.as_deref(),
        Some("GET /2018-06-01/runtime/invocation/next HTTP/1.1")
    );
}
