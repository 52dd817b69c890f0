//! The KMS key provider: data keys from `GenerateDataKey` (`AES_256`) and `Decrypt`, with
//! the encryption context passed to KMS (so CloudTrail shows what each key was for, and a
//! key used for another type or destination does not decrypt).
//!
//! The key may be given as a key id, key ARN or alias (`alias/orders`). Decryption does not
//! name the key: KMS reads it from the ciphertext, so messages encrypted under an earlier
//! key still decrypt after the alias is pointed at a new one.

use async_trait::async_trait;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use zeroize::Zeroizing;

use super::{DataKey, EncryptionContext, KeyProvider, PlainKey};
use crate::error::{Error, Result};

/// Data keys from AWS KMS.
#[derive(Debug, Clone)]
pub struct KmsKeyProvider {
    client: aws_sdk_kms::Client,
    key_id: String,
    key_arn: Option<String>,
}

fn kms_error(operation: &str, text: String) -> Error {
    Error::Transport {
        transport: "kms",
        operation: operation.to_string(),
        source: text.into(),
    }
}

impl KmsKeyProvider {
    /// A provider for `key_id` (id, ARN or alias) using `client`.
    pub fn new(client: aws_sdk_kms::Client, key_id: impl Into<String>) -> Self {
        KmsKeyProvider {
            client,
            key_id: key_id.into(),
            key_arn: None,
        }
    }

    /// A provider from the standard AWS configuration; checks that the key exists and is
    /// enabled (`DescribeKey`) and remembers its ARN for the IAM policy.
    pub async fn from_env(key_id: impl Into<String>) -> Result<Self> {
        let cfg = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .load()
            .await;
        Self::new(aws_sdk_kms::Client::new(&cfg), key_id)
            .described()
            .await
    }

    /// Looks the key up with `DescribeKey`: fails if it does not exist or is disabled.
    pub async fn described(mut self) -> Result<Self> {
        self.key_arn = Some(self.describe().await?);
        Ok(self)
    }

    /// `DescribeKey`: the key's ARN, or why it is not usable (one line).
    async fn describe(&self) -> Result<String> {
        use aws_sdk_kms::error::ProvideErrorMetadata;
        let out = self
            .client
            .describe_key()
            .key_id(&self.key_id)
            .send()
            .await
            .map_err(|e| {
                let why = match e.as_service_error() {
                    Some(s) => format!(
                        "{}: {}",
                        s.code().unwrap_or("error"),
                        s.message().unwrap_or("")
                    ),
                    None => "KMS did not answer".to_string(),
                };
                tracing::debug!(error = ?e, "DescribeKey failed");
                Error::Config(format!("KMS key `{}` is not usable: {why}", self.key_id))
            })?;
        let meta = out.key_metadata();
        if meta.is_some_and(|m| !m.enabled()) {
            return Err(Error::Config(format!(
                "KMS key `{}` is disabled",
                self.key_id
            )));
        }
        Ok(meta
            .and_then(|m| m.arn())
            .unwrap_or(&self.key_id)
            .to_string())
    }
}

#[async_trait]
impl KeyProvider for KmsKeyProvider {
    fn name(&self) -> &'static str {
        "kms"
    }

    async fn generate_data_key(&self, context: &EncryptionContext) -> Result<DataKey> {
        let out = self
            .client
            .generate_data_key()
            .key_id(&self.key_id)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(context.clone().into_iter().collect()))
            .send()
            .await
            .map_err(|e| {
                kms_error(
                    "GenerateDataKey",
                    format!("{}", aws_sdk_kms::error::DisplayErrorContext(&e)),
                )
            })?;
        let plain = out
            .plaintext()
            .ok_or_else(|| kms_error("GenerateDataKey", "no plaintext key in the answer".into()))?;
        let mut key = Zeroizing::new([0u8; 32]);
        if plain.as_ref().len() != 32 {
            return Err(kms_error(
                "GenerateDataKey",
                format!(
                    "the data key is {} bytes, expected 32",
                    plain.as_ref().len()
                ),
            ));
        }
        key.copy_from_slice(plain.as_ref());
        Ok(DataKey {
            plaintext: key,
            encrypted: out
                .ciphertext_blob()
                .map(|b| b.as_ref().to_vec())
                .unwrap_or_default(),
            key_id: out.key_id().unwrap_or(&self.key_id).to_string(),
        })
    }

    async fn decrypt_data_key(
        &self,
        encrypted: &[u8],
        context: &EncryptionContext,
    ) -> Result<PlainKey> {
        let out = self
            .client
            .decrypt()
            .ciphertext_blob(Blob::new(encrypted))
            .set_encryption_context(Some(context.clone().into_iter().collect()))
            .send()
            .await
            .map_err(|e| {
                kms_error(
                    "Decrypt",
                    format!("{}", aws_sdk_kms::error::DisplayErrorContext(&e)),
                )
            })?;
        let plain = out
            .plaintext()
            .ok_or_else(|| kms_error("Decrypt", "no plaintext key in the answer".into()))?;
        if plain.as_ref().len() != 32 {
            return Err(kms_error("Decrypt", "the data key is not 32 bytes".into()));
        }
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(plain.as_ref());
        Ok(key)
    }

    async fn check(&self) -> Result<String> {
        let arn = self.describe().await?;
        Ok(format!("KMS key {arn} enabled"))
    }

    fn key_arn(&self) -> Option<String> {
        self.key_arn.clone()
    }
}
