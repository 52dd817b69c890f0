//! Traces, metrics and trace-context propagation.
//!
//! **Spans** (`tracing`), named and filled after the OpenTelemetry messaging conventions:
//!
//! | span | when | fields |
//! |---|---|---|
//! | `sourceflow.dispatch` | a send or publish call | `messaging.system`, `messaging.destination.name`, `messaging.operation.type` (`send`/`publish`), `messaging.batch.message_count`, `sourceflow.service` |
//! | `sourceflow.process` | one received message | `messaging.system`, `messaging.destination.name`, `messaging.operation.type` = `process`, `messaging.message.id`, `messaging.message.conversation_id` (correlation id), `sourceflow.wire_name`, `sourceflow.entity_id`, `sourceflow.receive_count`, `sourceflow.service`, `otel.kind` = `consumer` |
//! | `sourceflow.handler` | one handler run | `sourceflow.handler` |
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
//! | `sourceflow.message.processed` | counter | `messaging.destination.name`, `sourceflow.wire_name`, `sourceflow.outcome`: what happened to the delivery — `success`, `duplicate`, `error` (a handler failed; retried), `infrastructure_error` (a store, broker or dispatch fault; retried without spending an attempt), `dead_lettered` (including a last failed attempt), `returned` (handed back at shutdown) |
//! | `sourceflow.message.processing_duration` | histogram | `messaging.destination.name`, `sourceflow.wire_name` |
//! | `sourceflow.message.processing_error` | counter | `messaging.destination.name`, `sourceflow.wire_name`: handler runs that failed (retried, rejected, or the last attempt) |
//! | `sourceflow.message.duplicate` | counter | `messaging.destination.name`, `sourceflow.wire_name` |
//! | `sourceflow.message.dead_lettered` | counter | `messaging.destination.name`, `sourceflow.reason` (`undecodable`, `unknown_type`, `no_handler`, `decrypt`, `payload`, `mismatch`, `failures`, `rejected`, `refused`) |
//! | `sourceflow.handler.in_flight` | up-down counter | `messaging.destination.name` |
//! | `sourceflow.queue.depth` | gauge, sampled | `messaging.destination.name`, `sourceflow.queue.kind` (`source`/`dead_letter`), `sourceflow.state` (`visible`/`in_flight`/`delayed`) |
//!
//! Every attribute has bounded cardinality: no message ids, and a wire name that is not
//! linked into the binary is recorded as `unknown`.

use std::str::FromStr;
use std::time::Duration;

use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter, UpDownCounter};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::KeyValue;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::message::MessageKind;

/// The instruments of one runtime.
pub(crate) struct Metrics {
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
}

impl Metrics {
    pub(crate) fn new(meter: &Meter) -> Self {
        let secs = "s";
        Metrics {
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
        }
    }

    /// Records a dispatch call of `count` messages.
    pub(crate) fn dispatched(
        &self,
        kind: MessageKind,
        destination: &std::sync::Arc<str>,
        wire_names: &[std::borrow::Cow<'static, str>],
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
        // One data point per wire name and outcome in the batch.
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

/// The `messaging.system` value of a transport for a kind of destination.
pub(crate) fn messaging_system(transport: &str, kind: MessageKind) -> &'static str {
    match (transport, kind) {
        ("aws", MessageKind::Command) => "aws_sqs",
        ("aws", MessageKind::Event) => "aws_sns",
        _ => "sourceflow_memory",
    }
}

/// The W3C `traceparent` and `tracestate` of the current span, if it belongs to an
/// OpenTelemetry trace.
pub(crate) fn current_trace_context() -> Option<(String, Option<String>)> {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return None;
    }
    let traceparent = format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    );
    let state = sc.trace_state().header();
    Some((traceparent, (!state.is_empty()).then_some(state)))
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
}
