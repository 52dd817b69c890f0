//! Envelope encryption of message payloads.
//!
//! A message type declared with `encrypt` (`#[command(queue = "...", encrypt)]`), or every
//! type when [`Builder::encrypt_all`](crate::Builder::encrypt_all) is set, travels with its
//! payload encrypted:
//!
//! 1. a 256-bit **data key** comes from the [`KeyProvider`] (KMS `GenerateDataKey` with
//!    `KeySpec=AES_256` on AWS; [`LocalKeyProvider`] for development), together with the
//!    data key encrypted under the master key;
//! 2. the payload is encrypted with **AES-256-GCM** (RustCrypto `aes-gcm`) under a random
//!    96-bit nonce; the plaintext key is zeroized when dropped;
//! 3. an **encryption context** — wire name, destination (queue for commands, topic for
//!    events, prefix included) and purpose — is bound both as the KMS `EncryptionContext` and
//!    as the GCM associated data, so a ciphertext moved to another type or queue does not
//!    decrypt.
//!
//! The envelope's `payload` becomes the **ciphertext object, version 1**:
//!
//! ```json
//! {"sfenc":1,"alg":"AES-256-GCM","kid":"<master key id>","edk":"<base64 encrypted data key>",
//!  "iv":"<base64 12-byte nonce>","ct":"<base64 ciphertext with its 16-byte tag>"}
//! ```
//!
//! and the message carries the attribute `sourceflow.encryption` = `sfenc/1`. A receiver
//! without a key provider, a flipped byte anywhere, a ciphertext replayed to another type or
//! queue, and a plaintext message of a type that requires encryption are all refused: the
//! message goes to the dead-letter queue with the reason; nothing is handled in clear by
//! mistake. Entity ids (FIFO group ids) and other message attributes stay in clear: never
//! use sensitive data as an entity id (the macros refuse `#[entity_id]` with `#[sensitive]`).
//!
//! **Data-key caching** on both sides keeps KMS traffic low. The sender reuses a data key
//! per encryption context within the limits of [`CacheLimits`] (the AWS Encryption SDK's
//! caching limits: age, messages, bytes); the receiver caches decrypted keys by their
//! encrypted bytes. Both caches are bounded; [`CacheLimits::disabled`] turns caching off.

mod cache;
#[cfg(feature = "aws")]
mod kms;
mod local;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{AeadCore, Aes256Gcm, Nonce};
use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

pub use cache::CacheLimits;
use cache::{ReceiverCache, SenderCache};
#[cfg(feature = "aws")]
pub use kms::KmsKeyProvider;
pub use local::LocalKeyProvider;

/// The attribute marking an encrypted payload (a wire name, kept in
/// [`envelope::attr`](crate::envelope::attr)).
pub const ATTRIBUTE: &str = crate::envelope::attr::ENCRYPTION;
/// The value of [`ATTRIBUTE`] for format version 1.
pub const FORMAT_V1: &str = crate::envelope::attr::ENCRYPTION_V1;
/// What the data keys of message payloads are for (part of the encryption context).
pub const PURPOSE: &str = "message-payload";

/// A plaintext 256-bit data key, zeroized on drop.
pub type PlainKey = Zeroizing<[u8; 32]>;

/// A data key as a [`KeyProvider`] returns it.
pub struct DataKey {
    /// The key itself.
    pub plaintext: PlainKey,
    /// The key encrypted under the master key: it travels with the message.
    pub encrypted: Vec<u8>,
    /// The master key's id (for KMS, the key ARN).
    pub key_id: String,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey")
            .field("plaintext", &"***")
            .field("key_id", &self.key_id)
            .finish()
    }
}

/// The encryption context: what a ciphertext is bound to.
pub type EncryptionContext = BTreeMap<String, String>;

/// Makes and opens data keys under a master key.
#[async_trait]
pub trait KeyProvider: Send + Sync + 'static {
    /// Short name for logs (`kms`, `local`).
    fn name(&self) -> &'static str;

    /// A new data key bound to `context`.
    async fn generate_data_key(&self, context: &EncryptionContext) -> Result<DataKey>;

    /// Decrypts an encrypted data key; fails if `context` differs from the one it was made
    /// with.
    async fn decrypt_data_key(
        &self,
        encrypted: &[u8],
        context: &EncryptionContext,
    ) -> Result<PlainKey>;

    /// The master key's ARN, for the IAM policy (`None` for keys outside KMS).
    fn key_arn(&self) -> Option<String> {
        None
    }

    /// Checks that the master key is usable now (KMS: `DescribeKey`, enabled), for health
    /// checks; a line saying what was found. The default has nothing to check.
    async fn check(&self) -> Result<String> {
        Ok(format!("{} key provider", self.name()))
    }
}

/// The context for a message type sent to a (full) destination name.
pub fn context(wire_name: &str, destination: &str) -> EncryptionContext {
    let mut c = BTreeMap::new();
    c.insert(
        "sourceflow:destination".to_string(),
        destination.to_string(),
    );
    c.insert("sourceflow:purpose".to_string(), PURPOSE.to_string());
    c.insert("sourceflow:wire_name".to_string(), wire_name.to_string());
    c
}

/// The context as GCM associated data: `key=value` pairs in key order, newline-separated.
fn aad(context: &EncryptionContext) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in context {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(b'\n');
    }
    out
}

/// The ciphertext object that replaces the payload (format version 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// Format version: 1.
    pub sfenc: u32,
    /// Algorithm: `AES-256-GCM`.
    pub alg: String,
    /// Master key id.
    pub kid: String,
    /// Encrypted data key, base64.
    pub edk: String,
    /// Nonce, base64 (12 bytes).
    pub iv: String,
    /// Ciphertext and tag, base64.
    pub ct: String,
}

/// Why a payload could not be decrypted. The message goes to the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    /// The message is encrypted, but this service has no key provider.
    #[error("payload is encrypted but this service has no key provider configured")]
    NoKeyProvider,
    /// The ciphertext object is not version 1 or is malformed.
    #[error("unreadable ciphertext: {0}")]
    Format(String),
    /// The data key could not be decrypted (wrong key, wrong context, tampered).
    #[error("the data key does not decrypt: {0}")]
    DataKey(String),
    /// Authentication failed: tampered ciphertext, nonce or tag, or another context.
    #[error("payload authentication failed (tampered, or replayed to another type or queue)")]
    Authentication,
    /// A type that requires encryption arrived in clear.
    #[error("`{0}` must be encrypted, but arrived in clear")]
    Plaintext(String),
}

/// Encrypts and decrypts payloads with a key provider and both caches.
pub struct Encryptor {
    provider: Arc<dyn KeyProvider>,
    sender: SenderCache,
    receiver: ReceiverCache,
}

impl std::fmt::Debug for Encryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encryptor")
            .field("provider", &self.provider.name())
            .finish_non_exhaustive()
    }
}

impl Encryptor {
    /// An encryptor over `provider` with caching `limits`.
    pub fn new(provider: Arc<dyn KeyProvider>, limits: CacheLimits) -> Self {
        Encryptor {
            provider,
            sender: SenderCache::new(limits),
            receiver: ReceiverCache::new(limits),
        }
    }

    /// The key provider's name.
    pub fn provider_name(&self) -> &'static str {
        self.provider.name()
    }

    /// The master key's ARN, when it is a KMS key.
    pub fn key_arn(&self) -> Option<String> {
        self.provider.key_arn()
    }

    /// Checks the master key (see [`KeyProvider::check`]).
    pub async fn check_key(&self) -> Result<String> {
        self.provider.check().await
    }

    /// Encrypts a JSON payload for `context`.
    pub async fn seal(&self, plaintext: &[u8], context: &EncryptionContext) -> Result<Sealed> {
        let key = self
            .sender
            .key_for(context, plaintext.len(), || {
                self.provider.generate_data_key(context)
            })
            .await?;
        let cipher = Aes256Gcm::new_from_slice(key.plaintext.as_slice())
            .map_err(|e| Error::Other(format!("data key: {e}").into()))?;
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = aad(context);
        let ct = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| Error::Other("AES-GCM encryption failed".into()))?;
        Ok(Sealed {
            sfenc: 1,
            alg: "AES-256-GCM".into(),
            kid: key.key_id.clone(),
            edk: B64.encode(&key.encrypted),
            iv: B64.encode(nonce),
            ct: B64.encode(ct),
        })
    }

    /// Decrypts a ciphertext object made for `context`.
    pub async fn open(
        &self,
        sealed: &Sealed,
        context: &EncryptionContext,
    ) -> std::result::Result<Zeroizing<Vec<u8>>, DecryptError> {
        if sealed.sfenc != 1 || sealed.alg != "AES-256-GCM" {
            return Err(DecryptError::Format(format!(
                "format {} / {} is not supported (this build reads 1 / AES-256-GCM)",
                sealed.sfenc, sealed.alg
            )));
        }
        let b64 = |what: &str, s: &str| {
            B64.decode(s)
                .map_err(|e| DecryptError::Format(format!("{what} is not base64: {e}")))
        };
        let edk = b64("edk", &sealed.edk)?;
        let iv = b64("iv", &sealed.iv)?;
        let ct = b64("ct", &sealed.ct)?;
        if iv.len() != 12 {
            return Err(DecryptError::Format(format!(
                "nonce is {} bytes, expected 12",
                iv.len()
            )));
        }
        let key = self
            .receiver
            .key_for(&edk, context, || {
                self.provider.decrypt_data_key(&edk, context)
            })
            .await
            .map_err(|e| DecryptError::DataKey(e.to_string()))?;
        let cipher = Aes256Gcm::new_from_slice(key.as_slice())
            .map_err(|e| DecryptError::DataKey(e.to_string()))?;
        let aad = aad(context);
        cipher
            .decrypt(
                Nonce::from_slice(&iv),
                Payload {
                    msg: &ct,
                    aad: &aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| DecryptError::Authentication)
    }
}

/// How a service encrypts: the encryptor, and whether every type is encrypted.
pub(crate) struct Settings {
    pub encryptor: Arc<Encryptor>,
    pub all: bool,
}

/// Default lifetime of a cached data key.
pub const DEFAULT_KEY_MAX_AGE: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any payload under any context decrypts to itself, and only under that context.
        #[test]
        fn seal_open_round_trip(payload in any::<Vec<u8>>(), wire in ".{0,30}", dest in ".{0,30}", flip in any::<prop::sample::Index>()) {
            let e = encryptor();
            let ctx = context(&wire, &dest);
            let rt = rt();
            let sealed = rt.block_on(e.seal(&payload, &ctx)).expect("seal");
            let opened = rt.block_on(e.open(&sealed, &ctx)).expect("open");
            prop_assert_eq!(opened.as_slice(), payload.as_slice());
            // One flipped bit anywhere in the ciphertext (tag included) is refused.
            let mut ct = B64.decode(&sealed.ct).expect("b64");
            let i = flip.index(ct.len());
            ct[i] ^= 0x01;
            let tampered = Sealed { ct: B64.encode(ct), ..sealed.clone() };
            prop_assert!(rt.block_on(e.open(&tampered, &ctx)).is_err());
            let other = context(&format!("{wire}x"), &dest);
            prop_assert!(rt.block_on(e.open(&sealed, &other)).is_err());
        }

        /// Arbitrary ciphertext objects are refused, never a panic.
        #[test]
        fn open_never_panics(sfenc in 0u32..3, edk in ".{0,90}", iv in ".{0,20}", ct in ".{0,90}") {
            let e = encryptor();
            let sealed = Sealed { sfenc, alg: "AES-256-GCM".into(), kid: "k".into(), edk, iv, ct };
            prop_assert!(rt().block_on(e.open(&sealed, &context("t", "q"))).is_err());
        }
    }

    fn encryptor() -> Encryptor {
        Encryptor::new(
            Arc::new(LocalKeyProvider::new([7u8; 32], "local-test")),
            CacheLimits::default(),
        )
    }

    #[tokio::test]
    async fn round_trip_and_context_binding() {
        let e = encryptor();
        let ctx = context("orders.CreateOrder.v1", "orders.fifo");
        let sealed = e.seal(br#"{"card":"4111"}"#, &ctx).await.unwrap();
        assert!(!sealed.ct.contains("4111"));
        let plain = e.open(&sealed, &ctx).await.unwrap();
        assert_eq!(plain.as_slice(), br#"{"card":"4111"}"#);
        let other = context("orders.CreateOrder.v1", "other-queue");
        assert!(
            e.open(&sealed, &other).await.is_err(),
            "another destination"
        );
        let other = context("orders.Other.v1", "orders.fifo");
        assert!(e.open(&sealed, &other).await.is_err(), "another type");
    }

    #[tokio::test]
    async fn every_flipped_byte_is_rejected() {
        let e = encryptor();
        let ctx = context("t", "q");
        let sealed = e.seal(b"{\"x\":1}", &ctx).await.unwrap();
        for field in ["edk", "iv", "ct"] {
            let raw = match field {
                "edk" => &sealed.edk,
                "iv" => &sealed.iv,
                _ => &sealed.ct,
            };
            let bytes = B64.decode(raw).unwrap();
            for i in 0..bytes.len() {
                let mut b = bytes.clone();
                b[i] ^= 0x01;
                let mut t = sealed.clone();
                let enc = B64.encode(&b);
                match field {
                    "edk" => t.edk = enc,
                    "iv" => t.iv = enc,
                    _ => t.ct = enc,
                }
                // A fresh receiver, so a cached key cannot mask a tampered edk.
                let fresh = encryptor();
                assert!(
                    fresh.open(&t, &ctx).await.is_err(),
                    "flipping byte {i} of {field} went unnoticed"
                );
            }
        }
    }
}
