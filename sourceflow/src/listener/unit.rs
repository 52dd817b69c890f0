//! A unit of work: one message, or the messages of one FIFO group from one receive, handled
//! in order. Each message goes through the [stages](super::stages), then is
//! [settled](super::settle).

use std::sync::Arc;

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
    pub(crate) async fn run_unit(self: Arc<Self>, unit: Vec<ReceivedMessage>, hold: Hold) {
        let mut i = 0;
        let mut in_place = 0u32;
        while i < unit.len() {
            if self.stop.is_cancelled() {
                self.give_back(&unit[i..]).await;
                return;
            }
            let msg = &unit[i];
            let later_in_hand = self.fifo && i + 1 < unit.len();
            let (d, track, elapsed, span) = self.process(msg, &hold, in_place).await;
            if let (Disposition::Retry(r), true) = (&d, later_in_hand) {
                // The messages behind it in its group are in hand: retry it here, so they
                // can neither overtake it nor be delivered around it.
                let after = r.after;
                self.settle(msg, &d, &track, elapsed, Apply::InPlace)
                    .instrument(span)
                    .await;
                if matches!(r.cause, super::disposition::Cause::Handler { .. }) {
                    in_place += 1;
                }
                tokio::select! {
                    _ = self.stop.cancelled() => {
                        self.give_back(&unit[i..]).await;
                        return;
                    }
                    _ = tokio::time::sleep(after) => continue,
                }
            }
            self.settle(msg, &d, &track, elapsed, Apply::Broker)
                .instrument(span)
                .await;
            hold.settled(&msg.receipt);
            in_place = 0;
            i += 1;
        }
    }

    /// Runs the stages of one message inside a `sourceflow.process` span that continues
    /// the sender's trace; returns the disposition, what settling it needs, and how long
    /// it took, and the span (its settling is logged in it too).
    async fn process(
        &self,
        msg: &ReceivedMessage,
        hold: &Hold,
        in_place: u32,
    ) -> (Disposition, Track, std::time::Duration, tracing::Span) {
        let span = tracing::info_span!(
            "sourceflow.process",
            otel.kind = "consumer",
            messaging.system = telemetry::messaging_system(self.transport().name(), MessageKind::Command),
            messaging.destination.name = %self.queue,
            messaging.operation.type = "process",
            messaging.message.id = tracing::field::Empty,
            messaging.message.conversation_id = tracing::field::Empty,
            sourceflow.wire_name = tracing::field::Empty,
            sourceflow.entity_id = tracing::field::Empty,
            sourceflow.receive_count = msg.receive_count,
            sourceflow.service = %self.dispatcher.service(),
        );
        if let Some(tp) = envelope::attribute(&msg.attributes, attr::TRACEPARENT) {
            let state = envelope::attribute(&msg.attributes, attr::TRACESTATE);
            telemetry::continue_trace(&span, tp, state);
        }
        let started = std::time::Instant::now();
        let mut track = Track::new(in_place);
        let d = match self
            .pipeline(msg, hold, &mut track)
            .instrument(span.clone())
            .await
        {
            Ok(d) | Err(d) => d,
        };
        (d, track, started.elapsed(), span)
    }
}

/// Splits a FIFO batch into per-group runs, keeping the order within each group.
pub(crate) fn group_in_order(messages: Vec<ReceivedMessage>) -> Vec<Vec<ReceivedMessage>> {
    let mut order: Vec<Vec<ReceivedMessage>> = Vec::new();
    for m in messages {
        match order.iter_mut().find(|u| u[0].group_id == m.group_id) {
            Some(u) => u.push(m),
            None => order.push(vec![m]),
        }
    }
    order
}
