//! User-defined headers (`sourceflow::headers`): set on a send, read by the handler,
//! propagated through a saga when the service asks, refused at the call when they do not
//! fit within SQS's 10 message attributes, and never logged unless marked safe.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::{command, event, handler, Context, Error, SendOptions, State};

use crate::harness::{eventually, telemetry, Harness};

/// The `tenant`, `user` and `note` headers one step saw.
type Saw = (Option<String>, Option<String>, Option<String>);

/// What each step of the saga saw: (step, id, headers).
#[derive(Clone, Default)]
pub struct Seen(Arc<Mutex<Vec<(String, u32, Saw)>>>);

impl Seen {
    fn push(&self, step: &str, id: u32, ctx: &Context) {
        let h = |n: &str| ctx.header(n).map(str::to_string);
        let saw = (h("tenant"), h("user"), h("note"));
        self.0
            .lock()
            .expect("seen")
            .push((step.to_string(), id, saw));
    }
    fn of(&self, step: &str, id: u32) -> Option<Saw> {
        let seen = self.0.lock().expect("seen");
        seen.iter()
            .find(|(s, i, _)| s == step && *i == id)
            .map(|(_, _, saw)| saw.clone())
    }
}

#[command(queue = "hdr-start", name = "tests.StartSaga.hdr.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StartSaga {
    id: u32,
}

#[event(topic = "hdr-events", name = "tests.SagaStarted.hdr.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SagaStarted {
    id: u32,
}

#[command(queue = "hdr-finish", name = "tests.FinishSaga.hdr.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FinishSaga {
    id: u32,
}

#[command(queue = "hdr-probe", name = "tests.Probe.hdr.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Probe {
    id: u32,
}

#[handler]
async fn start(cmd: StartSaga, ctx: &Context, State(seen): State<Seen>) -> sourceflow::Result<()> {
    seen.push("start", cmd.id, ctx);
    let evt = SagaStarted { id: cmd.id };
    if cmd.id == 2 {
        // Every header of this message, not only the propagated ones.
        return ctx
            .raise_with(evt, SendOptions::new().propagate_headers())
            .await;
    }
    ctx.raise(evt).await
}

#[handler]
async fn started(
    evt: SagaStarted,
    ctx: &Context,
    State(seen): State<Seen>,
) -> sourceflow::Result<()> {
    seen.push("started", evt.id, ctx);
    let options = SendOptions::new().header("note", "from the event");
    ctx.send_with(FinishSaga { id: evt.id }, options).await
}

#[handler]
async fn finish(
    cmd: FinishSaga,
    ctx: &Context,
    State(seen): State<Seen>,
) -> sourceflow::Result<()> {
    seen.push("finish", cmd.id, ctx);
    Ok(())
}

#[handler]
async fn probe(cmd: Probe, ctx: &Context, State(seen): State<Seen>) -> sourceflow::Result<()> {
    seen.push("probe", cmd.id, ctx);
    tracing::info!(id = cmd.id, "probing");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_header_flows_through_a_command_event_command_saga() {
    let h = Harness::new().await;
    let seen = Seen::default();
    let app = h
        .service("hdr-saga", module_path!())
        .state(seen.clone())
        .propagate_header("Tenant")
        .start()
        .await
        .expect("start");
    for id in [1, 2] {
        let options = SendOptions::new()
            .header("tenant", "acme")
            .header("user", "u-7");
        app.send_with(StartSaga { id }, options)
            .await
            .expect("send");
    }
    eventually("both sagas finished", || async {
        seen.of("finish", 1).is_some() && seen.of("finish", 2).is_some()
    })
    .await;
    let some = |s: &str| Some(s.to_string());
    assert_eq!(
        seen.of("start", 1),
        Some((some("acme"), some("u-7"), None)),
        "the handler reads the headers it was sent with"
    );
    assert_eq!(
        seen.of("started", 1),
        Some((some("acme"), None, None)),
        "only the propagated header is passed on"
    );
    assert_eq!(
        seen.of("finish", 1),
        Some((some("acme"), None, some("from the event"))),
        "the tenant reaches the end of the saga, beside the step's own header"
    );
    assert_eq!(
        seen.of("started", 2),
        Some((some("acme"), some("u-7"), None)),
        "`propagate_headers()` passes every header on"
    );
    assert_eq!(
        seen.of("finish", 2),
        Some((some("acme"), None, some("from the event")))
    );
    app.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_do_not_fit_within_the_attribute_limit_are_refused_at_the_call() {
    let h = Harness::new().await;
    let seen = Seen::default();
    let app = h
        .service("hdr-limit", module_path!())
        .state(seen.clone())
        .start()
        .await
        .expect("start");
    let with = |n: usize| (0..n).fold(SendOptions::new(), |o, i| o.attribute(format!("a{i}"), "x"));
    // The most attributes of the producer's that fit without headers.
    let mut fit = 0;
    while app.send_with(Probe { id: 0 }, with(fit + 1)).await.is_ok() {
        fit += 1;
        assert!(fit <= 10, "SQS takes at most 10 attributes");
    }
    assert!(fit >= 1, "at least one attribute fits on a plain command");
    // Any number of headers takes one more slot.
    let err = app
        .send_with(
            Probe { id: 1 },
            with(fit).header("tenant", "acme").header("user", "u-7"),
        )
        .await
        .expect_err("no room for the headers' attribute");
    let Error::TooManyAttributes {
        limit,
        framework,
        headers,
        attributes,
        ..
    } = &err
    else {
        panic!("not the attribute limit: {err}");
    };
    assert_eq!(*limit, 10);
    assert_eq!(framework.len() + 1 + attributes.len(), 11, "{err}");
    assert_eq!(headers, &["tenant", "user"]);
    let text = err.to_string();
    for part in [
        "at most 10 message attributes",
        &format!("sourceflow keeps {}", framework.len()),
        "sourceflow.dlq_reason",
        "your 2 headers (tenant, user)",
        "sourceflow.headers",
        &format!("set at most {} attributes beside headers", fit - 1),
    ] {
        assert!(text.contains(part), "{part:?} not in: {text}");
    }
    let ten = (0..10).fold(SendOptions::new(), |o, i| o.header(format!("h{i}"), "v"));
    app.send_with(
        Probe { id: 2 },
        with(fit - 1).header("tenant", "acme").header("user", "u-7"),
    )
    .await
    .expect("one attribute fewer leaves room for the headers");
    app.send_with(Probe { id: 3 }, ten)
        .await
        .expect("ten headers take one slot");
    eventually("the probes that fit arrived", || async {
        seen.of("probe", 2).is_some() && seen.of("probe", 3).is_some()
    })
    .await;
    assert_eq!(seen.of("probe", 1), None);
    let bad = app
        .send_with(Probe { id: 4 }, SendOptions::new().header("a b", "v"))
        .await
        .expect_err("a bad name");
    assert!(
        matches!(&bad, Error::InvalidHeader { name, .. } if name == "a b"),
        "{bad}"
    );
    app.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_values_are_logged_only_when_marked_safe() {
    let captured = telemetry();
    let h = Harness::new().await;
    let seen = Seen::default();
    let hidden = format!("tenant-hidden-{}", fastrand::u64(..));
    let quiet = h
        .service("hdr-quiet", module_path!())
        .state(seen.clone())
        .propagate_header("tenant")
        .start()
        .await
        .expect("start");
    quiet
        .send_with(
            Probe { id: 10 },
            SendOptions::new().header("tenant", &hidden),
        )
        .await
        .expect("send");
    eventually("the quiet probe ran", || async {
        seen.of("probe", 10).is_some()
    })
    .await;
    quiet.shutdown().await.expect("shutdown");

    let h2 = Harness::new().await;
    let shown = format!("tenant-shown-{}", fastrand::u64(..));
    let secret = format!("user-secret-{}", fastrand::u64(..));
    let loud = h2
        .service("hdr-loud", module_path!())
        .state(seen.clone())
        .log_header("tenant")
        .start()
        .await
        .expect("start");
    let options = SendOptions::new()
        .header("tenant", &shown)
        .header("user", &secret);
    loud.send_with(Probe { id: 11 }, options)
        .await
        .expect("send");
    eventually("the loud probe was logged", || async {
        captured
            .logs
            .lock()
            .expect("logs")
            .contains(&format!("tenant={shown}"))
    })
    .await;
    loud.shutdown().await.expect("shutdown");
    tokio::time::sleep(Duration::from_millis(200)).await;

    let logs = captured.logs.lock().expect("logs").clone();
    let probing = logs
        .lines()
        .find(|l| l.contains("probing") && l.contains(&shown))
        .unwrap_or_default();
    assert!(
        probing.contains("sourceflow.headers"),
        "a safe header is shown on the handler's log lines: {probing}"
    );
    for value in [&hidden, &secret] {
        assert!(
            !logs.contains(value.as_str()),
            "{value} leaked into the logs"
        );
    }
    let spans = captured.spans.get_finished_spans().expect("spans");
    let mut shown_in_a_span = false;
    for s in &spans {
        let text = format!("{:?} {:?}", s.attributes, s.events);
        for value in [&hidden, &secret] {
            assert!(
                !text.contains(value.as_str()),
                "{value} leaked into span {}",
                s.name
            );
        }
        shown_in_a_span |= s.name == "sourceflow.handler" && text.contains(&shown);
    }
    assert!(shown_in_a_span, "the safe header is on the handler span");
}

/// Headers set on a send through the transactional outbox travel as on any other send.
#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_travel_through_the_transactional_outbox() {
    let h = Harness::new().await;
    let store = crate::harness::fresh_sqlite("hdr").await;
    let pool = store.pool().clone();
    let seen = Seen::default();
    let app = h
        .service("hdr-outbox", module_path!())
        .state(seen.clone())
        .sqlite(pool.clone())
        .start()
        .await
        .expect("start");
    let mut tx = pool.begin().await.expect("begin");
    app.outbox()
        .send_with(
            &mut tx,
            Probe { id: 20 },
            SendOptions::new().header("tenant", "acme"),
        )
        .await
        .expect("outbox send");
    tx.commit().await.expect("commit");
    eventually("the probe arrived through the relay", || async {
        seen.of("probe", 20).is_some()
    })
    .await;
    assert_eq!(
        seen.of("probe", 20),
        Some((Some("acme".to_string()), None, None))
    );
    app.shutdown().await.expect("shutdown");
}

/// A handler called directly with a test context reads the headers the context was given.
#[cfg(feature = "testing")]
#[tokio::test]
async fn a_test_context_hands_its_headers_to_a_handler_called_directly() {
    let seen = Seen::default();
    let ctx = sourceflow::testing::TestContext::new()
        .header("tenant", "t9")
        .header("user", "u1");
    probe(Probe { id: 1 }, &ctx, State(seen.clone()))
        .await
        .expect("probe");
    assert_eq!(
        seen.of("probe", 1),
        Some((Some("t9".into()), Some("u1".into()), None))
    );
}
