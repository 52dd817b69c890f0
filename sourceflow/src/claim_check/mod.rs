//! Large messages: the claim check, and compression.
//!
//! SQS takes at most 1 MiB per message and SNS 256 KiB. A message whose envelope would be
//! larger than its destination takes (or than a lower threshold you set) has its payload
//! stored in an [`ObjectStore`] (S3 on AWS, an in-process store on the embedded transport)
//! and travels as a small pointer in the envelope: bucket, key, size, SHA-256 and content
//! encoding. The envelope keeps its id, type and metadata inline, so routing, tracing and
//! idempotency need no fetch. The receiver fetches the object, checks its size and digest,
//! and puts the payload back before anything else (decryption included) sees it.
//!
//! * Encrypted types are sealed first: the store holds the sealed payload only.
//! * Receivers never delete an object (every subscriber of an event reads the same one);
//!   objects expire by the bucket's lifecycle rule, which `create`-mode provisioning sets
//!   ([`ClaimCheck::expiration_days`], longer than any queue's retention).
//! * The key is `{prefix}/{message id}/{sha-256}`: a retried send uploads the same bytes
//!   under the same key, and two different payloads under one pinned id never overwrite
//!   each other.
//! * A missing or corrupted object dead-letters the message with the reason; a store that
//!   cannot be reached is an infrastructure fault (retried, no handler attempt spent).
//!
//! Compression ([`ClaimCheck::compress_above`], or [`Compression`] alone without a bucket):
//! a payload above the size is gzip-compressed, inline as base64 when it then fits, else in
//! the stored object; the envelope says so in `payload_encoding` / the pointer's
//! `encoding`.
//!
//! ```no_run
//! # async fn demo() -> sourceflow::Result<()> {
//! let app = sourceflow::builder()
//!     .service("reports")
//!     .claim_check(sourceflow::ClaimCheck::bucket("acme-sourceflow-claims").compress_above(64 * 1024))
//!     .start()
//!     .await?;
//! # Ok(()) }
//! ```

mod codec;
mod wire;

use std::sync::Arc;

use async_trait::async_trait;

#[cfg(any(test, feature = "testing"))]
pub(crate) use wire::restore;
pub use wire::Pointer;
pub(crate) use wire::{offload, restore_incoming, shrink, RestoreError};

/// Default expiration of stored payloads: longer than SQS's longest retention (14 days),
/// so no message outlives its payload.
pub const DEFAULT_EXPIRATION_DAYS: u32 = 15;

/// Default largest message the claim check takes (its payload stored), in bytes.
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;

/// The content encoding of a payload stored or inline as it is.
pub const ENCODING_IDENTITY: &str = "identity";
/// The content encoding of a gzip-compressed payload.
pub const ENCODING_GZIP: &str = "gzip";

/// Why an object store call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    /// The store could not be reached or did not answer (retry later).
    #[error("object store `{store}` unavailable: {reason}")]
    Unavailable {
        /// The store's name (`s3`, `memory`).
        store: &'static str,
        /// What failed.
        reason: String,
    },
    /// The store refused the call (a missing bucket, no permission): retrying as it is
    /// will not help.
    #[error("object store `{store}` refused {operation} of `{bucket}/{key}`: {reason}")]
    Refused {
        /// The store's name.
        store: &'static str,
        /// `put` or `get`.
        operation: &'static str,
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// What it said.
        reason: String,
    },
}

/// Where large payloads are kept: a bucket of objects by key, written once, read by every
/// receiver, never deleted by sourceflow (expiry is the bucket's job).
///
/// Implementations: S3 (`transport::aws::S3ObjectStore`, feature `aws`) and the embedded
/// transport's in-process [`MemoryObjects`](crate::transport::memory::MemoryObjects).
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Short name for logs and errors (`s3`, `memory`).
    fn name(&self) -> &'static str;

    /// Stores `bytes` under `bucket`/`key`, replacing what is there (a retried put of the
    /// same message writes the same bytes).
    async fn put(
        &self,
        bucket: &str,
        key: &str,
        bytes: Vec<u8>,
        content_type: &str,
    ) -> Result<(), ObjectError>;

    /// The object's bytes; `Ok(None)` when it does not exist (never stored, expired, or
    /// deleted by someone else).
    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, ObjectError>;
}

/// The claim check's settings: the bucket is required, the rest has defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimCheck {
    pub(crate) bucket: String,
    pub(crate) prefix: Option<String>,
    pub(crate) threshold: Option<usize>,
    pub(crate) max_bytes: usize,
    pub(crate) expiration_days: u32,
    pub(crate) compress_above: Option<usize>,
}

impl ClaimCheck {
    /// Large payloads go to `bucket` (created with its lifecycle rule in `create` mode).
    pub fn bucket(bucket: impl Into<String>) -> Self {
        ClaimCheck {
            bucket: bucket.into(),
            prefix: None,
            threshold: None,
            max_bytes: DEFAULT_MAX_BYTES,
            expiration_days: DEFAULT_EXPIRATION_DAYS,
            compress_above: None,
        }
    }

    /// Keys start with `prefix/` (default: the resource prefix followed by `-claims`, or
    /// `claims`); the IAM policy grants exactly this prefix.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into().trim_matches('/').to_string());
        self
    }

    /// Stores the payload of any message whose envelope is larger than `bytes` (default:
    /// only what the destination would refuse, 1 MiB for SQS, 256 KiB for SNS).
    pub fn threshold(mut self, bytes: usize) -> Self {
        self.threshold = Some(bytes);
        self
    }

    /// Refuses messages larger than `bytes` at the call (default 64 MiB).
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// Stored payloads expire after `days` (default 15, more than SQS's longest retention).
    pub fn expiration_days(mut self, days: u32) -> Self {
        self.expiration_days = days;
        self
    }

    /// Compresses (gzip) payloads larger than `bytes` before anything else, so that many
    /// large messages stay inline.
    pub fn compress_above(mut self, bytes: usize) -> Self {
        self.compress_above = Some(bytes);
        self
    }

    /// The bucket.
    pub fn bucket_name(&self) -> &str {
        &self.bucket
    }

    /// The days after which stored payloads expire.
    pub fn expiration(&self) -> u32 {
        self.expiration_days
    }
}

/// What a dispatcher sends large messages with: the settings, resolved, and the store.
#[derive(Clone)]
pub(crate) struct Settings {
    /// The bucket and the key prefix; `None`: compression only, nothing is stored.
    pub(crate) target: Option<Target>,
    /// Compress payloads above this many bytes.
    pub(crate) compress_above: Option<usize>,
}

/// Where payloads are stored.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) bucket: String,
    pub(crate) prefix: String,
    pub(crate) threshold: Option<usize>,
    pub(crate) max_bytes: usize,
    /// How long the bucket keeps a stored payload (its lifecycle rule).
    pub(crate) expiration_days: u32,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("claim_check::Settings")
            .field("bucket", &self.target.as_ref().map(|t| &t.bucket))
            .field("compress_above", &self.compress_above)
            .finish()
    }
}

impl Settings {
    /// Refuses a delay past the stored payload's expiry: the object would be gone when the
    /// message is due. Only a message that will be stored (over `limit`'s threshold) is
    /// concerned.
    pub(crate) fn check_delay(
        &self,
        message: &crate::envelope::OutgoingMessage,
        limit: usize,
    ) -> Result<(), String> {
        let (Some(t), Some(threshold), Some(delay)) =
            (self.target.as_ref(), self.threshold(limit), message.delay)
        else {
            return Ok(());
        };
        let keeps = std::time::Duration::from_secs(u64::from(t.expiration_days) * 86_400);
        if message.size() <= threshold || delay < keeps {
            return Ok(());
        }
        Err(format!(
            "{}: a delay of {} s is longer than the claim check keeps its stored payload ({} days, `ClaimCheck::expiration_days`): the object would expire before the message is due",
            message.wire_name,
            delay.as_secs(),
            t.expiration_days
        ))
    }

    /// The size above which a message to a destination of `limit` bytes is stored.
    pub(crate) fn threshold(&self, limit: usize) -> Option<usize> {
        let t = self.target.as_ref()?;
        Some(t.threshold.map_or(limit, |t| t.min(limit)))
    }

    /// The largest message accepted at the call, for a destination of `limit` bytes.
    pub(crate) fn max_bytes(&self, limit: usize) -> usize {
        self.target
            .as_ref()
            .map_or(limit, |t| t.max_bytes.max(limit))
    }
}

/// Inline compression alone, without a bucket (payloads above `bytes` are gzip-compressed;
/// what is still too large is refused as without it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compression {
    pub(crate) above: usize,
}

impl Compression {
    /// Compresses payloads larger than `bytes`.
    pub fn above(bytes: usize) -> Self {
        Compression { above: bytes }
    }
}
