//! A key provider for development and tests: the master key is 32 bytes held by the
//! process (from `SOURCEFLOW_LOCAL_KEY`, base64), and data keys are wrapped with
//! AES-256-GCM under it, bound to the encryption context. Use KMS in production.

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{AeadCore, Aes256Gcm, Nonce};
use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use zeroize::Zeroizing;

use super::{aad, DataKey, EncryptionContext, KeyProvider, PlainKey};
use crate::error::{Error, Result};

/// A master key in the process. Wrapped data keys are `nonce (12) | ciphertext+tag (48)`.
pub struct LocalKeyProvider {
    master: Zeroizing<[u8; 32]>,
    key_id: String,
}

impl std::fmt::Debug for LocalKeyProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKeyProvider")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl LocalKeyProvider {
    /// A provider with this master key, known as `key_id`.
    pub fn new(master: [u8; 32], key_id: impl Into<String>) -> Self {
        LocalKeyProvider {
            master: Zeroizing::new(master),
            key_id: key_id.into(),
        }
    }

    /// A provider with a random master key (messages can only be read by this process).
    pub fn random() -> Self {
        let mut k = [0u8; 32];
        OsRng.fill_bytes(&mut k);
        Self::new(k, "local-random")
    }

    /// The master key from base64 text (as in `SOURCEFLOW_LOCAL_KEY`).
    pub fn from_base64(text: &str) -> Result<Self> {
        let bytes = Zeroizing::new(
            B64.decode(text.trim())
                .map_err(|e| Error::Config(format!("SOURCEFLOW_LOCAL_KEY is not base64: {e}")))?,
        );
        let master: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            Error::Config(format!(
                "SOURCEFLOW_LOCAL_KEY must be 32 bytes, got {}",
                bytes.len()
            ))
        })?;
        Ok(Self::new(master, "local"))
    }

    fn cipher(&self) -> Result<Aes256Gcm> {
        Aes256Gcm::new_from_slice(self.master.as_slice())
            .map_err(|e| Error::Other(format!("master key: {e}").into()))
    }
}

#[async_trait]
impl KeyProvider for LocalKeyProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn generate_data_key(&self, context: &EncryptionContext) -> Result<DataKey> {
        let mut plaintext = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(plaintext.as_mut_slice());
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = aad(context);
        let wrapped = self
            .cipher()?
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext.as_slice(),
                    aad: &aad,
                },
            )
            .map_err(|_| Error::Other("wrapping the data key failed".into()))?;
        let mut encrypted = nonce.to_vec();
        encrypted.extend_from_slice(&wrapped);
        Ok(DataKey {
            plaintext,
            encrypted,
            key_id: self.key_id.clone(),
        })
    }

    async fn decrypt_data_key(
        &self,
        encrypted: &[u8],
        context: &EncryptionContext,
    ) -> Result<PlainKey> {
        if encrypted.len() != 12 + 32 + 16 {
            return Err(Error::Other(
                format!("a wrapped data key is 60 bytes, got {}", encrypted.len()).into(),
            ));
        }
        let (nonce, wrapped) = encrypted.split_at(12);
        let aad = aad(context);
        let plain = Zeroizing::new(
            self.cipher()?
                .decrypt(
                    Nonce::from_slice(nonce),
                    Payload {
                        msg: wrapped,
                        aad: &aad,
                    },
                )
                .map_err(|_| {
                    Error::Other(
                        "the data key does not open under this master key and context".into(),
                    )
                })?,
        );
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(plain.as_slice());
        Ok(key)
    }
}
