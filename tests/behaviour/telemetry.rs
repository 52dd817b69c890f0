//! Observability: one trace across services through a queue and a topic, metric values
//! after a known workload, health, and `#[sensitive]` values kept out of spans and logs.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::TraceContextExt;
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, SdkMeterProvider};
use serde::{Deserialize, Serialize};
use sourceflow::envelope::attr;
use sourceflow::health::Status;
use sourceflow::{command, event, handler, Context, SendOptions, State};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::harness::{counter, eventually, telemetry, Harness};

// ---- one trace across two services ---------------------------------------------------

#[command(queue = "otel-orders", name = "tests.TakeOrder.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TakeOrder {
    #[entity_id]
    pub order_id: u64,
}

#[event(topic = "otel-order-events", name = "tests.OrderTaken.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderTaken {
    #[entity_id]
    pub order_id: u64,
}

#[derive(Clone, Default)]
pub struct Notified(pub Arc<AtomicU32>);

mod front {
    use super::*;
    pub const MODULE: &str = module_path!();

    #[handler]
    async fn take_order(cmd: TakeOrder, ctx: &Context) -> sourceflow::Result<()> {
        ctx.raise(OrderTaken {
            order_id: cmd.order_id,
        })
        .await
    }
}

mod back {
    use super::*;
    pub const MODULE: &str = module_path!();

    #[handler]
    async fn notify(_evt: OrderTaken, State(n): State<Notified>) -> sourceflow::Result<()> {
        n.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn attr_str(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// The spans of trace `trace_id` that `exporter` has received so far.
fn spans_of_trace(
    exporter: &opentelemetry_sdk::trace::InMemorySpanExporter,
    trace_id: opentelemetry::trace::TraceId,
) -> Vec<opentelemetry_sdk::trace::SpanData> {
    exporter
        .get_finished_spans()
        .expect("spans")
        .into_iter()
        .filter(|s| s.span_context.trace_id() == trace_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_crosses_two_services_through_a_queue_and_a_topic() {
    let h = Harness::new().await;
    let captured = telemetry();
    let notified = Notified::default();
    let front = h
        .service("front", front::MODULE)
        .start()
        .await
        .expect("front");
    let back = h
        .service("back", back::MODULE)
        .state(notified.clone())
        .start()
        .await
        .expect("back");

    // An incoming HTTP request starts the trace.
    let root = tracing::info_span!("http.request", http.route = "/orders");
    let trace_id = root.context().span().span_context().trace_id();
    assert_ne!(
        trace_id,
        opentelemetry::trace::TraceId::INVALID,
        "OpenTelemetry layer installed"
    );
    front
        .send(TakeOrder { order_id: 5 })
        .instrument(root.clone())
        .await
        .expect("send");
    drop(root);

    eventually("the event reached the other service", || async {
        notified.0.load(Ordering::SeqCst) == 1
    })
    .await;
    let in_trace = || spans_of_trace(&captured.spans, trace_id);
    eventually("both services' process spans finished", || async {
        in_trace()
            .iter()
            .filter(|s| s.name == "sourceflow.process")
            .count()
            == 2
    })
    .await;
    let spans = in_trace();
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_ref()).collect();
    for expected in [
        "http.request",
        "sourceflow.dispatch",
        "sourceflow.process",
        "sourceflow.handler",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    let process = |service: &str| {
        spans
            .iter()
            .find(|s| {
                s.name == "sourceflow.process"
                    && attr_str(&s.attributes, "sourceflow.service").as_deref() == Some(service)
            })
            .unwrap_or_else(|| panic!("no process span of {service} in {names:?}"))
    };
    let a = process("front");
    let b = process("back");
    assert_eq!(
        attr_str(&a.attributes, "sourceflow.wire_name").as_deref(),
        Some("tests.TakeOrder.v1")
    );
    assert_eq!(
        attr_str(&a.attributes, "messaging.destination.name"),
        Some(front.queue_of::<TakeOrder>())
    );
    assert_eq!(
        attr_str(&a.attributes, "messaging.operation.type").as_deref(),
        Some("process")
    );
    assert_eq!(
        attr_str(&a.attributes, "sourceflow.entity_id").as_deref(),
        Some("5")
    );
    assert_eq!(
        attr_str(&b.attributes, "sourceflow.wire_name").as_deref(),
        Some("tests.OrderTaken.v1")
    );
    assert_eq!(
        attr_str(&a.attributes, "messaging.message.conversation_id"),
        attr_str(&b.attributes, "messaging.message.conversation_id"),
        "one conversation"
    );
    assert!(
        a.parent_span_is_remote && b.parent_span_is_remote,
        "continued from the message"
    );
    let publish = spans
        .iter()
        .find(|s| {
            s.name == "sourceflow.dispatch"
                && attr_str(&s.attributes, "messaging.operation.type").as_deref() == Some("publish")
        })
        .expect("publish span");
    assert_eq!(
        attr_str(&publish.attributes, "messaging.destination.name"),
        Some(front.topic_of::<OrderTaken>())
    );
    front.shutdown().await.expect("shutdown");
    back.shutdown().await.expect("shutdown");
}

// ---- the same trace, spans made with the OpenTelemetry API directly -------------------

/// A tracer provider of the test's own, exporting into memory: for services that make
/// their spans directly (`Builder::tracer_provider`).
fn direct_tracing() -> (
    opentelemetry_sdk::trace::SdkTracerProvider,
    opentelemetry_sdk::trace::InMemorySpanExporter,
) {
    let spans = opentelemetry_sdk::trace::InMemorySpanExporter::default();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    (provider, spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_tracer_provider_the_spans_are_made_directly_and_form_the_same_trace() {
    use opentelemetry::trace::{FutureExt as _, Tracer as _, TracerProvider as _};
    let h = Harness::new().await;
    // The suite's `tracing-opentelemetry` layer is installed too: it must see none of
    // these services' spans (they would be exported twice).
    let captured = telemetry();
    let (provider, exported) = direct_tracing();
    let notified = Notified::default();
    let front = h
        .service("front", front::MODULE)
        .tracer_provider(&provider)
        .start()
        .await
        .expect("front");
    let back = h
        .service("back", back::MODULE)
        .tracer_provider(&provider)
        .state(notified.clone())
        .start()
        .await
        .expect("back");

    // The caller's request span, made with the OpenTelemetry API and attached.
    let root = provider.tracer("test").start("http.request");
    let root_cx = opentelemetry::Context::current_with_span(root);
    let trace_id = root_cx.span().span_context().trace_id();
    let root_id = root_cx.span().span_context().span_id();
    front
        .send(TakeOrder { order_id: 7 })
        .with_context(root_cx.clone())
        .await
        .expect("send");
    eventually("the event reached the other service", || async {
        notified.0.load(Ordering::SeqCst) == 1
    })
    .await;
    let in_trace = || spans_of_trace(&exported, trace_id);
    eventually("both services' process spans finished", || async {
        in_trace()
            .iter()
            .filter(|s| s.name == "sourceflow.process")
            .count()
            == 2
    })
    .await;
    let spans = in_trace();
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_ref()).collect();
    let process = |service: &str| {
        spans
            .iter()
            .find(|s| {
                s.name == "sourceflow.process"
                    && attr_str(&s.attributes, "sourceflow.service").as_deref() == Some(service)
            })
            .unwrap_or_else(|| panic!("no process span of {service} in {names:?}"))
    };
    let send = spans
        .iter()
        .find(|s| {
            s.name == "sourceflow.dispatch"
                && attr_str(&s.attributes, "messaging.operation.type").as_deref() == Some("send")
        })
        .unwrap_or_else(|| panic!("no send span in {names:?}"));
    assert_eq!(
        send.parent_span_id, root_id,
        "the send is the request's child"
    );
    assert_eq!(send.span_kind, opentelemetry::trace::SpanKind::Producer);
    let a = process("front");
    let b = process("back");
    assert_eq!(a.span_kind, opentelemetry::trace::SpanKind::Consumer);
    assert!(a.parent_span_is_remote && b.parent_span_is_remote);
    assert_eq!(
        a.parent_span_id, root_id,
        "continued from the command's traceparent"
    );
    for (key, value) in [
        ("sourceflow.wire_name", "tests.TakeOrder.v1".to_string()),
        ("messaging.destination.name", front.queue_of::<TakeOrder>()),
        ("messaging.operation.type", "process".to_string()),
        ("sourceflow.entity_id", "7".to_string()),
        ("sourceflow.receive_count", "1".to_string()),
    ] {
        assert_eq!(attr_str(&a.attributes, key), Some(value), "{key}");
    }
    assert_eq!(
        attr_str(&a.attributes, "messaging.message.conversation_id"),
        attr_str(&b.attributes, "messaging.message.conversation_id"),
        "one conversation"
    );
    // The handler runs inside the process span, and what it raises carries its context.
    let handler = spans
        .iter()
        .find(|s| s.name == "sourceflow.handler" && s.parent_span_id == a.span_context.span_id())
        .unwrap_or_else(|| panic!("no handler span under front's process span: {names:?}"));
    assert_eq!(
        attr_str(&handler.attributes, "sourceflow.handler").as_deref(),
        Some("take_order")
    );
    assert_eq!(
        b.parent_span_id,
        handler.span_context.span_id(),
        "the event continues the trace from the handler that raised it"
    );
    let publish = spans
        .iter()
        .find(|s| {
            s.name == "sourceflow.dispatch"
                && attr_str(&s.attributes, "messaging.operation.type").as_deref() == Some("publish")
        })
        .unwrap_or_else(|| panic!("no publish span in {names:?}"));
    assert_eq!(
        publish.parent_span_id,
        a.span_context.span_id(),
        "the outbox is flushed inside the process span"
    );
    assert!(
        spans
            .iter()
            .all(|s| s.status == opentelemetry::trace::Status::Unset),
        "nothing failed"
    );
    let doubled: Vec<String> = spans_of_trace(&captured.spans, trace_id)
        .into_iter()
        .map(|s| s.name.to_string())
        .collect();
    assert!(
        doubled.is_empty(),
        "exported through tracing too: {doubled:?}"
    );
    front.shutdown().await.expect("shutdown");
    back.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_tracer_provider_a_failed_attempt_has_error_spans_and_the_retry_does_not() {
    use opentelemetry::trace::{FutureExt as _, Status, Tracer as _, TracerProvider as _};
    let h = Harness::new().await;
    let (provider, exported) = direct_tracing();
    let service = h
        .service("flaky", flaky::MODULE)
        .tracer_provider(&provider)
        .max_receive_count(3)
        .start()
        .await
        .expect("start");
    let root = provider.tracer("test").start("test.flaky");
    let root_cx = opentelemetry::Context::current_with_span(root);
    let trace_id = root_cx.span().span_context().trace_id();
    service
        .send(Flaky { id: 1 })
        .with_context(root_cx.clone())
        .await
        .expect("send");
    let named = |name: &str| {
        let mut spans = spans_of_trace(&exported, trace_id);
        spans.retain(|s| s.name == name);
        spans
    };
    eventually("both attempts' process spans finished", || async {
        named("sourceflow.process").len() == 2
    })
    .await;
    for name in ["sourceflow.process", "sourceflow.handler"] {
        let spans = named(name);
        assert_eq!(spans.len(), 2, "{name}: one per attempt");
        let errors = spans
            .iter()
            .filter(|s| matches!(s.status, Status::Error { .. }))
            .count();
        assert_eq!(errors, 1, "{name}: the failed attempt only");
    }
    service.shutdown().await.expect("shutdown");
}

#[command(queue = "otel-nest", name = "tests.Nest.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Nest {
    pub id: u32,
}

/// The service's own OpenTelemetry tracer, for a handler that makes spans with the API.
#[derive(Clone)]
pub struct UserTracer(pub Arc<opentelemetry_sdk::trace::SdkTracer>);

mod nest {
    use super::*;
    pub const MODULE: &str = module_path!();

    #[handler]
    async fn nest(_cmd: Nest, State(t): State<UserTracer>) -> sourceflow::Result<()> {
        use opentelemetry::trace::{Span as _, Tracer as _};
        tracing::info_span!("user.tracing").in_scope(|| {});
        t.0.start("user.otel").end();
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_tracer_provider_a_handlers_own_spans_are_children_of_its_handler_span() {
    use opentelemetry::trace::TracerProvider as _;
    let h = Harness::new().await;
    let captured = telemetry();
    let (provider, exported) = direct_tracing();
    let service = h
        .service("nest", nest::MODULE)
        .tracer_provider(&provider)
        .state(UserTracer(Arc::new(provider.tracer("user"))))
        .start()
        .await
        .expect("start");
    service.send(Nest { id: 1 }).await.expect("send");
    let finished = |name: &'static str| {
        let exported = exported.clone();
        move || {
            exported
                .get_finished_spans()
                .expect("spans")
                .into_iter()
                .find(|s| s.name == name)
        }
    };
    eventually("the handler's spans finished", || async {
        finished("sourceflow.process")().is_some()
    })
    .await;
    let handler = finished("sourceflow.handler")().expect("handler span");
    let otel = finished("user.otel")().expect("the handler's OpenTelemetry span");
    assert_eq!(otel.parent_span_id, handler.span_context.span_id());
    assert_eq!(
        otel.span_context.trace_id(),
        handler.span_context.trace_id()
    );
    // The suite's `tracing-opentelemetry` layer (context activation off) exports the
    // handler's `tracing` span: its parent is the handler span sourceflow made directly.
    let traced = spans_of_trace(&captured.spans, handler.span_context.trace_id())
        .into_iter()
        .find(|s| s.name == "user.tracing")
        .expect("the handler's tracing span, in the handler span's trace");
    assert_eq!(traced.parent_span_id, handler.span_context.span_id());
    service.shutdown().await.expect("shutdown");
}

// ---- failures are marked on the spans --------------------------------------------------

#[command(queue = "otel-flaky", name = "tests.Flaky.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Flaky {
    pub id: u32,
}

mod flaky {
    use super::*;
    pub const MODULE: &str = module_path!();

    #[handler]
    async fn flaky(_cmd: Flaky, ctx: &Context) -> sourceflow::Result<()> {
        if ctx.receive_count() <= 1 {
            return Err(sourceflow::Error::other("not yet"));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_has_error_spans_and_the_retry_does_not() {
    use opentelemetry::trace::Status;
    let h = Harness::new().await;
    let captured = telemetry();
    let app = h
        .service("status", flaky::MODULE)
        .max_receive_count(3)
        .start()
        .await
        .expect("start");
    let root = tracing::info_span!("test.flaky");
    let trace_id = root.context().span().span_context().trace_id();
    app.send(Flaky { id: 1 })
        .instrument(root.clone())
        .await
        .expect("send");
    drop(root);
    let named = |name: &str| {
        let mut spans = spans_of_trace(&captured.spans, trace_id);
        spans.retain(|s| s.name == name);
        spans
    };
    eventually("both attempts' process spans finished", || async {
        named("sourceflow.process").len() == 2
    })
    .await;
    let is_error =
        |s: &opentelemetry_sdk::trace::SpanData| matches!(s.status, Status::Error { .. });
    for name in ["sourceflow.process", "sourceflow.handler"] {
        let spans = named(name);
        assert_eq!(spans.len(), 2, "{name}: one per attempt");
        assert_eq!(
            spans.iter().filter(|s| is_error(s)).count(),
            1,
            "{name}: the failed attempt, not the retry, is an error"
        );
        assert!(
            spans
                .iter()
                .all(|s| attr_str(&s.attributes, "otel.status_code").is_none()),
            "{name}: the status is the span's status, not an attribute"
        );
    }
    let dispatch = named("sourceflow.dispatch");
    assert!(
        !dispatch.is_empty() && dispatch.iter().all(|s| !is_error(s)),
        "the send went through"
    );
    app.shutdown().await.expect("shutdown");
}

// ---- metrics after a known workload ----------------------------------------------------

#[command(queue = "otel-work", name = "tests.Work.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Work {
    pub id: u32,
    pub fail_times: u32,
}

#[event(topic = "otel-work-events", name = "tests.WorkDone.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkDone {
    pub id: u32,
}

mod worker {
    use super::*;
    pub const MODULE: &str = module_path!();

    #[handler]
    async fn work(cmd: Work, ctx: &Context) -> sourceflow::Result<()> {
        if ctx.receive_count() <= cmd.fail_times {
            return Err(sourceflow::Error::other("not yet"));
        }
        ctx.raise(WorkDone { id: cmd.id }).await
    }

    #[handler]
    async fn done(_evt: WorkDone, State(n): State<Notified>) -> sourceflow::Result<()> {
        n.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn in_flight(exporter: &InMemoryMetricExporter) -> i64 {
    let mut total = 0;
    if let Some(rm) = exporter.get_finished_metrics().expect("metrics").last() {
        for sm in rm.scope_metrics() {
            for m in sm
                .metrics()
                .filter(|m| m.name() == "sourceflow.handler.in_flight")
            {
                if let AggregatedMetrics::I64(MetricData::Sum(sum)) = m.data() {
                    total += sum.data_points().map(|d| d.value()).sum::<i64>();
                }
            }
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_workload() {
    let h = Harness::new().await;
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_periodic_exporter(exporter.clone())
        .build();
    let done = Notified::default();
    let app = h
        .service("metrics", worker::MODULE)
        .state(done.clone())
        .meter_provider(&provider)
        .max_receive_count(3)
        .start()
        .await
        .expect("start");
    let queue = app.queue_of::<Work>();
    let subscriber = app.subscriber_queue_of::<WorkDone>();

    for id in 0..4 {
        app.send(Work { id, fail_times: 0 }).await.expect("send");
    }
    app.send(Work {
        id: 10,
        fail_times: 1,
    })
    .await
    .expect("send"); // one retry
    app.send(Work {
        id: 20,
        fail_times: 99,
    })
    .await
    .expect("send"); // 3 failures, DLQ
    let dup = uuid::Uuid::new_v4().to_string();
    app.send_with(
        Work {
            id: 30,
            fail_times: 0,
        },
        SendOptions::new().message_id(dup.clone()),
    )
    .await
    .expect("send");
    eventually("the original of the duplicate is done", || async {
        done.0.load(Ordering::SeqCst) >= 5
    })
    .await;
    app.send_with(
        Work {
            id: 30,
            fail_times: 0,
        },
        SendOptions::new().message_id(dup),
    )
    .await
    .expect("send duplicate");
    h.send_raw(
        &queue,
        r#"{"v":1,"type":"tests.Nope","id":"p","payload":{}}"#,
        &[(attr::TYPE, "tests.Nope")],
        None,
    )
    .await;

    let dlq = sourceflow::naming::Naming::dead_letter(&queue);
    let dead = h.drain(&dlq, 2).await;
    assert_eq!(dead.len(), 2);
    eventually("six WorkDone events handled", || async {
        done.0.load(Ordering::SeqCst) == 6
    })
    .await;
    let wq: &str = &queue;
    let sq: &str = &subscriber;
    eventually("all processing recorded", || async {
        provider.force_flush().expect("flush");
        counter(
            &exporter,
            "sourceflow.message.processed",
            &[("messaging.destination.name", wq)],
        ) == 12
            && counter(
                &exporter,
                "sourceflow.message.processed",
                &[("messaging.destination.name", sq)],
            ) == 6
            // A move to the DLQ is counted once the transport confirmed it (on AWS, after
            // the send and the batched delete), which can trail the processing count.
            && counter(
                &exporter,
                "sourceflow.message.dead_lettered",
                &[("messaging.destination.name", wq)],
            ) == 2
    })
    .await;
    provider.force_flush().expect("flush");
    let c = |name: &str, with: &[(&str, &str)]| counter(&exporter, name, with);
    let work = ("sourceflow.wire_name", "tests.Work.v1");
    let wqa = ("messaging.destination.name", wq);
    assert_eq!(c("sourceflow.command.dispatched", &[work]), 8);
    assert_eq!(c("sourceflow.command.dispatch_error", &[]), 0);
    assert_eq!(
        c(
            "sourceflow.event.published",
            &[("sourceflow.wire_name", "tests.WorkDone.v1")]
        ),
        6
    );
    // 4 + 2 (one retry) + 3 (three failures) + 1 (the duplicate's original) + 1 duplicate + 1 poison
    assert_eq!(c("sourceflow.message.received", &[wqa]), 12);
    assert_eq!(
        c(
            "sourceflow.message.processed",
            &[wqa, ("sourceflow.outcome", "success")]
        ),
        6
    );
    assert_eq!(
        c(
            "sourceflow.message.processed",
            &[wqa, ("sourceflow.outcome", "error")]
        ),
        3,
        "the retried failure and the first two of the three failures"
    );
    assert_eq!(
        c(
            "sourceflow.message.processed",
            &[wqa, ("sourceflow.outcome", "duplicate")]
        ),
        1
    );
    assert_eq!(
        c(
            "sourceflow.message.processed",
            &[wqa, ("sourceflow.outcome", "dead_lettered")]
        ),
        2,
        "the poison message and the third failure"
    );
    assert_eq!(c("sourceflow.message.processing_error", &[wqa, work]), 4);
    assert_eq!(c("sourceflow.message.duplicate", &[wqa, work]), 1);
    assert_eq!(
        c(
            "sourceflow.message.dead_lettered",
            &[wqa, ("sourceflow.reason", "failures")]
        ),
        1
    );
    assert_eq!(
        c(
            "sourceflow.message.dead_lettered",
            &[wqa, ("sourceflow.reason", "unknown_type")]
        ),
        1
    );
    assert_eq!(
        c(
            "sourceflow.message.processed",
            &[wqa, ("sourceflow.wire_name", "unknown")]
        ),
        1,
        "an unknown wire name is recorded as `unknown`, not as itself"
    );
    assert_eq!(in_flight(&exporter), 0);
    app.shutdown().await.expect("shutdown");
}

// ---- health ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_broker_and_the_dead_letter_queue() {
    let h = Harness::new().await;
    let transport = crate::harness::Faulty::new(h.transport.clone());
    let down = transport.down.clone();
    let app = h
        .service("health", worker::MODULE)
        .transport(transport)
        .state(Notified::default())
        .start()
        .await
        .expect("start");
    let report = app.health().await;
    assert_eq!(report.status, Status::Healthy, "{report:#?}");
    assert!(report.check("transport").is_some());
    let queue = app.queue_of::<Work>();
    assert_eq!(
        report.check(&format!("listener {queue}")).map(|c| c.status),
        Some(Status::Healthy)
    );
    assert!(report.check("idempotency store memory").is_some());

    // A message in a dead-letter queue: degraded.
    h.send_raw(&queue, "garbage", &[(attr::TYPE, "tests.Work.v1")], None)
        .await;
    let dlq = sourceflow::naming::Naming::dead_letter(&queue);
    eventually("degraded by the dead-letter queue", || async {
        app.health().await.status == Status::Degraded
    })
    .await;
    let report = app.health().await;
    let check = report
        .check(&format!("dead-letter queue {dlq}"))
        .expect("dlq check");
    assert_eq!(check.detail, "1 messages waiting");
    let json = serde_json::to_value(&report).expect("json");
    assert_eq!(json["status"], "degraded");
    h.drain(&dlq, 1).await;

    // The broker goes away: unhealthy. It comes back: healthy.
    down.store(true, Ordering::SeqCst);
    let report = app.health().await;
    assert_eq!(report.status, Status::Unhealthy);
    assert!(
        report
            .check("transport")
            .expect("transport")
            .detail
            .contains("connection refused"),
        "{report:#?}"
    );
    down.store(false, Ordering::SeqCst);
    eventually("healthy again", || async {
        app.health().await.status == Status::Healthy
    })
    .await;
    app.shutdown().await.expect("shutdown");
    assert_eq!(
        app.health().await.status,
        Status::Unhealthy,
        "a stopped service is not healthy"
    );
}

// ---- sensitive data -----------------------------------------------------------------------

#[command(queue = "otel-cards", name = "tests.StoreCard.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreCard {
    pub customer: String,
    #[sensitive(card)]
    pub card_number: String,
    #[sensitive]
    pub cvv: String,
    #[sensitive(email)]
    pub email: String,
}

mod cards {
    use super::*;
    pub const MODULE: &str = module_path!();

    #[handler]
    async fn store_card(cmd: StoreCard, ctx: &Context) -> sourceflow::Result<()> {
        tracing::info!(?cmd, "storing a card");
        if ctx.receive_count() == 1 {
            // The error text carries the message's Debug output into logs and DLQ reasons.
            return Err(sourceflow::Error::other(format!("vault rejected {cmd:?}")));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensitive_values_stay_out_of_spans_and_logs() {
    let h = Harness::new().await;
    let captured = telemetry();
    let app = h
        .service("cards", cards::MODULE)
        .start()
        .await
        .expect("start");
    let card = format!("4111 1111 {:04} 9876", fastrand::u32(1000..9999));
    let cvv = format!("cvv{}", fastrand::u32(100_000..999_999));
    let email = format!("secret.person{}@example.com", fastrand::u32(..));
    app.send(StoreCard {
        customer: "ada".into(),
        card_number: card.clone(),
        cvv: cvv.clone(),
        email: email.clone(),
    })
    .await
    .expect("send");
    eventually("the retry logged the masked card", || async {
        captured
            .logs
            .lock()
            .expect("logs")
            .matches("storing a card")
            .count()
            >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = captured.logs.lock().expect("logs").clone();
    assert!(logs.contains("****9876"), "the masked card is logged");
    assert!(logs.contains("vault rejected"), "the failure is logged");
    for secret in [card.as_str(), cvv.as_str(), email.as_str(), "4111 1111"] {
        assert!(!logs.contains(secret), "{secret:?} leaked into the logs");
    }
    let spans = captured.spans.get_finished_spans().expect("spans");
    for s in &spans {
        let text = format!("{:?} {:?}", s.attributes, s.events);
        for secret in [card.as_str(), cvv.as_str(), email.as_str()] {
            assert!(
                !text.contains(secret),
                "{secret:?} leaked into span {}",
                s.name
            );
        }
    }
    app.shutdown().await.expect("shutdown");
}

#[cfg(feature = "health-http")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_served_over_http() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let h = Harness::new().await;
    let app = h
        .service("health-http", worker::MODULE)
        .state(Notified::default())
        .start()
        .await
        .expect("start");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = sourceflow::health::router(app.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }
    let health = get(addr, "/health").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains(r#""status":"healthy""#), "{health}");
    assert!(health.contains(r#""service":"health-http""#), "{health}");
    assert!(get(addr, "/health/live").await.starts_with("HTTP/1.1 200"));
    assert!(get(addr, "/health/ready").await.starts_with("HTTP/1.1 200"));
    app.shutdown().await.expect("shutdown");
    let after = get(addr, "/health/ready").await;
    assert!(
        after.starts_with("HTTP/1.1 503"),
        "a stopped service is not ready: {after}"
    );
}
