//! A unit of work: one message, or the messages of one FIFO group from one receive, handled
//! in order. Each message goes through the [stages](super::stages), then is
//! [settled](super::settle).

#[cfg(feature = "lambda")]
use std::time::Duration;

use tracing::Instrument;

use super::disposition::Disposition;
use super::heartbeat::Hold;
use super::settle::Apply;
use super::stages::Track;
use super::Listener;
use crate::envelope::{self, attr};
use crate::message::MessageKind;
use crate::telemetry;
use crate::transport::ReceivedMessage;

impl Listener {
    /// Handles a unit until it is done or the service stops; what has not started by then
    /// goes back to the queue, in order.
    /// `hold` is the unit's registration with the heartbeat, made when it was received.
    pub(crate) async fn run_unit(&self, unit: Unit, hold: Hold) {
        let mut i = 0;
        let mut in_place = 0u32;
        while i < unit.len() {
            if self.stop.is_cancelled() {
                self.give_back(&unit[i..]).await;
                return;
            }
            let msg = &unit[i];
            let later_in_hand = self.fifo && i + 1 < unit.len();
            let (d, _) = self.process(msg, &hold, in_place, later_in_hand).await;
            if let (Disposition::Retry(r), true) = (&d, later_in_hand) {
                // The messages behind it in its group are in hand: it was retried here, so
                // they can neither overtake it nor be delivered around it.
                if matches!(r.cause, super::disposition::Cause::Handler { .. }) {
                    in_place += 1;
                }
                tokio::select! {
                    _ = self.stop.cancelled() => {
                        self.give_back(&unit[i..]).await;
                        return;
                    }
                    _ = tokio::time::sleep(r.after) => continue,
                }
            }
            hold.settled(&msg.receipt);
            in_place = 0;
            i += 1;
        }
    }

    /// Runs the stages of one message and settles it, all inside one `sourceflow.process`
    /// span that continues the sender's trace (its settling is logged in it too); a retry
    /// with `later_in_hand` is settled in place. Returns the disposition, and false when
    /// it was a dead letter the broker did not take (see [`settle`](Self::settle)).
    ///
    /// The envelope is decoded before the span is created, so that the span is born with
    /// every field (no `record` calls on a started span, which cost a lookup and a lock
    /// each in an OpenTelemetry layer); an undecodable message gets a span without the
    /// message's own fields and is dead-lettered inside it as before.
    async fn process(
        &self,
        msg: &ReceivedMessage,
        hold: &Hold,
        in_place: u32,
        later_in_hand: bool,
    ) -> (Disposition, bool) {
        let started = std::time::Instant::now();
        let decoded = super::stages::decode(msg);
        let env = decoded.as_ref().ok();
        let failed =
            |d: &Disposition| matches!(d, Disposition::Retry(_) | Disposition::DeadLetter(_));
        // Read only when a span continues the trace: the sender's `traceparent`, and its
        // `tracestate` when it has one.
        let trace = || {
            envelope::attribute(&msg.attributes, attr::TRACEPARENT)
                .map(|tp| (tp, envelope::attribute(&msg.attributes, attr::TRACESTATE)))
        };
        // Made with the OpenTelemetry API when the service gave a tracer provider, else as
        // a `tracing` span (see `crate::telemetry`).
        let span = match self.dispatcher.metrics().spans() {
            Some(spans) => ProcessSpan::Direct(spans.start(
                "sourceflow.process",
                opentelemetry::trace::SpanKind::Consumer,
                self.process_attributes(msg, env, spans),
                &telemetry::remote_parent(trace()),
            )),
            None => {
                let span = self.process_span(msg, env);
                if !span.is_disabled() {
                    if let Some((tp, state)) = trace() {
                        telemetry::continue_trace(&span, tp, state);
                    }
                }
                ProcessSpan::Traced(span)
            }
        };
        let traced = matches!(span, ProcessSpan::Traced(_));
        // A closure, so that each branch below awaits the future it makes as a temporary:
        // a future held in a local and then moved into another would be stored twice in
        // this function's state machine (every unit's task carries it).
        let work = move || async move {
            let mut track = Track::new(in_place);
            let d = match self.pipeline(msg, decoded, hold, &mut track).await {
                Ok(d) | Err(d) => d,
            };
            let elapsed = started.elapsed();
            if traced && failed(&d) {
                tracing::Span::current().record("otel.status_code", telemetry::STATUS_ERROR);
            }
            let apply = match (&d, later_in_hand) {
                (Disposition::Retry(_), true) => Apply::InPlace,
                _ => Apply::Broker,
            };
            let settled = self.settle(msg, &d, &track, elapsed, apply).await;
            (d, settled)
        };
        match span {
            ProcessSpan::Traced(span) => work().instrument(span).await,
            ProcessSpan::Direct(cx) => {
                let (d, settled) = telemetry::within(&cx, work()).await;
                telemetry::end(&cx, failed(&d));
                (d, settled)
            }
        }
    }

    /// The `sourceflow.process` span of a message, born with every field.
    fn process_span(
        &self,
        msg: &ReceivedMessage,
        env: Option<&crate::envelope::Incoming>,
    ) -> tracing::Span {
        tracing::info_span!(
            "sourceflow.process",
            otel.kind = "consumer",
            messaging.system = telemetry::messaging_system(self.transport().name(), MessageKind::Command),
            messaging.destination.name = &*self.queue,
            messaging.operation.type = "process",
            messaging.message.id = env.map(|e| e.id()),
            messaging.message.conversation_id = env.map(|e| e.correlation_id().unwrap_or(e.id())),
            sourceflow.wire_name = env.map(|e| e.wire_name()),
            sourceflow.entity_id = env.and_then(|e| e.entity_id()),
            sourceflow.receive_count = msg.receive_count,
            sourceflow.service = self.dispatcher.service(),
            otel.status_code = tracing::field::Empty,
        )
    }

    /// The attributes of a directly made `sourceflow.process` span: the fields of
    /// [`process_span`](Self::process_span), an undecodable message's own left out.
    fn process_attributes(
        &self,
        msg: &ReceivedMessage,
        env: Option<&crate::envelope::Incoming>,
        spans: &telemetry::Spans,
    ) -> Vec<opentelemetry::KeyValue> {
        use opentelemetry::KeyValue;
        let system = telemetry::messaging_system(self.transport().name(), MessageKind::Command);
        let mut attributes = Vec::with_capacity(9);
        attributes.extend([
            KeyValue::new("messaging.system", system),
            self.attrs.destination_value().clone(),
            KeyValue::new("messaging.operation.type", "process"),
        ]);
        if let Some(e) = env {
            let conversation = e.correlation_id().unwrap_or(e.id());
            attributes.extend([
                KeyValue::new("messaging.message.id", e.id().to_string()),
                KeyValue::new(
                    "messaging.message.conversation_id",
                    conversation.to_string(),
                ),
                self.attrs.wire_value(e.wire_name()),
            ]);
            if let Some(entity) = e.entity_id() {
                attributes.push(KeyValue::new("sourceflow.entity_id", entity.to_string()));
            }
        }
        attributes.extend([
            KeyValue::new("sourceflow.receive_count", i64::from(msg.receive_count)),
            spans.service(),
        ]);
        attributes
    }
}

/// How one record of a Lambda batch ended (see [`Listener::process_record`]).
#[cfg(feature = "lambda")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordOutcome {
    /// Acknowledged (deleted) or moved to the dead-letter queue: not in
    /// `batchItemFailures`.
    Done,
    /// Retried (its visibility set to the backoff, `after`) or handed back (`after` zero):
    /// reported failed, so that the event source mapping leaves it on the queue.
    Failed {
        /// When it becomes visible again.
        after: Duration,
    },
}

#[cfg(feature = "lambda")]
impl Listener {
    /// Whether this listener's queue is FIFO.
    pub(crate) fn is_fifo(&self) -> bool {
        self.fifo
    }

    /// Registers the records of one unit (a record, or a FIFO group's records in order)
    /// with the heartbeat's bookkeeping — its claims are released through it — although
    /// no heartbeat task runs on Lambda.
    pub(crate) fn hold(&self, records: &[ReceivedMessage]) -> Hold {
        self.heartbeat.hold(records)
    }

    /// Runs one Lambda record through the stages and settles it through the broker (its
    /// receipt is the event source mapping's): the same path as a received message, with
    /// no retry in place.
    pub(crate) async fn process_record(&self, msg: &ReceivedMessage, hold: &Hold) -> RecordOutcome {
        let (d, settled) = self.process(msg, hold, 0, false).await;
        hold.settled(&msg.receipt);
        let now = Duration::ZERO;
        match d {
            // A dead letter the broker did not take stays on the queue: reported done, the
            // event source mapping would delete it.
            Disposition::DeadLetter(_) if !settled => RecordOutcome::Failed { after: now },
            // Not due yet: sent again with the time left, this record deleted. A re-send
            // that failed left the record on the queue (reported failed, or the event
            // source mapping would delete it).
            Disposition::Redelay(_) if !settled => RecordOutcome::Failed { after: now },
            Disposition::Ack(_) | Disposition::DeadLetter(_) | Disposition::Redelay(_) => {
                RecordOutcome::Done
            }
            Disposition::Retry(r) => RecordOutcome::Failed { after: r.after },
            Disposition::Return => RecordOutcome::Failed { after: now },
        }
    }
}

/// The `sourceflow.process` span of a message, made one way or the other.
enum ProcessSpan {
    /// A `tracing` span (no tracer provider given).
    Traced(tracing::Span),
    /// An OpenTelemetry span made directly, held by its context.
    Direct(opentelemetry::Context),
}

/// The messages of a unit of work: most units are one message, kept inline.
pub(crate) type Unit = smallvec::SmallVec<[ReceivedMessage; 1]>;

/// Splits a FIFO batch into per-group runs, keeping the order within each group, and
/// appends them to `into`, leaving `messages` empty. A run of several messages is
/// allocated once at its length (a backlogged group gives runs of ten, which growing by
/// doubling reallocated four times).
pub(crate) fn group_in_order(messages: &mut Vec<ReceivedMessage>, into: &mut Vec<Unit>) {
    let first = into.len();
    // At the first message of each group, the length of its run; 0 elsewhere.
    let runs: smallvec::SmallVec<[usize; crate::transport::MAX_BATCH_ENTRIES]> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let same = |e: &ReceivedMessage| e.group_id == m.group_id;
            match messages[..i].iter().any(same) {
                true => 0,
                false => messages[i..].iter().filter(|e| same(e)).count(),
            }
        })
        .collect();
    for (m, run) in messages.drain(..).zip(runs) {
        match into[first..]
            .iter_mut()
            .find(|u| u[0].group_id == m.group_id)
        {
            Some(u) => u.push(m),
            None => {
                let mut unit = Unit::with_capacity(run);
                unit.push(m);
                into.push(unit);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str, group: &str) -> ReceivedMessage {
        ReceivedMessage {
            broker_id: id.into(),
            receipt: id.into(),
            body: "{}".into(),
            attributes: Vec::new().into(),
            receive_count: 1,
            group_id: Some(group.into()),
            received_at: tokio::time::Instant::now(),
        }
    }

    /// Runs per group in their order, each allocated at its length, appended after what
    /// `into` held; the batch left empty with its room.
    #[test]
    fn groups_keep_their_order_and_runs_are_sized_once() {
        let mut batch: Vec<_> = [
            ("a1", "a"),
            ("b1", "b"),
            ("a2", "a"),
            ("c1", "c"),
            ("a3", "a"),
        ]
        .into_iter()
        .map(|(id, g)| msg(id, g))
        .collect();
        let room = batch.capacity();
        let mut units = vec![smallvec::smallvec![msg("a0", "a")]];
        group_in_order(&mut batch, &mut units);
        let ids: Vec<Vec<&str>> = units
            .iter()
            .map(|u| u.iter().map(|m| &*m.broker_id).collect())
            .collect();
        assert_eq!(
            ids,
            [vec!["a0"], vec!["a1", "a2", "a3"], vec!["b1"], vec!["c1"]]
        );
        assert_eq!(
            units[1].capacity(),
            3,
            "the run of `a` allocated at its length"
        );
        assert!(!units[2].spilled(), "a run of one stays inline");
        assert!(batch.is_empty());
        assert_eq!(batch.capacity(), room);
    }
}
