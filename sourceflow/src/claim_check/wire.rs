//! The envelope's large-payload forms: compressed inline (`payload_encoding`), and stored
//! with a pointer in its place (`claim_check`).
//!
//! ```json
//! {"v":1,"type":"reports.Upload.v1","id":"5f0c…",…,"payload":null,
//!  "claim_check":{"bucket":"acme-claims","key":"claims/5f0c…/9b1d…","size":2097152,
//!                 "sha256":"9b1d…","encoding":"identity"}}
//! ```

use std::sync::Arc;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::codec::{gunzip, gzip, sha256_hex};
use super::{ObjectError, Target, ENCODING_GZIP, ENCODING_IDENTITY};
#[cfg(any(test, feature = "testing"))]
use crate::envelope::Envelope;
use crate::envelope::{Incoming, OutgoingMessage};
use crate::error::EntryError;

/// Where a stored payload is, and how to check and read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pointer {
    /// The bucket.
    pub bucket: String,
    /// The object's key (`{prefix}/{message id}/{sha256}`).
    pub key: String,
    /// The object's size in bytes.
    pub size: u64,
    /// The object's SHA-256, lowercase hex.
    pub sha256: String,
    /// How the object encodes the payload JSON: `identity` or `gzip`.
    pub encoding: String,
}

/// The envelope with every field kept as it is and the payload apart.
#[derive(Deserialize, Serialize)]
struct Parts<'a> {
    #[serde(borrow)]
    v: &'a RawValue,
    #[serde(rename = "type", borrow)]
    wire_name: &'a RawValue,
    #[serde(borrow)]
    id: &'a RawValue,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    entity_id: Option<&'a RawValue>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    correlation_id: Option<&'a RawValue>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    causation_id: Option<&'a RawValue>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    seq: Option<&'a RawValue>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    ts: Option<&'a RawValue>,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    payload_encoding: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    claim_check: Option<Pointer>,
}

fn parts(body: &str) -> Result<Parts<'_>, String> {
    serde_json::from_str(body).map_err(|e| format!("the envelope cannot be rewritten: {e}"))
}

fn body_of(parts: &Parts<'_>) -> Result<Arc<str>, String> {
    serde_json::to_string(parts)
        .map(Arc::from)
        .map_err(|e| format!("the envelope cannot be rewritten: {e}"))
}

/// The body with its payload gzip-compressed inline (base64 in a JSON string), when the
/// payload is larger than `above` and compressing makes it smaller; else `None`.
pub(crate) fn shrink(body: &str, above: usize) -> Result<Option<Arc<str>>, String> {
    let mut p = parts(body)?;
    let raw = p.payload.get();
    if raw.len() <= above || p.payload_encoding.is_some() || p.claim_check.is_some() {
        return Ok(None);
    }
    let packed = base64::engine::general_purpose::STANDARD.encode(gzip(raw.as_bytes()));
    if packed.len() + 2 >= raw.len() {
        return Ok(None);
    }
    let packed = serde_json::value::to_raw_value(&packed).map_err(|e| e.to_string())?;
    p.payload = &packed;
    p.payload_encoding = Some(ENCODING_GZIP.to_string());
    body_of(&p).map(Some)
}

/// Stores the payload of `message` in the target's bucket and returns the message with a
/// pointer in its place. The same message (same id, same bytes) always goes to the same
/// key, so a retried send writes the same object again.
pub(crate) async fn offload(
    target: &Target,
    message: &OutgoingMessage,
) -> Result<OutgoingMessage, EntryError> {
    let refused = |reason: String| EntryError::Refused(format!("{}: {reason}", message.wire_name));
    let mut p = parts(&message.body).map_err(refused)?;
    let (bytes, encoding) = stored_bytes(&p).map_err(refused)?;
    let sha256 = sha256_hex(&bytes);
    let key = format!("{}/{}/{sha256}", target.prefix, message.message_id);
    let pointer = Pointer {
        bucket: target.bucket.clone(),
        key,
        size: bytes.len() as u64,
        sha256,
        encoding: encoding.to_string(),
    };
    let content_type = match encoding {
        ENCODING_GZIP => "application/gzip",
        _ => crate::envelope::CONTENT_TYPE_JSON,
    };
    target
        .store
        .put(&pointer.bucket, &pointer.key, bytes, content_type)
        .await
        .map_err(|e| match e {
            ObjectError::Unavailable { .. } => EntryError::Transient(e.to_string()),
            ObjectError::Refused { .. } => EntryError::Refused(e.to_string()),
        })?;
    p.payload = null();
    p.payload_encoding = None;
    p.claim_check = Some(pointer);
    Ok(OutgoingMessage {
        body: body_of(&p).map_err(refused)?,
        ..message.clone()
    })
}

/// The bytes to store for a payload, and their encoding: a compressed inline payload is
/// stored compressed (not as base64).
fn stored_bytes(p: &Parts<'_>) -> Result<(Vec<u8>, &'static str), String> {
    match p.payload_encoding.as_deref() {
        None => Ok((p.payload.get().as_bytes().to_vec(), ENCODING_IDENTITY)),
        Some(ENCODING_GZIP) => Ok((unbase64(p.payload.get())?, ENCODING_GZIP)),
        Some(other) => Err(format!("unknown payload encoding `{other}`")),
    }
}

fn null() -> &'static RawValue {
    static NULL: std::sync::OnceLock<Box<RawValue>> = std::sync::OnceLock::new();
    NULL.get_or_init(|| RawValue::from_string("null".into()).unwrap_or_default())
}

/// The bytes of a compressed payload: `payload` is its JSON text (a base64 string).
fn unbase64(payload: &str) -> Result<Vec<u8>, String> {
    let text: String = serde_json::from_str(payload)
        .map_err(|_| "a compressed payload must be a base64 string".to_string())?;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("the compressed payload is not base64: {e}"))
}

/// Why a received message's payload could not be put back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RestoreError {
    /// The stored object does not exist (expired, deleted, never stored).
    #[error("the stored payload `{bucket}/{key}` does not exist (expired or deleted)")]
    Missing { bucket: String, key: String },
    /// The object, or an inline compressed payload, is not what the envelope says.
    #[error("the payload is corrupted: {0}")]
    Corrupt(String),
    /// The object store cannot be reached now.
    #[error("{0}")]
    Unavailable(String),
    /// The transport has no object store to read from.
    #[error("the message's payload is stored in `{0}`, but this transport has no object store")]
    NoStore(String),
}

/// Puts the payload of a received envelope back: fetched and checked when it was stored,
/// decompressed when it travels compressed. An envelope in neither form is left as it is.
#[cfg(any(test, feature = "testing"))]
pub(crate) async fn restore(
    store: Option<&dyn super::ObjectStore>,
    env: &mut Envelope,
) -> Result<(), RestoreError> {
    let (pointer, encoding) = (env.claim_check.take(), env.payload_encoding.take());
    if let Some(payload) = restored(store, pointer, encoding, env.payload.get()).await? {
        env.payload = payload;
    }
    Ok(())
}

/// [`restore`] for the listener's [`Incoming`] envelope.
pub(crate) async fn restore_incoming(
    store: Option<&dyn super::ObjectStore>,
    env: &mut Incoming,
) -> Result<(), RestoreError> {
    let (pointer, encoding) = (env.claim_check.take(), env.payload_encoding.take());
    if let Some(payload) = restored(store, pointer, encoding, env.payload()).await? {
        env.set_payload(payload);
    }
    Ok(())
}

/// The payload a stored or compressed envelope stands for (`None`: in neither form);
/// `payload` is the envelope's payload as it travelled (JSON text).
async fn restored(
    store: Option<&dyn super::ObjectStore>,
    pointer: Option<Pointer>,
    encoding: Option<String>,
    payload: &str,
) -> Result<Option<Box<RawValue>>, RestoreError> {
    if let Some(pointer) = pointer {
        let store = store.ok_or_else(|| RestoreError::NoStore(pointer.bucket.clone()))?;
        let bytes = fetch(store, &pointer).await?;
        let json = decoded(&bytes, &pointer.encoding)?;
        return raw_json(json).map(Some);
    }
    if let Some(encoding) = encoding {
        let bytes = unbase64(payload).map_err(RestoreError::Corrupt)?;
        let json = decoded(&bytes, &encoding)?;
        return raw_json(json).map(Some);
    }
    Ok(None)
}

/// The object a pointer names, checked against its size and digest.
async fn fetch(store: &dyn super::ObjectStore, p: &Pointer) -> Result<Vec<u8>, RestoreError> {
    let bytes = store
        .get(&p.bucket, &p.key)
        .await
        .map_err(|e| RestoreError::Unavailable(e.to_string()))?
        .ok_or_else(|| RestoreError::Missing {
            bucket: p.bucket.clone(),
            key: p.key.clone(),
        })?;
    if bytes.len() as u64 != p.size {
        return Err(RestoreError::Corrupt(format!(
            "`{}/{}` is {} bytes, the pointer says {}",
            p.bucket,
            p.key,
            bytes.len(),
            p.size
        )));
    }
    if sha256_hex(&bytes) != p.sha256 {
        return Err(RestoreError::Corrupt(format!(
            "`{}/{}` does not match its SHA-256",
            p.bucket, p.key
        )));
    }
    Ok(bytes)
}

fn decoded(bytes: &[u8], encoding: &str) -> Result<Vec<u8>, RestoreError> {
    match encoding {
        ENCODING_IDENTITY => Ok(bytes.to_vec()),
        ENCODING_GZIP => gunzip(bytes).map_err(RestoreError::Corrupt),
        other => Err(RestoreError::Corrupt(format!(
            "unknown content encoding `{other}`"
        ))),
    }
}

fn raw_json(bytes: Vec<u8>) -> Result<Box<RawValue>, RestoreError> {
    let text = String::from_utf8(bytes)
        .map_err(|_| RestoreError::Corrupt("the payload is not UTF-8".into()))?;
    RawValue::from_string(text)
        .map_err(|e| RestoreError::Corrupt(format!("the payload is not JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = r#"{"v":1,"type":"T","id":"m1","entity_id":null,"correlation_id":"m1","causation_id":null,"seq":3,"ts":9,"payload":{"data":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}}"#;

    #[tokio::test]
    async fn shrink_then_restore_gives_the_payload_back() {
        let small = shrink(BODY, 10).unwrap().expect("compressible");
        assert!(small.len() < BODY.len(), "{small}");
        assert!(small.contains(r#""payload_encoding":"gzip""#), "{small}");
        let attrs = vec![("sourceflow.type".into(), "T".into())];
        let mut env = crate::envelope::decode(&small, &attrs).unwrap();
        restore(None, &mut env).await.unwrap();
        let original = crate::envelope::decode(BODY, &attrs).unwrap();
        assert_eq!(env.payload.get(), original.payload.get());
        assert_eq!((env.id.as_str(), env.seq, env.ts), ("m1", 3, 9));
        // Below the size, or not smaller: left as it is.
        assert!(shrink(BODY, 10_000).unwrap().is_none());
        assert!(shrink(r#"{"v":1,"type":"T","id":"m","payload":"ab"}"#, 0)
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn a_retried_offload_writes_the_same_bytes_under_the_same_key() {
        let store = crate::transport::memory::MemoryObjects::default();
        let target = Target {
            store: std::sync::Arc::new(store.clone()),
            bucket: "b".into(),
            prefix: "p".into(),
            threshold: None,
            max_bytes: 1 << 20,
            expiration_days: 15,
        };
        let message = OutgoingMessage {
            body: BODY.into(),
            attributes: Vec::new().into(),
            group_id: None,
            dedup_id: None,
            delay: None,
            wire_name: "T".into(),
            message_id: "m1".into(),
        };
        let first = offload(&target, &message).await.unwrap();
        let again = offload(&target, &message).await.unwrap();
        assert_eq!(first.body, again.body);
        assert_eq!(store.keys("b").len(), 1);
        // The pointer reads back to the payload.
        let attrs = vec![("sourceflow.type".into(), "T".into())];
        let mut env = crate::envelope::decode(&first.body, &attrs).unwrap();
        restore(Some(&store), &mut env).await.unwrap();
        let original = crate::envelope::decode(BODY, &attrs).unwrap();
        assert_eq!(env.payload.get(), original.payload.get());
        assert_eq!((env.id.as_str(), env.seq), ("m1", 3));
    }

    #[tokio::test]
    async fn a_corrupted_inline_payload_is_refused() {
        let bad = BODY.replace(
            r#""payload":{"data":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#,
            r#""payload":"H4sIAAAAAAAA","payload_encoding":"gzip""#,
        );
        let attrs = vec![("sourceflow.type".into(), "T".into())];
        let mut env = crate::envelope::decode(&bad, &attrs).unwrap();
        let err = restore(None, &mut env).await.unwrap_err();
        assert!(matches!(err, RestoreError::Corrupt(_)), "{err}");
    }
}
