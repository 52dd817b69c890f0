//! Topics: SNS's checks on a published message, and the fan-out of a copy to every
//! subscribed queue whose filter policy accepts it (raw message delivery).

use std::sync::Arc;

use parking_lot::RwLock;
use tokio::time::Instant;

use super::queue::Queue;
use crate::envelope::OutgoingMessage;
use crate::filter::FilterPolicy;
use crate::transport::{EntryError, GroupHold, SNS_MAX_MESSAGE_BYTES};

/// A topic of the embedded broker.
pub(super) struct Topic {
    /// FIFO topic.
    pub(super) fifo: bool,
    /// Its subscriptions, in the order they were made.
    pub(super) subscribers: RwLock<Vec<Subscriber>>,
}

/// A queue subscribed to a topic.
pub(super) struct Subscriber {
    /// The subscribed queue.
    pub(super) queue: Arc<Queue>,
    /// The subscription's filter policy on message attributes; `None` delivers everything.
    pub(super) filter: Option<FilterPolicy>,
}

impl Subscriber {
    fn accepts(&self, m: &OutgoingMessage) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|f| f.matches(&m.attributes))
    }
}

impl Topic {
    /// A new topic without subscribers.
    pub(super) fn new(fifo: bool) -> Self {
        Topic {
            fifo,
            subscribers: RwLock::new(Vec::new()),
        }
    }

    /// Why SNS would refuse `m` on this topic (`name`), if it would.
    fn refusal(&self, name: &str, m: &OutgoingMessage) -> Option<String> {
        if let Err(e) = m.check_size(name, SNS_MAX_MESSAGE_BYTES) {
            return Some(e.to_string());
        }
        if let Err(e) = m.check_attributes() {
            return Some(e);
        }
        if m.delay.is_some_and(|d| !d.is_zero()) {
            return Some(format!(
                "{} published to `{name}` with a delay: SNS topics take no per-message delay",
                m.wire_name
            ));
        }
        if self.fifo && m.group_id.is_none() {
            return Some(format!(
                "{} published to FIFO topic `{name}` without a message group id",
                m.wire_name
            ));
        }
        None
    }

    /// Publishes messages: each is refused (returned with its index) or accepted and
    /// delivered to every subscriber whose filter takes it.
    ///
    /// Once SNS has accepted a message, what a subscriber queue does with its copy is that
    /// subscription's business: a queue that refuses it is logged, and every other
    /// subscriber still gets its copy; the publish of that entry succeeded.
    pub(super) fn publish(
        &self,
        name: &str,
        messages: Vec<OutgoingMessage>,
        now: Instant,
    ) -> Vec<(usize, EntryError)> {
        let mut failed = Vec::new();
        let mut accepted = Vec::with_capacity(messages.len());
        let mut hold = GroupHold::default();
        for (i, m) in messages.into_iter().enumerate() {
            if let Some(held) = hold.check(&m) {
                failed.push((i, held));
            } else if let Some(reason) = self.refusal(name, &m) {
                hold.stop(&m);
                failed.push((i, EntryError::Refused(reason)));
            } else {
                accepted.push(m);
            }
        }
        if !accepted.is_empty() {
            self.fan_out(name, accepted, now);
        }
        failed
    }

    /// Delivers a copy of each message to every subscriber that accepts it: clones for all
    /// but the last subscriber, which takes the originals.
    fn fan_out(&self, name: &str, mut accepted: Vec<OutgoingMessage>, now: Instant) {
        let subscribers = self.subscribers.read();
        let Some((last, others)) = subscribers.split_last() else {
            return;
        };
        for s in others {
            deliver(
                name,
                s,
                accepted.iter().filter(|m| s.accepts(m)).cloned(),
                now,
            );
        }
        accepted.retain(|m| last.accepts(m));
        deliver(name, last, accepted, now);
    }
}

fn deliver(
    topic: &str,
    s: &Subscriber,
    messages: impl IntoIterator<Item = OutgoingMessage>,
    now: Instant,
) {
    for (_, e) in s.queue.send(messages, now) {
        tracing::warn!(
            topic,
            queue = %s.queue.name,
            error = %e,
            "a subscribed queue refused a published message; the other subscribers still got it"
        );
    }
}
