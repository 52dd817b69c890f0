//! The claim check's object store on S3: `PutObject` when a large message is sent,
//! `GetObject` when it is received; never a delete (the bucket's lifecycle rule expires
//! objects, see [`crate::claim_check`]).

use async_trait::async_trait;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;

use crate::claim_check::{ObjectError, ObjectStore};

const STORE: &str = "s3";

/// Large payloads in S3. Cheap to clone.
#[derive(Debug, Clone)]
pub struct S3ObjectStore {
    client: aws_sdk_s3::Client,
}

impl S3ObjectStore {
    /// A store on this client.
    pub fn new(client: aws_sdk_s3::Client) -> Self {
        S3ObjectStore { client }
    }

    /// A store from an SDK configuration. With an endpoint override (`AWS_ENDPOINT_URL`, an
    /// emulator on `127.0.0.1`) bucket names go in the path, since an IP address has no
    /// bucket subdomains.
    pub fn from_sdk_config(cfg: &aws_config::SdkConfig) -> Self {
        Self::new(client(cfg, None))
    }

    /// The S3 client, for tools and tests.
    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }
}

/// An S3 client from `cfg` (path-style behind an endpoint override), counting its
/// requests in `counter` when given.
pub(super) fn client(
    cfg: &aws_config::SdkConfig,
    counter: Option<&super::RequestCounter>,
) -> aws_sdk_s3::Client {
    let mut b =
        aws_sdk_s3::config::Builder::from(cfg).force_path_style(cfg.endpoint_url().is_some());
    if let Some(c) = counter {
        b = b.interceptor(c.clone());
    }
    aws_sdk_s3::Client::from_conf(b.build())
}

/// How an S3 error counts: a refusal (4xx other than throttling: a missing bucket, no
/// permission) or a store that is unavailable now (network, timeouts, 5xx, throttling).
fn classify<E, R>(
    operation: &'static str,
    bucket: &str,
    key: &str,
    e: &SdkError<E, R>,
) -> ObjectError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let text = crate::transport::aws::errors::one_line(&DisplayErrorContext(e).to_string());
    let refused = match e {
        SdkError::ServiceError(se) => {
            let code = se.err().code().unwrap_or("");
            !matches!(
                code,
                "SlowDown" | "InternalError" | "ServiceUnavailable" | "RequestTimeout"
            )
        }
        _ => false,
    };
    match refused {
        true => ObjectError::Refused {
            store: STORE,
            operation,
            bucket: bucket.to_string(),
            key: key.to_string(),
            reason: text,
        },
        false => ObjectError::Unavailable {
            store: STORE,
            reason: format!("{operation} of `{bucket}/{key}`: {text}"),
        },
    }
}

#[async_trait]
impl ObjectStore for S3ObjectStore {
    fn name(&self) -> &'static str {
        STORE
    }

    async fn put(
        &self,
        bucket: &str,
        key: &str,
        bytes: Vec<u8>,
        content_type: &str,
    ) -> Result<(), ObjectError> {
        self.client
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify("put", bucket, key, &e))
    }

    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, ObjectError> {
        let out = match self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(SdkError::ServiceError(se))
                if se.err().is_no_such_key() || se.err().code() == Some("NoSuchBucket") =>
            {
                return Ok(None)
            }
            Err(e) => return Err(classify("get", bucket, key, &e)),
        };
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|e| ObjectError::Unavailable {
                store: STORE,
                reason: format!("reading `{bucket}/{key}`: {e}"),
            })?;
        Ok(Some(bytes.into_bytes().to_vec()))
    }
}
