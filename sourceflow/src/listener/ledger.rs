//! Receives that were not handler attempts, per message, as this process saw them.
//!
//! With an idempotency store, the store counts a message's handler attempts (see
//! [`Claim::Acquired`](crate::idempotency::Claim::Acquired)). Without one, the attempt is
//! the broker's receive count less the receives this process handed back untouched
//! (infrastructure faults, shutdown); receives by other instances that died are counted as
//! attempts, which can only bring the dead-letter queue earlier, never later. The counts
//! also pace the backoff of repeated infrastructure faults.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::transport::ReceivedMessage;

/// Messages remembered at most; beyond, the ledger starts afresh (a bound, not a cache:
/// forgetting only makes an attempt count more conservative).
const CAPACITY: usize = 100_000;

#[derive(Debug, Default)]
pub(crate) struct Ledger {
    returns: Mutex<HashMap<std::sync::Arc<str>, u32>>,
}

impl Ledger {
    /// `msg` was handed back without a handler attempt counting.
    pub(crate) fn returned(&self, msg: &ReceivedMessage) {
        let mut r = self.returns.lock();
        if r.len() >= CAPACITY && !r.contains_key(&*msg.broker_id) {
            r.clear();
        }
        *r.entry(msg.broker_id.clone()).or_default() += 1;
    }

    /// `msg` is settled for good: forget it.
    pub(crate) fn forget(&self, msg: &ReceivedMessage) {
        let mut r = self.returns.lock();
        if !r.is_empty() {
            r.remove(&*msg.broker_id);
        }
    }

    /// How often this process handed `msg` back untouched.
    pub(crate) fn returns(&self, msg: &ReceivedMessage) -> u32 {
        let r = self.returns.lock();
        if r.is_empty() {
            return 0;
        }
        r.get(&*msg.broker_id).copied().unwrap_or(0)
    }

    /// The handler attempt this delivery is when no store counts attempts: the receive
    /// count less the receives handed back untouched, plus `in_place` retries of this
    /// delivery (FIFO retries that kept the message).
    pub(crate) fn attempt(&self, msg: &ReceivedMessage, in_place: u32) -> u32 {
        msg.receive_count
            .saturating_sub(self.returns(msg))
            .max(1)
            .saturating_add(in_place)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str, receive_count: u32) -> ReceivedMessage {
        ReceivedMessage {
            broker_id: id.into(),
            receipt: "".into(),
            body: "".into(),
            attributes: Vec::new().into(),
            receive_count,
            group_id: None,
            received_at: tokio::time::Instant::now(),
        }
    }

    #[test]
    fn returned_receives_are_not_attempts() {
        let l = Ledger::default();
        assert_eq!(l.attempt(&msg("a", 1), 0), 1);
        l.returned(&msg("a", 1));
        l.returned(&msg("a", 2));
        assert_eq!(l.attempt(&msg("a", 3), 0), 1);
        assert_eq!(l.attempt(&msg("a", 4), 0), 2);
        assert_eq!(l.attempt(&msg("a", 4), 2), 4);
        assert_eq!(l.attempt(&msg("b", 4), 0), 4);
        l.forget(&msg("a", 4));
        assert_eq!(l.returns(&msg("a", 4)), 0);
    }
}
