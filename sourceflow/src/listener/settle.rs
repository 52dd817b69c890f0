//! The one place that settles a message: a [`Disposition`] becomes the broker call
//! (delete, change visibility, move to the dead-letter queue), the release of the claim
//! the delivery still holds, the metrics and the log line. No other code deletes,
//! dead-letters or changes the visibility of a message.

use std::time::Duration;

use opentelemetry::KeyValue;

use super::disposition::{Ack, Cause, DeadLetter, Disposition, Redelay, Retry};
use super::stages::Track;
use super::Listener;
use crate::idempotency::Release;
use crate::transport::ReceivedMessage;

/// How a settled retry is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Apply {
    /// Through the broker (visibility, delete, move).
    Broker,
    /// Kept in hand: a FIFO unit retries its head in place so that the messages behind it
    /// cannot overtake it; only the claim, the metrics and the log line are settled.
    InPlace,
}

impl Listener {
    /// Settles one message. False only when a dead-letter move, or the re-send of a message
    /// not due yet, failed (the message stays on its queue, to be received again).
    pub(crate) async fn settle(
        &self,
        msg: &ReceivedMessage,
        d: &Disposition,
        track: &Track,
        elapsed: Duration,
        apply: Apply,
    ) -> bool {
        self.release_claim(d, track).await;
        let moved = match (d, apply) {
            (Disposition::Retry(_), Apply::InPlace) => false,
            (Disposition::Ack(_), _) => {
                crate::failpoints::pause(crate::failpoints::BEFORE_DELETE).await;
                self.delete(msg).await;
                false
            }
            (Disposition::Retry(r), Apply::Broker) => {
                self.come_back(msg, r).await;
                false
            }
            (Disposition::DeadLetter(dl), _) => self.move_to_dead_letters(msg, dl).await,
            (Disposition::Return, _) => {
                self.give_back(std::slice::from_ref(msg)).await;
                false
            }
            (Disposition::Redelay(r), _) => self.redelay(msg, r).await,
        };
        self.record(msg, d, track, elapsed, moved);
        match d {
            Disposition::DeadLetter(_) | Disposition::Redelay(_) => moved,
            _ => true,
        }
    }

    /// Hands messages back untouched, visible at once, in one call (their order kept).
    pub(crate) async fn give_back(&self, msgs: &[ReceivedMessage]) {
        self.give_back_after(msgs, Duration::ZERO).await
    }

    /// Hands messages back untouched, visible again after `after` (on Lambda, the rest of
    /// a FIFO group behind a failed record, made visible with it), in one call.
    pub(crate) async fn give_back_after(&self, msgs: &[ReceivedMessage], after: Duration) {
        if msgs.is_empty() {
            return;
        }
        let receipts = msgs.iter().map(|m| m.receipt.clone()).collect();
        if let Err(e) = self
            .transport()
            .change_visibility(&self.queue, receipts, after)
            .await
        {
            tracing::warn!(queue = %self.queue, error = %e, "could not hand messages back; they reappear after their visibility timeout");
        }
        for m in msgs {
            self.ledger.returned(m);
            if self.stop.is_cancelled() {
                self.drain.returned();
            }
            tracing::debug!(queue = %self.queue, broker_id = %m.broker_id, "handed back to the queue");
        }
    }

    /// Releases the claim a delivery still holds, as its disposition says.
    async fn release_claim(&self, d: &Disposition, track: &Track) {
        let why = match d {
            // A completed claim is no longer held; a taken-over one is not ours.
            Disposition::Ack(_) => return,
            Disposition::Retry(Retry {
                cause: Cause::Handler { .. },
                ..
            }) => Release::Failed,
            Disposition::Retry(_) | Disposition::Return => Release::Returned,
            // Held back before any claim.
            Disposition::Redelay(_) => return,
            Disposition::DeadLetter(_) => Release::DeadLettered,
        };
        #[cfg(any(feature = "postgres", feature = "sqlite"))]
        if let Some(claim) = &track.tx_claim {
            self.release_rolled_back(claim, why).await;
            return;
        }
        let (Some(claim), Some(idem)) = (&track.claim, &self.idempotency) else {
            return;
        };
        if let Err(e) = idem.store.release(&claim.key, &claim.token, why).await {
            tracing::warn!(key = %claim.key, error = %e, "could not release the idempotency claim; the next delivery waits for its lease to run out");
        }
    }

    async fn delete(&self, msg: &ReceivedMessage) {
        self.ledger.forget(msg);
        if let Err(e) = self
            .transport()
            .delete(&self.queue, vec![msg.receipt.clone()])
            .await
        {
            tracing::warn!(queue = %self.queue, broker_id = %msg.broker_id, error = %e, "handled, but the delete failed; the message will be delivered again and acknowledged as a duplicate");
        }
    }

    async fn come_back(&self, msg: &ReceivedMessage, r: &Retry) {
        if r.cause == Cause::Infrastructure {
            self.ledger.returned(msg);
        }
        let receipts = vec![msg.receipt.clone()];
        if let Err(e) = self
            .transport()
            .change_visibility(&self.queue, receipts, r.after)
            .await
        {
            tracing::warn!(queue = %self.queue, broker_id = %msg.broker_id, error = %e, "could not delay the retry; the message comes back after its visibility timeout");
        }
    }

    /// Sends a message that is not due yet to its queue again, delayed by what is left (at
    /// most the broker's limit), then deletes this copy: send first, so that a crash in
    /// between leaves two copies of one message id (idempotency settles them), never none.
    /// A send that fails leaves it to come back after the infrastructure backoff (false).
    async fn redelay(&self, msg: &ReceivedMessage, r: &Redelay) -> bool {
        let copy = crate::schedule::redelayed(
            msg.body.clone(),
            msg.attributes.clone(),
            r.wire_name.clone(),
            r.message_id.clone(),
            r.left,
            self.dispatcher.delay_cap(),
        );
        match self.transport().send(&self.queue, vec![copy]).await {
            Ok(()) => {
                crate::failpoints::pause(crate::failpoints::AFTER_REDELAY_SEND).await;
                self.delete(msg).await;
                true
            }
            Err(e) => {
                tracing::warn!(queue = %self.queue, broker_id = %msg.broker_id, error = %e, "could not hold back a message that is not due yet; it comes back after the infrastructure backoff");
                let retry = Retry {
                    cause: Cause::Infrastructure,
                    after: self.infrastructure_retry.delay(1),
                    reason: e.to_string(),
                };
                self.come_back(msg, &retry).await;
                false
            }
        }
    }

    /// Moves the message to the dead-letter queue; true once the broker confirmed it.
    async fn move_to_dead_letters(&self, msg: &ReceivedMessage, dl: &DeadLetter) -> bool {
        self.ledger.forget(msg);
        let moved = self
            .transport()
            .dead_letter(&self.queue, &self.dead_letter_queue, msg, &dl.reason)
            .await;
        match moved {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(queue = %self.queue, broker_id = %msg.broker_id, error = %e, "could not move the message to the dead-letter queue; it stays and will be received again");
                false
            }
        }
    }

    /// Metrics and the log line of a settled message.
    fn record(
        &self,
        msg: &ReceivedMessage,
        d: &Disposition,
        track: &Track,
        elapsed: Duration,
        moved: bool,
    ) {
        let metrics = self.dispatcher.metrics();
        let wire = self.attrs.wire(track.wire);
        let attrs = wire.pair();
        if d.handler_failed() {
            metrics.processing_error.add(1, attrs);
        }
        if matches!(d, Disposition::Ack(Ack::Duplicate | Ack::TakenOver)) {
            metrics.duplicate.add(1, attrs);
        }
        if let (Disposition::DeadLetter(dl), true) = (d, moved) {
            metrics.dead_lettered.add(
                1,
                &[
                    self.attrs.destination_value().clone(),
                    KeyValue::new("sourceflow.reason", dl.kind.label()),
                ],
            );
        }
        metrics
            .processing_duration
            .record(elapsed.as_secs_f64(), attrs);
        metrics.processed.add(1, wire.processed(d.outcome_index()));
        if self.stop.is_cancelled()
            && matches!(
                d,
                Disposition::Ack(_) | Disposition::DeadLetter(_) | Disposition::Redelay(_)
            )
        {
            self.drain.finished();
        }
        log(&self.queue, msg, d, track);
    }
}

/// The log line of a disposition (inside the message's `sourceflow.process` span).
fn log(queue: &str, msg: &ReceivedMessage, d: &Disposition, track: &Track) {
    let id = &*msg.broker_id;
    match d {
        Disposition::Ack(Ack::Success) => tracing::debug!(queue, broker_id = id, "handled"),
        Disposition::Ack(Ack::Duplicate) => {
            tracing::debug!(queue, broker_id = id, "duplicate of a completed message acknowledged")
        }
        Disposition::Ack(Ack::TakenOver) => tracing::warn!(queue, broker_id = id, "the idempotency claim was taken over before completion; the new owner completes the message"),
        Disposition::Retry(Retry { cause: Cause::Handler { attempt }, after, reason }) => tracing::warn!(
            queue, broker_id = id, attempt, retry_in_ms = after.as_millis() as u64, error = %reason,
            "handler failed; the message will be retried"
        ),
        Disposition::Retry(Retry { after, reason, .. }) => tracing::warn!(
            queue, broker_id = id, retry_in_ms = after.as_millis() as u64, error = %reason,
            "infrastructure fault; the message goes back without spending an attempt"
        ),
        Disposition::DeadLetter(dl) => tracing::error!(
            queue, broker_id = id, reason = %dl.reason, kind = dl.kind.label(), attempt = track.attempt,
            "moving the message to the dead-letter queue"
        ),
        Disposition::Return => tracing::debug!(queue, broker_id = id, "handed back to the queue"),
        Disposition::Redelay(r) => tracing::debug!(
            queue, broker_id = id, due_in_ms = r.left.as_millis() as u64,
            "not due yet; sent again to wait out the rest"
        ),
    }
}
