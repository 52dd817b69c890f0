//! The embedded transport's object store: S3's behaviour for the claim check, in process.
//!
//! Objects are kept until they expire ([`MemoryObjects::with_expiry`], default the claim
//! check's 15 days, judged by tokio's clock like the rest of the embedded broker). Nothing
//! deletes them but expiry, or a test through [`MemoryObjects::delete`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::claim_check::{ObjectError, ObjectStore, DEFAULT_EXPIRATION_DAYS};

/// An in-process bucket store. Cheap to clone; clones share the objects.
#[derive(Clone)]
pub struct MemoryObjects {
    inner: Arc<Inner>,
}

struct Inner {
    expiry: Duration,
    objects: Mutex<HashMap<(String, String), Stored>>,
}

struct Stored {
    bytes: Arc<[u8]>,
    at: Instant,
}

impl Default for MemoryObjects {
    fn default() -> Self {
        Self::with_expiry(Duration::from_secs(
            u64::from(DEFAULT_EXPIRATION_DAYS) * 24 * 60 * 60,
        ))
    }
}

impl std::fmt::Debug for MemoryObjects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryObjects")
            .field("expiry", &self.inner.expiry)
            .field("objects", &self.inner.objects.lock().len())
            .finish()
    }
}

impl MemoryObjects {
    /// A store whose objects expire `expiry` after they were last written.
    pub fn with_expiry(expiry: Duration) -> Self {
        MemoryObjects {
            inner: Arc::new(Inner {
                expiry,
                objects: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Deletes an object (as an operator or a lifecycle rule would); true if it existed.
    pub fn delete(&self, bucket: &str, key: &str) -> bool {
        let k = (bucket.to_string(), key.to_string());
        self.inner.objects.lock().remove(&k).is_some()
    }

    /// The keys of the live objects of `bucket`, sorted.
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        let now = Instant::now();
        let mut keys: Vec<String> = self
            .inner
            .objects
            .lock()
            .iter()
            .filter(|((b, _), o)| b == bucket && now < o.at + self.inner.expiry)
            .map(|((_, k), _)| k.clone())
            .collect();
        keys.sort();
        keys
    }
}

#[async_trait]
impl ObjectStore for MemoryObjects {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn put(
        &self,
        bucket: &str,
        key: &str,
        bytes: Vec<u8>,
        _content_type: &str,
    ) -> Result<(), ObjectError> {
        let stored = Stored {
            bytes: bytes.into(),
            at: Instant::now(),
        };
        let k = (bucket.to_string(), key.to_string());
        self.inner.objects.lock().insert(k, stored);
        Ok(())
    }

    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, ObjectError> {
        let k = (bucket.to_string(), key.to_string());
        let mut objects = self.inner.objects.lock();
        let expired = match objects.get(&k) {
            None => return Ok(None),
            Some(o) => Instant::now() >= o.at + self.inner.expiry,
        };
        if expired {
            objects.remove(&k);
            return Ok(None);
        }
        Ok(objects.get(&k).map(|o| o.bytes.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn objects_live_until_their_expiry_or_a_delete() {
        let store = MemoryObjects::with_expiry(Duration::from_secs(60));
        store.put("b", "k", b"abc".to_vec(), "x").await.unwrap();
        store.put("b", "gone", b"1".to_vec(), "x").await.unwrap();
        assert!(store.delete("b", "gone"));
        assert_eq!(store.get("b", "gone").await.unwrap(), None);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(store.get("b", "k").await.unwrap(), Some(b"abc".to_vec()));
        assert_eq!(store.get("other", "k").await.unwrap(), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(store.get("b", "k").await.unwrap(), None);
        assert!(store.keys("b").is_empty());
    }
}
