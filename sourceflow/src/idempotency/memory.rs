//! The in-memory idempotency store: one process, bounded, expired entries swept.

// foldhash (hashbrown's default hasher, already in the tree): the store hashes a key two or
// three times per message, and SipHash showed in the profile.
use foldhash::{HashMap, HashMapExt};
use std::time::Duration;

// tokio's clock: leases and expiry follow a paused test clock (`sourceflow::testing`), as the
// embedded broker's visibility timeouts do.
use tokio::time::Instant;

use async_trait::async_trait;
use parking_lot::Mutex;

use super::{Claim, IdempotencyStore, PayloadHash, Release, ABANDONED_AFTER};
use crate::error::Result;

/// Default number of records kept.
pub const DEFAULT_CAPACITY: usize = 100_000;

enum State {
    /// Claimed until `until` by the holder of `token`; released (claimable at once) when
    /// `token` is `None`, `until` being then the time of the release. The token is kept
    /// as its 16 bytes, not as its text (no copy of the text per claim).
    InProgress {
        token: Option<uuid::Uuid>,
        until: Instant,
    },
    Completed {
        until: Instant,
        /// Boxed: rare in this store (its listener stores only what a dispatch left).
        outbox: Option<Box<Stored>>,
    },
}

/// A completed record's outbox: the messages still to go, and until when the worker that
/// completed the claim may still be sending them (see [`IdempotencyStore::complete`]).
struct Stored {
    json: String,
    sending_until: Option<Instant>,
}

impl State {
    /// Past expiry (completed), or abandoned (in progress, its lease over for more than
    /// [`ABANDONED_AFTER`]).
    fn purgeable(&self, now: Instant) -> bool {
        match self {
            State::Completed { until, .. } => *until <= now,
            State::InProgress { until, .. } => {
                now.saturating_duration_since(*until) > ABANDONED_AFTER
            }
        }
    }
}

/// Whether `text` is the token `id`: exactly its text as [`Claim::Acquired`] gave it
/// (written on the stack to compare).
fn is_token(id: &uuid::Uuid, text: &str) -> bool {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    id.hyphenated().encode_lower(&mut buf) == text
}

impl State {
    /// The end of the lease, when the holder of `token` holds this claim.
    fn lease_held_by(&self, token: &str) -> Option<Instant> {
        match self {
            State::InProgress {
                token: Some(t),
                until,
            } if is_token(t, token) => Some(*until),
            _ => None,
        }
    }

    fn held_by(&self, token: &str) -> bool {
        self.lease_held_by(token).is_some()
    }
}

/// A payload hash as kept: inline when it is the SHA-256 hex the listener computes.
enum Hash {
    Sha256(PayloadHash),
    Other(Box<str>),
}

impl Hash {
    fn new(text: &str) -> Self {
        PayloadHash::parse(text).map_or_else(|| Hash::Other(text.into()), Hash::Sha256)
    }

    fn is(&self, text: &str) -> bool {
        match self {
            Hash::Sha256(h) => h.as_str() == text,
            Hash::Other(h) => &**h == text,
        }
    }
}

struct Entry {
    hash: Hash,
    /// Handler attempts recorded: failed releases and claims taken over from dead workers.
    attempts: u32,
    state: State,
}

/// Claims in a `HashMap`, for a single process (the default). Holds at most `capacity`
/// records: when full, expired completions and abandoned claims are swept, then the
/// completed records closest to expiry are dropped (live claims are never dropped).
pub struct MemoryIdempotencyStore {
    entries: Mutex<HashMap<String, Entry>>,
    capacity: usize,
}

impl Default for MemoryIdempotencyStore {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl std::fmt::Debug for MemoryIdempotencyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryIdempotencyStore")
            .field("len", &self.entries.lock().len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl MemoryIdempotencyStore {
    /// A store with the default capacity (100,000 records).
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding at most `capacity` records.
    pub fn with_capacity(capacity: usize) -> Self {
        MemoryIdempotencyStore {
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// What a claim of a key that has record `e` gets: the handler attempts recorded so far
    /// when the claim is taken (`Ok`), else the answer (`Err`).
    fn reclaim(e: &Entry, payload_hash: &str, now: Instant) -> std::result::Result<u32, Claim> {
        match e {
            // Expired: the key starts again, whatever payload it had.
            Entry {
                state: State::Completed { until, .. },
                ..
            } if *until <= now => Ok(0),
            e if !e.hash.is(payload_hash) => Err(Claim::Mismatch),
            Entry {
                state: State::Completed { outbox, .. },
                ..
            } => Err(match outbox.as_deref() {
                // Its worker is still sending them: wait rather than send them twice.
                Some(Stored {
                    sending_until: Some(until),
                    ..
                }) if *until > now => Claim::InProgress {
                    lease_left: *until - now,
                },
                o => Claim::Completed {
                    undispatched: o.map(|o| o.json.clone()),
                },
            }),
            Entry {
                state:
                    State::InProgress {
                        token: Some(_),
                        until,
                    },
                ..
            } if *until > now => Err(Claim::InProgress {
                lease_left: *until - now,
            }),
            // Its worker reached the handlers and died holding the claim: that counts.
            Entry {
                state: State::InProgress { token: Some(_), .. },
                attempts,
                ..
            } => Ok(attempts.saturating_add(1)),
            // Released: the release settled the count.
            Entry {
                state: State::InProgress { token: None, .. },
                attempts,
                ..
            } => Ok(*attempts),
        }
    }

    fn make_room(entries: &mut HashMap<String, Entry>, capacity: usize, now: Instant) {
        if entries.len() < capacity {
            return;
        }
        entries.retain(|_, e| !e.state.purgeable(now));
        if entries.len() < capacity {
            return;
        }
        // Still full: drop the completed records closest to expiry (a tenth of capacity).
        // Selected by their expiry alone (no key copied, nothing sorted): this runs once per
        // tenth of capacity at a steady load above it, inside the claim's lock.
        let mut untils: Vec<Instant> = entries
            .values()
            .filter_map(|e| match e.state {
                State::Completed { until, .. } => Some(until),
                State::InProgress { .. } => None,
            })
            .collect();
        let drop = (capacity / 10).max(1).min(untils.len());
        if drop == 0 {
            return;
        }
        let (below, cut, _) = untils.select_nth_unstable(drop - 1);
        let cut = *cut;
        // Everything before the cut goes, and as many records at the cut as make `drop`.
        let mut ties = drop - below.iter().filter(|u| **u < cut).count();
        tracing::warn!(
            dropped = drop,
            capacity,
            "idempotency store full; dropping the completed records closest to expiry"
        );
        entries.retain(|_, e| match e.state {
            State::Completed { until, .. } if until < cut => false,
            State::Completed { until, .. } if until == cut && ties > 0 => {
                ties -= 1;
                false
            }
            _ => true,
        });
    }
}

#[async_trait]
impl IdempotencyStore for MemoryIdempotencyStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn claim(&self, key: &str, payload_hash: &str, lease: Duration) -> Result<Claim> {
        use std::collections::hash_map::Entry as Slot;
        let now = Instant::now();
        // Made before the lock, which both workers take (an allocation inside it makes the
        // other one spin); wasted only when the claim is not acquired.
        let id = uuid::Uuid::new_v4();
        let token = crate::envelope::uuid_text(id);
        let owned_key = key.to_string();
        let claimed = |attempts| Entry {
            hash: Hash::new(payload_hash),
            attempts,
            state: State::InProgress {
                token: Some(id),
                until: now + lease,
            },
        };
        let mut entries = self.entries.lock();
        if entries.len() >= self.capacity && !entries.contains_key(key) {
            Self::make_room(&mut entries, self.capacity, now);
        }
        // One lookup: the key is hashed and found once, whatever the claim finds.
        let attempts = match entries.entry(owned_key) {
            Slot::Vacant(slot) => {
                slot.insert(claimed(0));
                0
            }
            Slot::Occupied(mut slot) => {
                let attempts = match Self::reclaim(slot.get(), payload_hash, now) {
                    Ok(attempts) => attempts,
                    Err(claim) => return Ok(claim),
                };
                slot.insert(claimed(attempts));
                attempts
            }
        };
        Ok(Claim::Acquired {
            token,
            attempt: attempts.saturating_add(1),
        })
    }

    async fn renew(&self, key: &str, token: &str, lease: Duration) -> Result<bool> {
        let mut entries = self.entries.lock();
        match entries.get_mut(key).map(|e| &mut e.state) {
            Some(State::InProgress {
                token: Some(t),
                until,
            }) if is_token(t, token) => {
                *until = Instant::now() + lease;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn complete(
        &self,
        key: &str,
        token: &str,
        ttl: Duration,
        outbox: Option<&str>,
    ) -> Result<bool> {
        let mut entries = self.entries.lock();
        let Some((e, lease)) = entries
            .get_mut(key)
            .and_then(|e| e.state.lease_held_by(token).map(|lease| (e, lease)))
        else {
            return Ok(false);
        };
        // The claim's lease stays on as the dispatch lease `set_outbox` ends.
        let outbox = outbox.map(|json| {
            Box::new(Stored {
                json: json.to_string(),
                sending_until: Some(lease),
            })
        });
        e.state = State::Completed {
            until: Instant::now() + ttl,
            outbox,
        };
        Ok(true)
    }

    async fn set_outbox(&self, key: &str, remaining: Option<&str>) -> Result<()> {
        // Only an outbox still there is replaced: once a worker cleared it, a slower one
        // that dispatched part of it does not bring it back. Either way the dispatch ended.
        if let Some(Entry {
            state:
                State::Completed {
                    outbox: outbox @ Some(_),
                    ..
                },
            ..
        }) = self.entries.lock().get_mut(key)
        {
            *outbox = remaining.map(|json| {
                Box::new(Stored {
                    json: json.to_string(),
                    sending_until: None,
                })
            });
        }
        Ok(())
    }

    async fn release(&self, key: &str, token: &str, why: Release) -> Result<()> {
        let mut entries = self.entries.lock();
        let Some(e) = entries.get_mut(key).filter(|e| e.state.held_by(token)) else {
            return Ok(());
        };
        match why {
            Release::DeadLettered => {
                entries.remove(key);
            }
            Release::Failed | Release::Returned => {
                if why == Release::Failed {
                    e.attempts = e.attempts.saturating_add(1);
                }
                e.state = State::InProgress {
                    token: None,
                    until: Instant::now(),
                };
            }
        }
        Ok(())
    }

    async fn purge_expired(&self, batch: usize) -> Result<usize> {
        let now = Instant::now();
        let mut entries = self.entries.lock();
        let expired: Vec<String> = entries
            .iter()
            .filter(|(_, e)| e.state.purgeable(now))
            .map(|(k, _)| k.clone())
            .take(batch)
            .collect();
        for k in &expired {
            entries.remove(k);
        }
        Ok(expired.len())
    }

    async fn size(&self) -> Result<u64> {
        Ok(self.entries.lock().len() as u64)
    }

    fn durable(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::idempotency::conformance::{self, Backdate};

    /// The token is kept as bytes, but only its exact text holds the claim.
    #[tokio::test]
    async fn only_the_exact_token_text_holds_the_claim() {
        let store = MemoryIdempotencyStore::new();
        let lease = Duration::from_secs(30);
        let Ok(Claim::Acquired { token, .. }) = store.claim("k", "h", lease).await else {
            panic!("claim");
        };
        let other_forms = [
            token.to_uppercase(),
            token.replace('-', ""),
            format!("{{{token}}}"),
        ];
        for other in &other_forms {
            assert!(!store.renew("k", other, lease).await.unwrap(), "{other}");
        }
        assert!(store.renew("k", &token, lease).await.unwrap());
        assert!(store.complete("k", &token, lease, None).await.unwrap());
    }

    /// Old records for the conformance suite, without waiting for them to age.
    #[async_trait]
    impl Backdate for MemoryIdempotencyStore {
        async fn lease_ran_out(&self, key: &str, ago: Duration) {
            let mut entries = self.entries.lock();
            let Some(Entry {
                state: State::InProgress { until, .. },
                ..
            }) = entries.get_mut(key)
            else {
                panic!("{key} is not in progress");
            };
            *until = Instant::now()
                .checked_sub(ago)
                .expect("the monotonic clock reaches back that far");
        }
    }

    #[tokio::test]
    async fn conforms() {
        let store = MemoryIdempotencyStore::new();
        conformance::run(&store, "t", &store).await;
    }

    #[tokio::test]
    async fn a_full_store_sweeps_abandoned_claims_but_keeps_live_ones() {
        let s = MemoryIdempotencyStore::with_capacity(3);
        let lease = Duration::from_secs(30);
        for key in ["abandoned", "young", "live"] {
            assert!(matches!(
                s.claim(key, "h", lease).await.unwrap(),
                Claim::Acquired { attempt: 1, .. }
            ));
        }
        s.lease_ran_out("abandoned", ABANDONED_AFTER + Duration::from_secs(60))
            .await;
        s.lease_ran_out("young", ABANDONED_AFTER - Duration::from_secs(60))
            .await;
        assert!(matches!(
            s.claim("new", "h", lease).await.unwrap(),
            Claim::Acquired { attempt: 1, .. }
        ));
        assert_eq!(s.size().await.unwrap(), 3, "the abandoned claim made room");
        assert!(matches!(
            s.claim("live", "h", lease).await.unwrap(),
            Claim::InProgress { .. }
        ));
        assert!(
            matches!(
                s.claim("young", "h", lease).await.unwrap(),
                Claim::Acquired { attempt: 2, .. }
            ),
            "the young abandoned claim stayed, and its takeover counts"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_winner_under_a_race() {
        conformance::race(Arc::new(MemoryIdempotencyStore::new()), "race").await;
    }

    /// Leases run on tokio's clock: under a paused test clock a claim whose worker stopped
    /// renewing it is taken over once the clock passes its lease, with no real wait.
    #[tokio::test(start_paused = true)]
    async fn a_lease_runs_out_on_a_paused_clock() {
        let s = MemoryIdempotencyStore::new();
        let lease = Duration::from_secs(30);
        assert!(matches!(
            s.claim("k", "h", lease).await.unwrap(),
            Claim::Acquired { attempt: 1, .. }
        ));
        assert!(matches!(
            s.claim("k", "h", lease).await.unwrap(),
            Claim::InProgress { .. }
        ));
        tokio::time::advance(lease + Duration::from_secs(1)).await;
        assert!(
            matches!(
                s.claim("k", "h", lease).await.unwrap(),
                Claim::Acquired { attempt: 2, .. }
            ),
            "taken over once the paused clock passed the lease"
        );
    }

    #[tokio::test]
    async fn a_sha256_hash_kept_inline_still_tells_payloads_apart() {
        use crate::idempotency::payload_hash;
        let s = MemoryIdempotencyStore::new();
        let lease = Duration::from_secs(30);
        let (a, b) = (payload_hash(r#"{"n":1}"#), payload_hash(r#"{"n":2}"#));
        assert!(matches!(Hash::new(&a), Hash::Sha256(_)));
        assert!(matches!(Hash::new("H"), Hash::Other(_)));
        assert!(matches!(
            s.claim("k", &a, lease).await.unwrap(),
            Claim::Acquired { .. }
        ));
        assert!(matches!(
            s.claim("k", &b, lease).await.unwrap(),
            Claim::Mismatch
        ));
        assert!(matches!(
            s.claim("k", &a, lease).await.unwrap(),
            Claim::InProgress { .. }
        ));
        let upper = a.to_uppercase();
        assert!(matches!(
            s.claim("k", &upper, lease).await.unwrap(),
            Claim::Mismatch
        ));
    }

    #[tokio::test]
    async fn bounded() {
        let s = MemoryIdempotencyStore::with_capacity(10);
        for i in 0..25 {
            let key = format!("k{i}");
            if let Claim::Acquired { token, .. } =
                s.claim(&key, "h", Duration::from_secs(5)).await.unwrap()
            {
                s.complete(&key, &token, Duration::from_secs(60), None)
                    .await
                    .unwrap();
            }
        }
        assert!(s.size().await.unwrap() <= 10);
    }

    #[tokio::test]
    async fn a_full_store_drops_the_completed_records_closest_to_expiry() {
        let s = MemoryIdempotencyStore::with_capacity(20);
        let lease = Duration::from_secs(30);
        // Twenty completed records whose expiries are not in the order they were written.
        for i in 0..20u64 {
            let minutes = (i * 7) % 20 + 1;
            let key = format!("k{minutes}");
            let Claim::Acquired { token, .. } = s.claim(&key, "h", lease).await.unwrap() else {
                panic!("{key} not acquired");
            };
            let ttl = Duration::from_secs(60 * minutes);
            assert!(s.complete(&key, &token, ttl, None).await.unwrap());
        }
        assert!(matches!(
            s.claim("new", "h", lease).await.unwrap(),
            Claim::Acquired { .. }
        ));
        // A tenth of capacity went: the two closest to expiry, and nothing else.
        assert_eq!(s.size().await.unwrap(), 19);
        // Kept ones first: a claim of a dropped key takes a record of its own.
        for minutes in (1..=20u64).rev() {
            let claim = s.claim(&format!("k{minutes}"), "h", lease).await.unwrap();
            let kept = matches!(claim, Claim::Completed { .. });
            assert_eq!(kept, minutes > 2, "k{minutes}: {claim:?}");
        }
    }
}
