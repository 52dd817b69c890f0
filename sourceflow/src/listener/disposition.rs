//! What the pipeline decides for a message. Only [`settle`](super::settle) turns a
//! disposition into broker calls, claim releases, metrics and a log line.

use std::time::Duration;

/// What happens to a received message.
#[derive(Debug)]
pub(crate) enum Disposition {
    /// Done: delete it.
    Ack(Ack),
    /// Not done: make it visible again after `after`.
    Retry(Retry),
    /// It can never succeed: move it to the dead-letter queue.
    DeadLetter(DeadLetter),
    /// Give it back untouched, visible at once (shutdown; a unit that did not start).
    Return,
    /// Not due yet: send it to the queue again, delayed, then delete this copy.
    Redelay(Redelay),
}

/// A message received before its due time ([`crate::schedule`]).
#[derive(Debug)]
pub(crate) struct Redelay {
    /// How long it still has to wait.
    pub left: std::time::Duration,
    /// Its wire name and message id, for the copy sent again.
    pub wire_name: String,
    pub message_id: String,
}

/// Why a message is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ack {
    /// Its handlers ran and what they produced went out.
    Success,
    /// It was processed before (idempotency).
    Duplicate,
    /// Another worker took its claim over and will complete it.
    TakenOver,
}

/// A message to be retried.
#[derive(Debug)]
pub(crate) struct Retry {
    /// Whose fault it was: only the handler's spends an attempt.
    pub cause: Cause,
    /// When it should come back.
    pub after: Duration,
    /// Why, for the log line (and the dead-letter reason of a later final attempt).
    pub reason: String,
}

/// Whose fault a retry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The handler failed this attempt (its number).
    Handler { attempt: u32 },
    /// A store, the broker or a dispatch failed: the handler's attempts are not spent.
    Infrastructure,
}

/// A message to be moved to the dead-letter queue.
#[derive(Debug)]
pub(crate) struct DeadLetter {
    /// What kind of problem (the metric's `sourceflow.reason`).
    pub kind: DeadLetterKind,
    /// The `sourceflow.dlq_reason` attribute: never a payload value.
    pub reason: String,
}

/// Why a message is dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeadLetterKind {
    /// The body is not a sourceflow envelope.
    Undecodable,
    /// No type with its wire name is linked into the service.
    UnknownType,
    /// The type is known, but this service has no handler for it on this queue.
    NoHandler,
    /// It could not be decrypted (tampered, wrong key, plaintext of an encrypted type).
    Decrypt,
    /// Its payload does not decode as its type.
    Payload,
    /// Its id was processed before with another payload.
    Mismatch,
    /// Its handlers failed on every allowed attempt.
    Failures,
    /// A handler rejected it as permanently failing.
    Rejected,
    /// What its handlers produced was refused by the broker.
    Refused,
    /// Its stored payload is missing or corrupted (claim check).
    ClaimCheck,
}

impl DeadLetterKind {
    /// The metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            DeadLetterKind::Undecodable => "undecodable",
            DeadLetterKind::UnknownType => "unknown_type",
            DeadLetterKind::NoHandler => "no_handler",
            DeadLetterKind::Decrypt => "decrypt",
            DeadLetterKind::Payload => "payload",
            DeadLetterKind::Mismatch => "mismatch",
            DeadLetterKind::Failures => "failures",
            DeadLetterKind::Rejected => "rejected",
            DeadLetterKind::Refused => "refused",
            DeadLetterKind::ClaimCheck => "claim_check",
        }
    }
}

impl Disposition {
    /// A dead letter of `kind` because of `reason`.
    pub(crate) fn dead_letter(kind: DeadLetterKind, reason: impl Into<String>) -> Self {
        Disposition::DeadLetter(DeadLetter {
            kind,
            reason: reason.into(),
        })
    }

    /// A retry after an infrastructure fault.
    pub(crate) fn infrastructure(after: Duration, reason: impl Into<String>) -> Self {
        Disposition::Retry(Retry {
            cause: Cause::Infrastructure,
            after,
            reason: reason.into(),
        })
    }

    /// The position of the `sourceflow.outcome` label of `sourceflow.message.processed` in
    /// [`OUTCOMES`](crate::telemetry::OUTCOMES), which is also the position of its
    /// precomputed attribute set.
    pub(crate) fn outcome_index(&self) -> usize {
        match self {
            Disposition::Ack(Ack::Success) => 0,
            Disposition::Ack(Ack::Duplicate | Ack::TakenOver) => 1,
            Disposition::Retry(Retry {
                cause: Cause::Handler { .. },
                ..
            }) => 2,
            Disposition::Retry(Retry {
                cause: Cause::Infrastructure,
                ..
            }) => 3,
            Disposition::DeadLetter(_) => 4,
            Disposition::Return => 5,
            Disposition::Redelay(_) => 6,
        }
    }

    /// True when a handler failed on this delivery (the `processing_error` counter).
    pub(crate) fn handler_failed(&self) -> bool {
        matches!(
            self,
            Disposition::Retry(Retry {
                cause: Cause::Handler { .. },
                ..
            }) | Disposition::DeadLetter(DeadLetter {
                kind: DeadLetterKind::Failures | DeadLetterKind::Rejected,
                ..
            })
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::OUTCOMES;

    #[test]
    fn every_disposition_has_its_documented_outcome_label() {
        let retry = |cause| {
            Disposition::Retry(Retry {
                cause,
                after: Duration::ZERO,
                reason: String::new(),
            })
        };
        let cases = [
            (Disposition::Ack(Ack::Success), "success"),
            (Disposition::Ack(Ack::Duplicate), "duplicate"),
            (Disposition::Ack(Ack::TakenOver), "duplicate"),
            (retry(Cause::Handler { attempt: 1 }), "error"),
            (retry(Cause::Infrastructure), "infrastructure_error"),
            (
                Disposition::dead_letter(DeadLetterKind::Failures, "x"),
                "dead_lettered",
            ),
            (Disposition::Return, "returned"),
            (
                Disposition::Redelay(Redelay {
                    left: Duration::from_secs(1),
                    wire_name: String::new(),
                    message_id: String::new(),
                }),
                "redelayed",
            ),
        ];
        for (d, label) in cases {
            assert_eq!(OUTCOMES[d.outcome_index()], label, "{d:?}");
        }
    }
}
