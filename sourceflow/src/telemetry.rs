//! Traces, metrics and trace-context propagation.
//!
//! **Spans** (`tracing` spans, or OpenTelemetry spans made directly when the service gives
//! [`Builder::tracer_provider`](crate::Builder::tracer_provider)), named and filled after
//! the OpenTelemetry messaging conventions:
//!
//! | span | when | fields |
//! |---|---|---|
//! | `sourceflow.dispatch` | a send or publish call | `messaging.system`, `messaging.destination.name`, `messaging.operation.type` (`send`/`publish`), `messaging.batch.message_count`, `sourceflow.service`, `otel.status_code` (`ERROR` when it failed) |
//! | `sourceflow.process` | one received message | `messaging.system`, `messaging.destination.name`, `messaging.operation.type` = `process`, `messaging.message.id`, `messaging.message.conversation_id` (correlation id), `sourceflow.wire_name`, `sourceflow.entity_id`, `sourceflow.receive_count`, `sourceflow.service`, `otel.kind` = `consumer`, `otel.status_code` (`ERROR` when retried or dead-lettered) |
//! | `sourceflow.handler` | one handler run | `sourceflow.handler`, `otel.status_code` (`ERROR` when it failed or panicked) |
//! | `sourceflow.query` | one query answered ([`query`](mod@crate::query)) | `sourceflow.query` (the query's name), `sourceflow.handler`, `otel.status_code` (`ERROR` when it failed or panicked) |
//!
//! A span whose operation failed has the OpenTelemetry status `ERROR` (`otel.status_code`
//! is a span status, not an attribute). Declaring the field up front also gives
//! `tracing-opentelemetry` room for the `busy_ns`/`idle_ns` attributes it adds when a span
//! closes: it sizes a span's attribute vector by the declared fields, and a vector that
//! overflows at close is reallocated on the hot path (7 % of the telemetry row's CPU in the
//! throughput bench before the field was declared).
//!
//! Payloads are never recorded, so `#[sensitive]` values cannot leak through spans.
//!
//! **Propagation**: every message carries the W3C `traceparent` (and `tracestate`) of the
//! span that sent it as message attributes, on SQS and SNS alike; the `sourceflow.process`
//! span of the receiver continues that trace. With the `tracing-opentelemetry` layer
//! installed, a trace started by an HTTP request continues through every handler and event
//! in every service. Without it, the incoming `traceparent` is passed on unchanged.
//!
//! **Metrics** (OpenTelemetry, from the global meter provider or
//! [`Builder::meter_provider`](crate::Builder::meter_provider)); durations in seconds:
//!
//! | instrument | kind | attributes |
//! |---|---|---|
//! | `sourceflow.command.dispatched` / `.dispatch_duration` / `.dispatch_error` | counter / histogram / counter | `messaging.destination.name`, `sourceflow.wire_name` |
//! | `sourceflow.event.published` / `.publish_duration` / `.publish_error` | counter / histogram / counter | same |
//! | `sourceflow.message.received` | counter | `messaging.destination.name` |
//! | `sourceflow.message.processed` | counter | `messaging.destination.name`, `sourceflow.wire_name`, `sourceflow.outcome`: what happened to the delivery — `success`, `duplicate`, `error` (a handler failed; retried), `infrastructure_error` (a store, broker or dispatch fault; retried without spending an attempt), `dead_lettered` (including a last failed attempt), `returned` (handed back at shutdown), `redelayed` (received before its due time and sent again to wait out the rest: see [`crate::schedule`]) |
//! | `sourceflow.message.processing_duration` | histogram | `messaging.destination.name`, `sourceflow.wire_name` |
//! | `sourceflow.message.processing_error` | counter | `messaging.destination.name`, `sourceflow.wire_name`: handler runs that failed (retried, rejected, or the last attempt) |
//! | `sourceflow.message.duplicate` | counter | `messaging.destination.name`, `sourceflow.wire_name` |
//! | `sourceflow.message.dead_lettered` | counter | `messaging.destination.name`, `sourceflow.reason` (`undecodable`, `unknown_type`, `no_handler`, `decrypt`, `payload`, `mismatch`, `failures`, `rejected`, `refused`) |
//! | `sourceflow.handler.in_flight` | up-down counter | `messaging.destination.name` |
//! | `sourceflow.query.handled` | counter | `sourceflow.query` (the query's name), `sourceflow.outcome` (`success`/`error`) |
//! | `sourceflow.query.duration` | histogram | `sourceflow.query` |
//! | `sourceflow.queue.depth` | gauge, sampled | `messaging.destination.name`, `sourceflow.queue.kind` (`source`/`dead_letter`), `sourceflow.state` (`visible`/`in_flight`/`delayed`) |
//!
//! Every attribute has bounded cardinality: no message ids, and a wire name that is not
//! linked into the binary is recorded as `unknown`.
//!
//! **Exporting spans**: install [`layer`] (a `tracing-opentelemetry` layer set up for a
//! message pipeline) rather than `tracing_opentelemetry::layer()` with its defaults. The
//! defaults cost, per span, an OpenTelemetry context attached and detached and the clock
//! read on every poll of an instrumented future, plus five attributes sourceflow's spans
//! do not need (source location, thread id and name, target); in the throughput
//! benchmark they made the telemetry row's overhead about twice as large (see the
//! README's Benchmarks).
//!
//! **Making the spans directly**: with
//! [`Builder::tracer_provider`](crate::Builder::tracer_provider), sourceflow makes the
//! spans of the table with the OpenTelemetry API through that provider's tracer, and no
//! `tracing` spans of its own. The spans, their parents and statuses are the same; each
//! span's context is attached (as the current `opentelemetry::Context`) while its work
//! runs, so what a handler sends continues the trace and the spans it makes are its
//! children. In the throughput benchmark the same spans cost less than half as much CPU
//! made this way as through the layer (the README's Benchmarks).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter, UpDownCounter};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::KeyValue;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::message::MessageKind;

/// The instruments of one runtime, and its [`Spans`] when the service made sourceflow's
/// spans with the OpenTelemetry API directly.
pub(crate) struct Metrics {
    spans: Option<Spans>,
    command_dispatched: Counter<u64>,
    command_dispatch_duration: Histogram<f64>,
    command_dispatch_error: Counter<u64>,
    event_published: Counter<u64>,
    event_publish_duration: Histogram<f64>,
    event_publish_error: Counter<u64>,
    pub received: Counter<u64>,
    pub processed: Counter<u64>,
    pub processing_duration: Histogram<f64>,
    pub processing_error: Counter<u64>,
    pub duplicate: Counter<u64>,
    pub dead_lettered: Counter<u64>,
    pub in_flight: UpDownCounter<i64>,
    pub queue_depth: Gauge<u64>,
    query_handled: Counter<u64>,
    query_duration: Histogram<f64>,
}

impl Metrics {
    pub(crate) fn new(meter: &Meter) -> Self {
        let secs = "s";
        Metrics {
            spans: None,
            command_dispatched: meter
                .u64_counter("sourceflow.command.dispatched")
                .with_description("Commands sent")
                .build(),
            command_dispatch_duration: meter
                .f64_histogram("sourceflow.command.dispatch_duration")
                .with_unit(secs)
                .with_description("Time to send a batch of commands")
                .build(),
            command_dispatch_error: meter
                .u64_counter("sourceflow.command.dispatch_error")
                .with_description("Commands that could not be sent")
                .build(),
            event_published: meter
                .u64_counter("sourceflow.event.published")
                .with_description("Events published")
                .build(),
            event_publish_duration: meter
                .f64_histogram("sourceflow.event.publish_duration")
                .with_unit(secs)
                .with_description("Time to publish a batch of events")
                .build(),
            event_publish_error: meter
                .u64_counter("sourceflow.event.publish_error")
                .with_description("Events that could not be published")
                .build(),
            received: meter
                .u64_counter("sourceflow.message.received")
                .with_description("Messages received from queues")
                .build(),
            processed: meter
                .u64_counter("sourceflow.message.processed")
                .with_description("Messages processed, by outcome")
                .build(),
            processing_duration: meter
                .f64_histogram("sourceflow.message.processing_duration")
                .with_unit(secs)
                .with_description("Time from decode to acknowledgement")
                .build(),
            processing_error: meter
                .u64_counter("sourceflow.message.processing_error")
                .with_description("Handler runs that failed")
                .build(),
            duplicate: meter
                .u64_counter("sourceflow.message.duplicate")
                .with_description("Duplicates skipped by idempotency")
                .build(),
            dead_lettered: meter
                .u64_counter("sourceflow.message.dead_lettered")
                .with_description("Messages moved to a dead-letter queue")
                .build(),
            in_flight: meter
                .i64_up_down_counter("sourceflow.handler.in_flight")
                .with_description("Handler runs in progress")
                .build(),
            queue_depth: meter
                .u64_gauge("sourceflow.queue.depth")
                .with_description("Messages in a queue, sampled periodically")
                .build(),
            query_handled: meter
                .u64_counter("sourceflow.query.handled")
                .with_description("Queries answered, by outcome")
                .build(),
            query_duration: meter
                .f64_histogram("sourceflow.query.duration")
                .with_unit(secs)
                .with_description("Time to answer a query")
                .build(),
        }
    }

    /// These instruments, with sourceflow's spans made through `spans`.
    pub(crate) fn with_spans(self, spans: Option<Spans>) -> Self {
        Metrics { spans, ..self }
    }

    /// The tracer sourceflow's spans are made with directly, if the service gave one
    /// ([`Builder::tracer_provider`](crate::Builder::tracer_provider)); `None`: they are
    /// `tracing` spans.
    pub(crate) fn spans(&self) -> Option<&Spans> {
        self.spans.as_ref()
    }

    /// Records one query answered (`ok`) or failed.
    pub(crate) fn queried(&self, query: &'static str, ok: bool, elapsed: Duration) {
        let name = KeyValue::new("sourceflow.query", query);
        self.query_duration
            .record(elapsed.as_secs_f64(), std::slice::from_ref(&name));
        let outcome = KeyValue::new("sourceflow.outcome", if ok { "success" } else { "error" });
        self.query_handled.add(1, &[name, outcome]);
    }

    /// Records a dispatch call of `count` messages.
    pub(crate) fn dispatched(
        &self,
        kind: MessageKind,
        destination: &std::sync::Arc<str>,
        wire_names: &BatchWireNames,
        elapsed: Duration,
        failed: &[usize],
    ) {
        let dest = KeyValue::new(
            "messaging.destination.name",
            opentelemetry::StringValue::from(destination.clone()),
        );
        let (count, duration, error) = match kind {
            MessageKind::Command => (
                &self.command_dispatched,
                &self.command_dispatch_duration,
                &self.command_dispatch_error,
            ),
            MessageKind::Event => (
                &self.event_published,
                &self.event_publish_duration,
                &self.event_publish_error,
            ),
        };
        duration.record(elapsed.as_secs_f64(), std::slice::from_ref(&dest));
        // One data point per wire name and outcome in the batch. The usual call is one
        // message, or several of one type that all went through: no sorting, no vector.
        let wire_names = match wire_names {
            BatchWireNames::One { name, count: n } if failed.is_empty() => {
                let attrs = [dest, KeyValue::new("sourceflow.wire_name", name.clone())];
                count.add(*n as u64, &attrs);
                return;
            }
            BatchWireNames::One { name, count: n } => &vec![name.clone(); *n][..],
            BatchWireNames::Many(names) => &names[..],
        };
        let mut names: Vec<(bool, &std::borrow::Cow<'static, str>)> = wire_names
            .iter()
            .enumerate()
            .map(|(i, w)| (failed.contains(&i), w))
            .collect();
        names.sort_unstable();
        let mut i = 0;
        while i < names.len() {
            let key = names[i];
            let n = names[i..].iter().take_while(|w| **w == key).count();
            let (is_failed, name) = key;
            let attrs = [
                dest.clone(),
                KeyValue::new("sourceflow.wire_name", name.clone()),
            ];
            if is_failed {
                error.add(n as u64, &attrs);
            } else {
                count.add(n as u64, &attrs);
            }
            i += n;
        }
    }
}

/// The wire names of a dispatched batch, for its metrics: usually all one name, kept
/// without a vector.
pub(crate) enum BatchWireNames {
    /// `count` messages, all of one wire name.
    One {
        name: std::borrow::Cow<'static, str>,
        count: usize,
    },
    /// Several wire names, in batch order.
    Many(Vec<std::borrow::Cow<'static, str>>),
}

impl BatchWireNames {
    /// The wire names of `names`, in order.
    pub(crate) fn of<'a>(
        names: impl ExactSizeIterator<Item = &'a std::borrow::Cow<'static, str>> + Clone,
    ) -> Self {
        let mut rest = names.clone();
        match rest.next() {
            Some(first) if rest.all(|w| w == first) => BatchWireNames::One {
                name: first.clone(),
                count: names.len(),
            },
            _ => BatchWireNames::Many(names.cloned().collect()),
        }
    }
}

/// The `sourceflow.outcome` values of `sourceflow.message.processed`, in the order of
/// [`WireAttributes`]' sets.
pub(crate) const OUTCOMES: [&str; 7] = [
    "success",
    "duplicate",
    "error",
    "infrastructure_error",
    "dead_lettered",
    "returned",
    "redelayed",
];

/// The `otel.status_code` value of a span whose operation failed.
pub(crate) const STATUS_ERROR: &str = "ERROR";

/// The wire name recorded for a type that is not linked into the binary.
pub(crate) const UNKNOWN_WIRE_NAME: &str = "unknown";

/// The metric attribute sets of one queue, built once when its listener is created: a
/// message's metrics borrow them instead of building `KeyValue`s (and cloning the queue
/// name) on every call. Values and cardinality are the module table's: the queue, the wire
/// names linked into the binary (anything else is `unknown`), the outcomes.
pub(crate) struct QueueAttributes {
    destination: [KeyValue; 1],
    // Looked up per message: foldhash, cheaper than SipHash on wire names.
    wires: foldhash::HashMap<&'static str, WireAttributes>,
    unknown: WireAttributes,
}

/// The attribute sets of one queue and wire name.
pub(crate) struct WireAttributes {
    pair: [KeyValue; 2],
    processed: [[KeyValue; 3]; OUTCOMES.len()],
}

impl WireAttributes {
    fn new(destination: &KeyValue, wire: &'static str) -> Self {
        let wire = KeyValue::new("sourceflow.wire_name", wire);
        WireAttributes {
            pair: [destination.clone(), wire.clone()],
            processed: OUTCOMES.map(|outcome| {
                [
                    destination.clone(),
                    wire.clone(),
                    KeyValue::new("sourceflow.outcome", outcome),
                ]
            }),
        }
    }

    /// `messaging.destination.name`, `sourceflow.wire_name`.
    pub(crate) fn pair(&self) -> &[KeyValue] {
        &self.pair
    }

    /// `messaging.destination.name`, `sourceflow.wire_name`, `sourceflow.outcome` =
    /// `OUTCOMES[outcome]` (see `Disposition::outcome_index`).
    pub(crate) fn processed(&self, outcome: usize) -> &[KeyValue] {
        self.processed
            .get(outcome)
            .map_or(&self.pair[..], |set| &set[..])
    }
}

impl QueueAttributes {
    /// The sets of `queue` for every wire name in `wire_names` and for `unknown`.
    pub(crate) fn new<'a>(
        queue: &Arc<str>,
        wire_names: impl IntoIterator<Item = &'a &'static str>,
    ) -> Self {
        let destination = KeyValue::new(
            "messaging.destination.name",
            opentelemetry::StringValue::from(queue.clone()),
        );
        QueueAttributes {
            wires: wire_names
                .into_iter()
                .map(|w| (*w, WireAttributes::new(&destination, w)))
                .collect(),
            unknown: WireAttributes::new(&destination, UNKNOWN_WIRE_NAME),
            destination: [destination],
        }
    }

    /// `messaging.destination.name` alone.
    pub(crate) fn destination(&self) -> &[KeyValue] {
        &self.destination
    }

    /// The `messaging.destination.name` attribute itself.
    pub(crate) fn destination_value(&self) -> &KeyValue {
        let [destination] = &self.destination;
        destination
    }

    /// The `sourceflow.wire_name` attribute of a span: shared with the metric sets when
    /// the name is linked into the binary, else a copy of it (spans, unlike metrics, may
    /// carry any name).
    pub(crate) fn wire_value(&self, wire: &str) -> KeyValue {
        match self.wires.get(wire) {
            Some(set) => set.pair[1].clone(),
            None => KeyValue::new("sourceflow.wire_name", wire.to_string()),
        }
    }

    /// The sets of a wire name (`unknown` when it is not linked into the binary).
    pub(crate) fn wire(&self, wire: &str) -> &WireAttributes {
        self.wires.get(wire).unwrap_or(&self.unknown)
    }
}

/// The `messaging.system` value of a transport for a kind of destination.
pub(crate) fn messaging_system(transport: &str, kind: MessageKind) -> &'static str {
    match (transport, kind) {
        ("aws", MessageKind::Command) => "aws_sqs",
        ("aws", MessageKind::Event) => "aws_sns",
        _ => "sourceflow_memory",
    }
}

/// A `tracing-opentelemetry` layer that exports sourceflow's spans (and the service's
/// own) through `tracer`, set up for a message pipeline.
///
/// It is `tracing_opentelemetry::layer().with_tracer(tracer)` with four of the layer's
/// defaults turned off, each of which costs on the hot path and adds nothing to a
/// messaging trace:
///
/// * **context activation**: the layer would attach the span's OpenTelemetry context on
///   every poll of an instrumented future and detach it after. sourceflow reads the trace
///   context from the `tracing` span itself (to write `traceparent`), so propagation
///   across queues does not need it; turn it back on with
///   `.with_context_activation(true)` if your handlers call libraries instrumented with
///   the OpenTelemetry API directly (they read `opentelemetry::Context::current()`);
/// * **inactivity tracking** (`busy_ns`/`idle_ns` attributes): two clock reads per poll;
/// * **thread attributes** (`thread.id`, `thread.name`): a copy of the thread's name into
///   every span;
/// * **source location and target** (`code.*`, `target`): four attributes per span.
///
/// Each can be turned back on with the layer's own `with_*` methods.
///
/// ```
/// use opentelemetry::trace::TracerProvider as _;
/// use tracing_subscriber::layer::SubscriberExt;
/// use tracing_subscriber::util::SubscriberInitExt;
///
/// let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
/// tracing_subscriber::registry()
///     .with(sourceflow::telemetry::layer(provider.tracer("orders")))
///     .with(tracing_subscriber::fmt::layer())
///     .init();
/// ```
pub fn layer<S, T>(tracer: T) -> tracing_opentelemetry::OpenTelemetryLayer<S, T>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    T: opentelemetry::trace::Tracer + 'static,
    T::Span: Send + Sync,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_context_activation(false)
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_location(false)
        .with_target(false)
}

/// The W3C `traceparent` and `tracestate` of the current span, if it belongs to an
/// OpenTelemetry trace: the current `tracing` span's, when an OpenTelemetry layer records
/// it, else the current OpenTelemetry context's (a span sourceflow made directly, see
/// [`Spans`], or one the service attached).
pub(crate) fn current_trace_context() -> Option<(String, Option<String>)> {
    let from_tracing = tracing::Span::current().context();
    let valid = |cx: &opentelemetry::Context| cx.span().span_context().is_valid();
    let cx = match valid(&from_tracing) {
        true => from_tracing,
        false => Some(opentelemetry::Context::current()).filter(valid)?,
    };
    let span = cx.span();
    let sc = span.span_context();
    let state = sc.trace_state().header();
    Some((traceparent(sc), (!state.is_empty()).then_some(state)))
}

/// sourceflow's spans made with the OpenTelemetry API directly, through the tracer of
/// [`Builder::tracer_provider`](crate::Builder::tracer_provider): the names, kinds and
/// attributes of the module table, without `tracing` and `tracing-opentelemetry` in
/// between (the throughput benchmark measures each way's floor). A span's context is
/// attached while its work runs, so that what runs inside — a handler's sends, spans the
/// service makes with either API — is its child.
pub(crate) struct Spans {
    tracer: opentelemetry::global::BoxedTracer,
    service: KeyValue,
}

impl Spans {
    /// The spans of `service`, made with `tracer`.
    pub(crate) fn new(tracer: opentelemetry::global::BoxedTracer, service: &str) -> Self {
        let service = opentelemetry::StringValue::from(Arc::<str>::from(service));
        Spans {
            tracer,
            service: KeyValue::new("sourceflow.service", service),
        }
    }

    /// The `sourceflow.service` attribute (its value shared, not copied).
    pub(crate) fn service(&self) -> KeyValue {
        self.service.clone()
    }

    /// Starts span `name` of `kind` with `attributes` as a child of `parent`; the context
    /// returned holds it (end it with [`end`]).
    pub(crate) fn start(
        &self,
        name: &'static str,
        kind: opentelemetry::trace::SpanKind,
        attributes: impl IntoIterator<Item = KeyValue>,
        parent: &opentelemetry::Context,
    ) -> opentelemetry::Context {
        use opentelemetry::trace::Tracer as _;
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, parent);
        parent.with_span(span)
    }
}

/// Ends the span of `cx`, with the status `ERROR` when its operation `failed`.
pub(crate) fn end(cx: &opentelemetry::Context, failed: bool) {
    let span = cx.span();
    if failed {
        span.set_status(opentelemetry::trace::Status::error(""));
    }
    span.end();
}

/// `work`, run with `cx` attached as the current OpenTelemetry context. (Not an `async
/// fn`: one would store `work` twice, as its argument and as the future it awaits.)
pub(crate) fn within<F: std::future::Future>(
    cx: &opentelemetry::Context,
    work: F,
) -> opentelemetry::trace::WithContext<F> {
    use opentelemetry::trace::FutureExt as _;
    work.with_context(cx.clone())
}

/// The parent of a received message's span: the remote span context of its
/// `traceparent` (and `tracestate`), else a new trace.
pub(crate) fn remote_parent(trace: Option<(&str, Option<&str>)>) -> opentelemetry::Context {
    match trace.and_then(|(tp, state)| parse_traceparent(tp, state)) {
        Some(sc) => opentelemetry::Context::new().with_remote_span_context(sc),
        None => opentelemetry::Context::new(),
    }
}

/// The W3C `traceparent` of a span context (`00-<trace id>-<span id>-<flags>`), written
/// into one allocation of its exact size.
pub(crate) fn traceparent(sc: &SpanContext) -> String {
    fn push_hex(out: &mut String, bytes: &[u8]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for b in bytes {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    push_hex(&mut out, &sc.trace_id().to_bytes());
    out.push('-');
    push_hex(&mut out, &sc.span_id().to_bytes());
    out.push('-');
    push_hex(&mut out, &[sc.trace_flags().to_u8()]);
    out
}

/// Parses a W3C `traceparent` (and optional `tracestate`) into a remote span context.
pub(crate) fn parse_traceparent(
    traceparent: &str,
    tracestate: Option<&str>,
) -> Option<SpanContext> {
    let mut parts = traceparent.trim().split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let span_id = parts.next()?;
    let flags = parts.next()?;
    if version.len() != 2
        || version == "ff"
        || trace_id.len() != 32
        || span_id.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let state = tracestate
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    let sc = SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, state);
    sc.is_valid().then_some(sc)
}

/// Makes `span` a child of the remote context in `traceparent`.
pub(crate) fn continue_trace(span: &tracing::Span, traceparent: &str, tracestate: Option<&str>) {
    if let Some(sc) = parse_traceparent(traceparent, tracestate) {
        let cx = opentelemetry::Context::new().with_remote_span_context(sc);
        let _ = span.set_parent(cx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trip() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse_traceparent(tp, Some("vendor=abc")).expect("valid");
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled());
        assert!(sc.is_remote());
        assert_eq!(sc.trace_state().header(), "vendor=abc");
        assert!(parse_traceparent("garbage", None).is_none());
        assert!(parse_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            None
        )
        .is_none());
        assert!(parse_traceparent(
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            None
        )
        .is_none());
    }

    #[test]
    fn traceparent_is_written_as_w3c() {
        for tp in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
        ] {
            let sc = parse_traceparent(tp, None).expect("valid");
            assert_eq!(traceparent(&sc), tp);
            assert_eq!(
                traceparent(&sc),
                format!(
                    "00-{}-{}-{:02x}",
                    sc.trace_id(),
                    sc.span_id(),
                    sc.trace_flags().to_u8()
                )
            );
        }
    }

    fn kv(k: &'static str, v: &str) -> KeyValue {
        KeyValue::new(k, v.to_string())
    }

    #[test]
    fn queue_attribute_sets_hold_the_documented_values() {
        let queue: Arc<str> = Arc::from("svc-orders.fifo");
        let sets = QueueAttributes::new(&queue, &["orders.PlaceOrder.v1", "orders.Cancel.v1"]);
        let dest = kv("messaging.destination.name", "svc-orders.fifo");
        assert_eq!(sets.destination(), &[dest.clone()][..]);
        for wire in ["orders.PlaceOrder.v1", "orders.Cancel.v1"] {
            let w = sets.wire(wire);
            let wire_kv = kv("sourceflow.wire_name", wire);
            assert_eq!(w.pair(), &[dest.clone(), wire_kv.clone()][..]);
            for (i, outcome) in OUTCOMES.iter().enumerate() {
                assert_eq!(
                    w.processed(i),
                    &[
                        dest.clone(),
                        wire_kv.clone(),
                        kv("sourceflow.outcome", outcome)
                    ][..],
                    "outcome {outcome}"
                );
            }
        }
        // A name not linked into the binary is recorded as `unknown`, never as itself.
        let unknown = sets.wire("someone.Else.v9");
        assert_eq!(
            unknown.pair(),
            &[dest.clone(), kv("sourceflow.wire_name", "unknown")][..]
        );
        assert_eq!(unknown.processed(0)[2], kv("sourceflow.outcome", "success"));
    }
}
