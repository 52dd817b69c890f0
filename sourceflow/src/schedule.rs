//! Delays of any length: what SQS cannot hold back is held back by sourceflow.
//!
//! SQS delays a message by at most 15 minutes (`DelaySeconds` 900) and SNS not at all. A
//! message due later than the broker can delay it, or an event with any delay, carries its
//! due time in the [`DUE_AT`] attribute (milliseconds since the Unix epoch) and goes out with
//! the longest delay the broker allows (none for a topic). A listener that receives it
//! before it is due sends it again to the same queue, delayed by what is left (at most the
//! broker's limit), and deletes the copy it received — its body, attributes and message id
//! unchanged, so idempotency holds. An event is so held back on each subscriber queue.
//! FIFO queues and topics take no per-message delay at all: a delay to one is refused at
//! the call.
//!
//! Time is the wall clock, read through tokio's clock ([`now_ms`]), so that a test on a
//! paused clock sees a delay of a day run out at once, as it sees a short one.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::attribute::MAX_ATTRIBUTES;
use crate::envelope::{attribute, AttributeValue, OutgoingMessage};
use crate::error::{Error, Result};
use crate::message::MessageKind;
use crate::transport::MAX_DELAY;

/// The message attribute that carries a message's due time (a `Number`: milliseconds since
/// the Unix epoch), set only on a message due later than its broker can delay it.
pub const DUE_AT: &str = "sourceflow.due_at";

/// Milliseconds since the Unix epoch now: the wall clock when the process first asked,
/// advanced by tokio's clock since (which is the wall clock's pace, except on a paused
/// test clock, whose jumps it follows).
pub(crate) fn now_ms() -> u64 {
    static ANCHOR: OnceLock<(u64, tokio::time::Instant)> = OnceLock::new();
    let (wall, at) = *ANCHOR.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        (wall, tokio::time::Instant::now())
    });
    let since = tokio::time::Instant::now().saturating_duration_since(at);
    wall.saturating_add(since.as_millis() as u64)
}

/// The delay from now until `at` (zero when `at` has passed), on the clock of [`now_ms`].
pub(crate) fn until(at: SystemTime) -> Duration {
    let at = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Duration::from_millis(at.saturating_sub(now_ms()))
}

/// The due time of a received message, when it carries one.
pub(crate) fn due_at(attributes: &[(crate::AttributeName, AttributeValue)]) -> Option<u64> {
    attribute(attributes, DUE_AT)?.parse().ok()
}

/// How long a received message still has to wait, if it is not due yet.
pub(crate) fn remaining(attributes: &[(crate::AttributeName, AttributeValue)]) -> Option<Duration> {
    let left = due_at(attributes)?.checked_sub(now_ms())?;
    (left > 0).then(|| Duration::from_millis(left))
}

/// The longest delay sourceflow asks a broker for: SQS's 15 minutes, or less when lowered
/// for a test (at least one second, which SQS counts in).
pub(crate) fn native_cap(cap: Duration) -> Duration {
    cap.clamp(Duration::from_secs(1), MAX_DELAY)
}

/// Prepares the delay of a message to `destination`: within `cap` it stays the broker's;
/// beyond it, or on a topic, the message carries its due time and goes out with what the
/// broker allows. A delay to a FIFO destination is refused. Applying it again to a message
/// it prepared changes nothing.
pub(crate) fn prepare(
    kind: MessageKind,
    destination: &str,
    message: &mut OutgoingMessage,
    cap: Duration,
) -> Result<()> {
    let Some(delay) = message.delay.filter(|d| !d.is_zero()) else {
        message.delay = None;
        return Ok(());
    };
    if destination.ends_with(".fifo") {
        return Err(fifo_refused(kind, destination, &message.wire_name));
    }
    let cap = native_cap(cap);
    if kind == MessageKind::Command && delay <= cap {
        return Ok(());
    }
    if due_at(&message.attributes).is_none() {
        add_due_at(message, now_ms().saturating_add(delay.as_millis() as u64))?;
    }
    message.delay = match kind {
        MessageKind::Command => Some(cap),
        MessageKind::Event => None,
    };
    Ok(())
}

fn fifo_refused(kind: MessageKind, destination: &str, wire_name: &str) -> Error {
    let what = match kind {
        MessageKind::Command => "FIFO queue",
        MessageKind::Event => "FIFO topic",
    };
    Error::Unsupported(format!(
        "{wire_name} to {what} `{destination}`: FIFO destinations take no per-message delay (holding one message back would hold back its whole message group); send it without a delay, or delay a command to a standard queue that sends it when due"
    ))
}

/// Adds the due-time attribute, if one more attribute fits beside the dead-letter
/// reason's slot.
fn add_due_at(message: &mut OutgoingMessage, at: u64) -> Result<()> {
    let carried = message.attributes.len();
    if carried + 2 > MAX_ATTRIBUTES {
        return Err(Error::Unsupported(format!(
            "{}: a delay longer than the broker holds travels in one more message attribute (`{DUE_AT}`), but this message already carries {carried} of SQS's {MAX_ATTRIBUTES} (one is kept for the dead-letter reason): set fewer attributes or headers on it",
            message.wire_name
        )));
    }
    let mut attributes = Vec::with_capacity(carried + 1);
    attributes.extend(message.attributes.iter().cloned());
    attributes.push((DUE_AT.into(), AttributeValue::Number(at.to_string().into())));
    message.attributes = attributes.into();
    Ok(())
}

/// The copy of a received message that waits out `left` more on its queue: the same body,
/// attributes and message id, delayed by what the broker allows.
pub(crate) fn redelayed(
    body: std::sync::Arc<str>,
    attributes: crate::transport::Attributes,
    wire_name: String,
    message_id: String,
    left: Duration,
    cap: Duration,
) -> OutgoingMessage {
    // SQS counts delays in whole seconds: round up, never deliver early.
    let secs = left.as_millis().div_ceil(1000) as u64;
    OutgoingMessage {
        body,
        attributes,
        group_id: None,
        dedup_id: None,
        delay: Some(Duration::from_secs(secs.max(1)).min(native_cap(cap))),
        wire_name: std::borrow::Cow::Owned(wire_name),
        message_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(delay: Option<Duration>) -> OutgoingMessage {
        OutgoingMessage {
            body: "{}".into(),
            attributes: Vec::new().into(),
            group_id: None,
            dedup_id: None,
            delay,
            wire_name: "t.T".into(),
            message_id: "m".into(),
        }
    }

    #[test]
    fn a_delay_within_the_cap_stays_the_brokers() {
        let mut m = msg(Some(Duration::from_secs(60)));
        prepare(MessageKind::Command, "q", &mut m, MAX_DELAY).expect("prepare");
        assert_eq!(m.delay, Some(Duration::from_secs(60)));
        assert!(due_at(&m.attributes).is_none());
    }

    #[test]
    fn a_longer_delay_carries_its_due_time_and_the_cap() {
        let mut m = msg(Some(Duration::from_secs(3600)));
        let before = now_ms();
        prepare(MessageKind::Command, "q", &mut m, MAX_DELAY).expect("prepare");
        assert_eq!(m.delay, Some(MAX_DELAY));
        let due = due_at(&m.attributes).expect("due time");
        assert!(due >= before + 3_600_000 && due <= now_ms() + 3_600_000);
        // Prepared twice (the outbox's relay prepares what it stored): unchanged.
        let again = m.clone();
        prepare(MessageKind::Command, "q", &mut m, MAX_DELAY).expect("prepare");
        assert_eq!(m, again);
    }

    #[test]
    fn an_event_goes_out_at_once_with_its_due_time() {
        let mut m = msg(Some(Duration::from_secs(5)));
        prepare(MessageKind::Event, "t", &mut m, MAX_DELAY).expect("prepare");
        assert_eq!(m.delay, None);
        assert!(due_at(&m.attributes).is_some());
    }

    #[test]
    fn fifo_destinations_refuse_a_delay_and_take_none() {
        let mut m = msg(Some(Duration::from_secs(5)));
        let e = prepare(MessageKind::Command, "q.fifo", &mut m, MAX_DELAY).unwrap_err();
        assert!(e.to_string().contains("take no per-message delay"), "{e}");
        let mut m = msg(Some(Duration::ZERO));
        prepare(MessageKind::Command, "q.fifo", &mut m, MAX_DELAY).expect("no delay");
        assert_eq!(m.delay, None);
    }

    #[test]
    fn no_room_for_the_due_time_is_a_clear_error() {
        let mut m = msg(Some(Duration::from_secs(3600)));
        m.attributes = (0..9)
            .map(|i| (format!("a{i}").into(), AttributeValue::String("x".into())))
            .collect::<Vec<_>>()
            .into();
        let e = prepare(MessageKind::Command, "q", &mut m, MAX_DELAY).unwrap_err();
        assert!(e.to_string().contains(DUE_AT), "{e}");
    }

    #[test]
    fn a_redelay_rounds_up_to_whole_seconds_within_the_cap() {
        let m = |left| {
            redelayed(
                "{}".into(),
                Vec::new().into(),
                "t".into(),
                "m".into(),
                left,
                MAX_DELAY,
            )
            .delay
        };
        assert_eq!(m(Duration::from_millis(300)), Some(Duration::from_secs(1)));
        assert_eq!(m(Duration::from_millis(1001)), Some(Duration::from_secs(2)));
        assert_eq!(m(Duration::from_secs(7200)), Some(MAX_DELAY));
    }

    #[tokio::test(start_paused = true)]
    async fn the_clock_follows_a_paused_tokio_clock() {
        let start = now_ms();
        tokio::time::advance(Duration::from_secs(86_400)).await;
        assert!(now_ms() >= start + 86_400_000);
    }
}
