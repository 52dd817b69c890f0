//! The heartbeat: one task per listener that keeps every message this process holds
//! invisible, and every claim it holds leased, while handlers run — without ever pausing a
//! handler (it is a task of its own, not a branch of the handler's `select!`).
//!
//! A unit of work registers what it received with [`Heartbeat::hold`] and gets a [`Hold`];
//! as each message is settled the unit drops it from the hold, and dropping the hold
//! unregisters the rest. The task wakes every quarter visibility timeout (at most every
//! 5 s), and extends the visibility of the units whose last extension is half a timeout
//! old, in one `change_visibility` call per timeout value. No extension goes past
//! [`MAX_VISIBILITY`] from the message's receive (SQS refuses it). A renewal of a claim
//! that the store refuses means another worker took it over: the claim is marked lost, the
//! heartbeat stops renewing it, and it is logged as an error.
//!
//! At the shutdown deadline the listener takes what is still held with
//! [`Heartbeat::take_all`] *before* it aborts the units (an aborted unit's hold drops and
//! would unregister its messages), and hands it back.

use foldhash::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::health::Liveness;
use crate::idempotency::IdempotencyStore;
use crate::transport::{EntryError, Receipt, ReceivedMessage, Transport, MAX_VISIBILITY};

/// A claim held by a unit: its key and token, in one allocation shared by the unit, its
/// settling and the heartbeat (a clone copies no string; making one moves the strings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClaimRef(Arc<ClaimIds>);

/// What a [`ClaimRef`] shares.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ClaimIds {
    pub key: String,
    pub token: String,
}

impl ClaimRef {
    pub(crate) fn new(key: String, token: String) -> Self {
        ClaimRef(Arc::new(ClaimIds { key, token }))
    }
}

impl std::ops::Deref for ClaimRef {
    type Target = ClaimIds;
    fn deref(&self) -> &ClaimIds {
        &self.0
    }
}

struct HeldMessage {
    receipt: Receipt,
    broker_id: Arc<str>,
    received_at: Instant,
    capped: bool,
}

struct HeldUnit {
    /// Most units are one message: kept inline.
    messages: smallvec::SmallVec<[HeldMessage; 1]>,
    claim: Option<ClaimRef>,
    extended_at: Instant,
}

#[derive(Default)]
struct Held {
    next: u64,
    units: HashMap<u64, HeldUnit>,
}

struct Shared {
    held: Mutex<Held>,
    visibility: Duration,
}

/// The heartbeat of one listener (cheap to clone).
#[derive(Clone)]
pub(crate) struct Heartbeat {
    shared: Arc<Shared>,
}

/// What a unit holds; dropping it stops the heartbeat for whatever is left in it.
pub(crate) struct Hold {
    id: u64,
    shared: Arc<Shared>,
}

/// What was still held when the listener drained.
pub(crate) struct Leftover {
    pub receipts: Vec<Receipt>,
    pub claims: Vec<ClaimRef>,
}

impl Heartbeat {
    pub(crate) fn new(visibility: Duration) -> Self {
        Heartbeat {
            shared: Arc::new(Shared {
                held: Mutex::new(Held::default()),
                visibility,
            }),
        }
    }

    /// Starts holding `messages` (one unit of work).
    pub(crate) fn hold(&self, messages: &[ReceivedMessage]) -> Hold {
        let unit = HeldUnit {
            messages: messages
                .iter()
                .map(|m| HeldMessage {
                    receipt: m.receipt.clone(),
                    broker_id: m.broker_id.clone(),
                    received_at: m.received_at,
                    capped: false,
                })
                .collect(),
            claim: None,
            extended_at: messages
                .iter()
                .map(|m| m.received_at)
                .min()
                .unwrap_or_else(Instant::now),
        };
        let mut held = self.shared.held.lock();
        held.next += 1;
        let id = held.next;
        held.units.insert(id, unit);
        Hold {
            id,
            shared: self.shared.clone(),
        }
    }

    /// Number of messages held now.
    #[cfg(test)]
    pub(crate) fn held_messages(&self) -> usize {
        let held = self.shared.held.lock();
        held.units.values().map(|u| u.messages.len()).sum()
    }

    /// Everything still held, unregistered.
    pub(crate) fn take_all(&self) -> Leftover {
        let units = std::mem::take(&mut self.shared.held.lock().units);
        let mut left = Leftover {
            receipts: Vec::new(),
            claims: Vec::new(),
        };
        for u in units.into_values() {
            left.receipts
                .extend(u.messages.into_iter().map(|m| m.receipt));
            left.claims.extend(u.claim);
        }
        left
    }

    /// How often the task looks at what it holds.
    fn tick(&self) -> Duration {
        (self.shared.visibility / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
    }

    /// Runs until `done`: extends visibilities, renews claims, tells `liveness` it beats.
    pub(crate) async fn run(
        self,
        transport: Arc<dyn Transport>,
        queue: Arc<str>,
        store: Option<Arc<dyn IdempotencyStore>>,
        liveness: Arc<Liveness>,
        done: CancellationToken,
    ) {
        let tick = self.tick();
        loop {
            tokio::select! {
                _ = done.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            let due = self.due(Instant::now());
            if self.shared.held.lock().units.is_empty() {
                continue;
            }
            liveness.beat();
            self.extend(&*transport, &queue, due.extensions).await;
            if let Some(store) = &store {
                self.renew(&**store, &queue, due.claims).await;
            }
        }
    }

    /// What to extend and renew now; marks it extended.
    fn due(&self, now: Instant) -> Due {
        let vis = self.shared.visibility;
        let mut due = Due::default();
        let mut held = self.shared.held.lock();
        for (id, unit) in held.units.iter_mut() {
            if now.duration_since(unit.extended_at) < vis / 2 {
                continue;
            }
            unit.extended_at = now;
            for m in unit.messages.iter_mut() {
                let left = MAX_VISIBILITY.saturating_sub(now.duration_since(m.received_at));
                let timeout = vis.min(left);
                if timeout < vis && !m.capped {
                    m.capped = true;
                    tracing::warn!(broker_id = %m.broker_id, "a message has been held for nearly 12 hours (the SQS limit): its visibility is not extended past it");
                }
                if !timeout.is_zero() {
                    due.extensions
                        .entry(timeout.as_secs().max(1))
                        .or_default()
                        .push(m.receipt.clone());
                }
            }
            if let Some(c) = &unit.claim {
                due.claims.push((*id, c.clone()));
            }
        }
        due
    }

    async fn extend(
        &self,
        transport: &dyn Transport,
        queue: &str,
        extensions: HashMap<u64, Vec<Receipt>>,
    ) {
        for (secs, receipts) in extensions {
            if let Err(e) = transport
                .change_visibility(queue, receipts, Duration::from_secs(secs))
                .await
            {
                // A receipt settled meanwhile is no longer valid: nothing to keep.
                let real = e
                    .failed
                    .iter()
                    .filter(|(_, err)| !matches!(err, EntryError::InvalidReceipt))
                    .count();
                if real > 0 {
                    tracing::warn!(queue, error = %e, "visibility heartbeat failed; the messages may be delivered again while their handlers run");
                }
            }
        }
    }

    async fn renew(&self, store: &dyn IdempotencyStore, queue: &str, claims: Vec<(u64, ClaimRef)>) {
        for (id, c) in claims {
            match store.renew(&c.key, &c.token, self.shared.visibility).await {
                Ok(true) => {}
                Ok(false) => {
                    let mut held = self.shared.held.lock();
                    if let Some(u) = held.units.get_mut(&id) {
                        if u.claim.as_ref() == Some(&c) {
                            u.claim = None;
                        }
                    }
                    drop(held);
                    tracing::error!(queue, key = %c.key, store = store.name(), "idempotency claim lost while the handler runs: another worker took it over; this worker's completion will be refused and the new owner completes the message");
                }
                Err(e) => {
                    tracing::warn!(queue, key = %c.key, store = store.name(), error = %e, "idempotency lease renewal failed; retrying at the next beat")
                }
            }
        }
    }
}

#[derive(Default)]
struct Due {
    /// Receipts by the timeout (whole seconds) to set.
    extensions: HashMap<u64, Vec<Receipt>>,
    claims: Vec<(u64, ClaimRef)>,
}

impl Hold {
    /// The message with this receipt is settled: no longer held.
    pub(crate) fn settled(&self, receipt: &str) {
        if let Some(u) = self.shared.held.lock().units.get_mut(&self.id) {
            u.messages.retain(|m| &*m.receipt != receipt);
        }
    }

    /// Renews `claim` from now on (replacing any claim held before).
    pub(crate) fn claimed(&self, claim: ClaimRef) {
        if let Some(u) = self.shared.held.lock().units.get_mut(&self.id) {
            u.claim = Some(claim);
        }
    }

    /// Stops renewing the claim.
    pub(crate) fn unclaimed(&self) {
        if let Some(u) = self.shared.held.lock().units.get_mut(&self.id) {
            u.claim = None;
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.shared.held.lock().units.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(receipt: &str, received_at: Instant) -> ReceivedMessage {
        ReceivedMessage {
            broker_id: receipt.into(),
            receipt: receipt.into(),
            body: "".into(),
            attributes: Vec::new().into(),
            receive_count: 1,
            group_id: None,
            received_at,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn extends_at_half_the_timeout_and_never_past_twelve_hours() {
        let hb = Heartbeat::new(Duration::from_secs(30));
        let start = Instant::now();
        let hold = hb.hold(&[msg("a", start), msg("b", start)]);
        assert!(hb
            .due(start + Duration::from_secs(10))
            .extensions
            .is_empty());
        let due = hb.due(start + Duration::from_secs(15));
        assert_eq!(due.extensions.get(&30).map(Vec::len), Some(2));
        // Marked extended: not due again until another half timeout.
        assert!(hb
            .due(start + Duration::from_secs(20))
            .extensions
            .is_empty());
        hold.settled("a");
        let due = hb.due(start + Duration::from_secs(30));
        assert_eq!(due.extensions.get(&30), Some(&vec![Receipt::from("b")]));
        // Near the 12-hour limit only what is left of it is asked for.
        let late = start + MAX_VISIBILITY - Duration::from_secs(10);
        let due = hb.due(late);
        assert_eq!(due.extensions.get(&10), Some(&vec![Receipt::from("b")]));
        assert!(hb
            .due(start + MAX_VISIBILITY + Duration::from_secs(60))
            .extensions
            .is_empty());
        drop(hold);
        assert_eq!(hb.held_messages(), 0);
    }

    /// A renewal the store refuses (another worker took the claim over) stops the renewals
    /// of that claim; a renewal that succeeds keeps it.
    #[tokio::test]
    async fn a_refused_renewal_is_a_lost_claim_and_is_not_renewed_again() {
        use crate::idempotency::{Claim, IdempotencyStore, MemoryIdempotencyStore};
        let store = MemoryIdempotencyStore::new();
        let lease = Duration::from_secs(30);
        let Ok(Claim::Acquired { token, .. }) = store.claim("mine", "h", lease).await else {
            panic!("claim");
        };
        let hb = Heartbeat::new(lease);
        let kept = hb.hold(&[msg("a", Instant::now())]);
        kept.claimed(ClaimRef::new("mine".into(), token));
        let lost = hb.hold(&[msg("b", Instant::now())]);
        lost.claimed(ClaimRef::new("mine".into(), "someone else's".into()));
        let due = hb.due(Instant::now() + lease);
        assert_eq!(due.claims.len(), 2);
        hb.renew(&store, "q", due.claims).await;
        let due = hb.due(Instant::now() + lease * 2);
        let renewed: Vec<&str> = due.claims.iter().map(|(_, c)| &*c.token).collect();
        assert_eq!(
            renewed.len(),
            1,
            "only the live claim is renewed again: {renewed:?}"
        );
        assert_ne!(renewed[0], "someone else's");
        drop((kept, lost));
    }

    #[tokio::test(start_paused = true)]
    async fn take_all_hands_over_receipts_and_claims() {
        let hb = Heartbeat::new(Duration::from_secs(30));
        let hold = hb.hold(&[msg("a", Instant::now())]);
        hold.claimed(ClaimRef::new("k".into(), "t".into()));
        // The drain takes what is held before it aborts the units (whose holds then drop).
        let left = hb.take_all();
        drop(hold);
        assert_eq!(left.receipts, vec![Receipt::from("a")]);
        assert_eq!(left.claims.len(), 1);
        assert_eq!(hb.held_messages(), 0);
    }
}
