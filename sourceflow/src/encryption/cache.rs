//! Data-key caches: the sender reuses a data key within limits, the receiver remembers
//! decrypted keys by their encrypted bytes. Both are bounded and single-flight: concurrent
//! misses for one context make one call to the key provider.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::{DataKey, EncryptionContext, PlainKey};
use crate::error::Result;

/// Limits of the data-key caches, after the AWS Encryption SDK's caching limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// Longest a data key is used (sender) or remembered (receiver).
    pub max_age: Duration,
    /// Most messages encrypted under one data key.
    pub max_messages: u64,
    /// Most plaintext bytes encrypted under one data key.
    pub max_bytes: u64,
    /// Most keys held by each cache.
    pub max_entries: usize,
}

impl Default for CacheLimits {
    /// 5 minutes, 100,000 messages, 1 GiB, 1,000 keys.
    fn default() -> Self {
        CacheLimits {
            max_age: super::DEFAULT_KEY_MAX_AGE,
            max_messages: 100_000,
            max_bytes: 1 << 30,
            max_entries: 1_000,
        }
    }
}

impl CacheLimits {
    /// No caching: one data key per message, one decrypt call per message.
    pub fn disabled() -> Self {
        CacheLimits {
            max_age: Duration::ZERO,
            max_messages: 0,
            max_bytes: 0,
            max_entries: 0,
        }
    }

    fn enabled(&self) -> bool {
        self.max_entries > 0 && self.max_messages > 0 && !self.max_age.is_zero()
    }
}

fn context_key(c: &EncryptionContext) -> String {
    let mut s = String::new();
    for (k, v) in c {
        s.push_str(k);
        s.push('=');
        s.push_str(v);
        s.push('\n');
    }
    s
}

/// Drops the oldest entry when inserting `id` would exceed `max` entries.
fn make_room<K: Clone + Eq + std::hash::Hash, V>(
    entries: &mut HashMap<K, V>,
    id: &K,
    max: usize,
    created: impl Fn(&V) -> Instant,
) {
    if entries.len() < max || entries.contains_key(id) {
        return;
    }
    if let Some(oldest) = entries
        .iter()
        .min_by_key(|(_, e)| created(e))
        .map(|(k, _)| k.clone())
    {
        entries.remove(&oldest);
    }
}

struct SenderEntry {
    key: Arc<DataKey>,
    created: Instant,
    messages: u64,
    bytes: u64,
}

pub(crate) struct SenderCache {
    limits: CacheLimits,
    entries: Mutex<HashMap<String, SenderEntry>>,
}

impl SenderCache {
    pub(crate) fn new(limits: CacheLimits) -> Self {
        SenderCache {
            limits,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// A data key for encrypting `bytes` more under `context`: the cached one while it is
    /// within the limits, else a new one from `generate`.
    pub(crate) async fn key_for<F, Fut>(
        &self,
        context: &EncryptionContext,
        bytes: usize,
        generate: F,
    ) -> Result<Arc<DataKey>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<DataKey>>,
    {
        if !self.limits.enabled() {
            return Ok(Arc::new(generate().await?));
        }
        let l = self.limits;
        let id = context_key(context);
        let mut entries = self.entries.lock().await;
        if let Some(e) = entries.get_mut(&id) {
            let fits = e.created.elapsed() < l.max_age
                && e.messages < l.max_messages
                && e.bytes + bytes as u64 <= l.max_bytes;
            if fits {
                e.messages += 1;
                e.bytes += bytes as u64;
                return Ok(e.key.clone());
            }
        }
        let key = Arc::new(generate().await?);
        make_room(&mut entries, &id, l.max_entries, |e| e.created);
        entries.insert(
            id,
            SenderEntry {
                key: key.clone(),
                created: Instant::now(),
                messages: 1,
                bytes: bytes as u64,
            },
        );
        Ok(key)
    }
}

struct ReceiverEntry {
    key: Arc<PlainKey>,
    created: Instant,
}

pub(crate) struct ReceiverCache {
    limits: CacheLimits,
    entries: Mutex<HashMap<(Vec<u8>, String), ReceiverEntry>>,
}

impl ReceiverCache {
    pub(crate) fn new(limits: CacheLimits) -> Self {
        ReceiverCache {
            limits,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The plaintext of an encrypted data key for `context`: remembered, or from `decrypt`.
    pub(crate) async fn key_for<F, Fut>(
        &self,
        encrypted: &[u8],
        context: &EncryptionContext,
        decrypt: F,
    ) -> Result<Arc<PlainKey>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<PlainKey>>,
    {
        if !self.limits.enabled() {
            return Ok(Arc::new(decrypt().await?));
        }
        let id = (encrypted.to_vec(), context_key(context));
        let mut entries = self.entries.lock().await;
        if let Some(e) = entries.get(&id) {
            if e.created.elapsed() < self.limits.max_age {
                return Ok(e.key.clone());
            }
        }
        let key = Arc::new(decrypt().await?);
        make_room(&mut entries, &id, self.limits.max_entries, |e| e.created);
        entries.insert(
            id,
            ReceiverEntry {
                key: key.clone(),
                created: Instant::now(),
            },
        );
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use zeroize::Zeroizing;

    fn key(n: u8) -> DataKey {
        DataKey {
            plaintext: Zeroizing::new([n; 32]),
            encrypted: vec![n],
            key_id: "k".into(),
        }
    }

    #[tokio::test]
    async fn sender_reuses_within_limits() {
        let calls = AtomicU32::new(0);
        let cache = SenderCache::new(CacheLimits {
            max_messages: 3,
            ..CacheLimits::default()
        });
        let ctx = super::super::context("t", "q");
        for _ in 0..7 {
            cache
                .key_for(&ctx, 10, || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok(key(1))
                })
                .await
                .unwrap();
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "a new key every 3 messages"
        );
        let off = SenderCache::new(CacheLimits::disabled());
        for _ in 0..4 {
            off.key_for(&ctx, 10, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok(key(1))
            })
            .await
            .unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 7);
    }

    #[tokio::test]
    async fn receiver_is_bounded() {
        let cache = ReceiverCache::new(CacheLimits {
            max_entries: 2,
            ..CacheLimits::default()
        });
        let ctx = super::super::context("t", "q");
        for n in 0..5u8 {
            cache
                .key_for(&[n], &ctx, || async move { Ok(Zeroizing::new([n; 32])) })
                .await
                .unwrap();
        }
        assert_eq!(cache.entries.lock().await.len(), 2);
    }
}
