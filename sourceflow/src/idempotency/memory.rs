//! The in-memory idempotency store: one process, bounded, expired entries swept.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;

use super::{new_token, Claim, IdempotencyStore, Release};
use crate::error::Result;

/// Default number of records kept.
pub const DEFAULT_CAPACITY: usize = 100_000;

enum State {
    InProgress {
        token: String,
        until: Instant,
    },
    Completed {
        until: Instant,
        outbox: Option<String>,
    },
}

struct Entry {
    hash: String,
    state: State,
}

/// Claims in a `HashMap`, for a single process (the default). Holds at most `capacity`
/// records: when full, expired records are swept, then the completed records closest to
/// expiry are dropped (in-progress claims are never dropped).
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

    fn make_room(entries: &mut HashMap<String, Entry>, capacity: usize, now: Instant) {
        if entries.len() < capacity {
            return;
        }
        entries.retain(|_, e| match &e.state {
            State::Completed { until, .. } => *until > now,
            State::InProgress { .. } => true,
        });
        if entries.len() < capacity {
            return;
        }
        // Still full: drop the completed records closest to expiry (a tenth of capacity).
        let mut completed: Vec<(Instant, String)> = entries
            .iter()
            .filter_map(|(k, e)| match &e.state {
                State::Completed { until, .. } => Some((*until, k.clone())),
                State::InProgress { .. } => None,
            })
            .collect();
        completed.sort();
        let drop = (capacity / 10).max(1).min(completed.len());
        tracing::warn!(
            dropped = drop,
            capacity,
            "idempotency store full; dropping the completed records closest to expiry"
        );
        for (_, k) in completed.into_iter().take(drop) {
            entries.remove(&k);
        }
    }
}

#[async_trait]
impl IdempotencyStore for MemoryIdempotencyStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn claim(&self, key: &str, payload_hash: &str, lease: Duration) -> Result<Claim> {
        let now = Instant::now();
        let mut entries = self.entries.lock();
        if let Some(e) = entries.get_mut(key) {
            let expired_completed =
                matches!(e.state, State::Completed { until, .. } if until <= now);
            if !expired_completed {
                if e.hash != payload_hash {
                    return Ok(Claim::Mismatch);
                }
                match &e.state {
                    State::Completed { outbox, .. } => {
                        return Ok(Claim::Completed {
                            undispatched: outbox.clone(),
                        })
                    }
                    State::InProgress { until, .. } if *until > now => {
                        return Ok(Claim::InProgress {
                            lease_left: *until - now,
                        })
                    }
                    State::InProgress { .. } => {} // lease expired: take over below
                }
            }
            let token = new_token();
            *e = Entry {
                hash: payload_hash.to_string(),
                state: State::InProgress {
                    token: token.clone(),
                    until: now + lease,
                },
            };
            return Ok(Claim::Acquired { token, attempt: 1 });
        }
        Self::make_room(&mut entries, self.capacity, now);
        let token = new_token();
        entries.insert(
            key.to_string(),
            Entry {
                hash: payload_hash.to_string(),
                state: State::InProgress {
                    token: token.clone(),
                    until: now + lease,
                },
            },
        );
        Ok(Claim::Acquired { token, attempt: 1 })
    }

    async fn renew(&self, key: &str, token: &str, lease: Duration) -> Result<bool> {
        let mut entries = self.entries.lock();
        match entries.get_mut(key).map(|e| &mut e.state) {
            Some(State::InProgress { token: t, until }) if t == token => {
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
        match entries.get_mut(key) {
            Some(e) if matches!(&e.state, State::InProgress { token: t, .. } if t == token) => {
                e.state = State::Completed {
                    until: Instant::now() + ttl,
                    outbox: outbox.map(str::to_string),
                };
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn set_outbox(&self, key: &str, remaining: Option<&str>) -> Result<()> {
        if let Some(Entry {
            state: State::Completed { outbox, .. },
            ..
        }) = self.entries.lock().get_mut(key)
        {
            *outbox = remaining.map(str::to_string);
        }
        Ok(())
    }

    async fn release(&self, key: &str, token: &str, _why: Release) -> Result<()> {
        let mut entries = self.entries.lock();
        if matches!(entries.get(key).map(|e| &e.state), Some(State::InProgress { token: t, .. }) if t == token)
        {
            entries.remove(key);
        }
        Ok(())
    }

    async fn purge_expired(&self, batch: usize) -> Result<usize> {
        let now = Instant::now();
        let mut entries = self.entries.lock();
        let expired: Vec<String> = entries
            .iter()
            .filter(|(_, e)| matches!(e.state, State::Completed { until, .. } if until <= now))
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
    use crate::idempotency::conformance;

    #[tokio::test]
    async fn conforms() {
        conformance::run(&MemoryIdempotencyStore::new(), "t").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_winner_under_a_race() {
        conformance::race(Arc::new(MemoryIdempotencyStore::new()), "race").await;
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
}
