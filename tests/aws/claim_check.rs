//! The claim check on AWS, read back with the plain S3 SDK: the bucket and its lifecycle
//! rule as `create` mode leaves them, `validate` naming a missing bucket or a differing
//! rule, and an encrypted large command stored as ciphertext only, never deleted by its
//! receiver.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::encryption::{LocalKeyProvider, Sealed};
use sourceflow::envelope;
use sourceflow::transport::aws::{AwsTransport, ProvisionMode};
use sourceflow::transport::{Receive, Transport};
use sourceflow::{command, handler, ClaimCheck, State};

use super::{enabled, prefix};

pub const MODULE: &str = module_path!();

#[command(queue = "aws-cc-vault", name = "awscc.Vault.v1", encrypt)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vault {
    pub data: String,
}

#[derive(Clone, Default)]
struct Got(Arc<Mutex<Vec<String>>>);

#[handler]
async fn vault(cmd: Vault, State(got): State<Got>) -> sourceflow::Result<()> {
    got.0.lock().expect("lock").push(cmd.data);
    Ok(())
}

/// A plain S3 client, configured as any AWS tool would be (path-style for an emulator).
async fn plain_s3() -> aws_sdk_s3::Client {
    let cfg = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    let conf = aws_sdk_s3::config::Builder::from(&cfg)
        .force_path_style(cfg.endpoint_url().is_some())
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

fn service(t: &AwsTransport, p: &str, name: &str, handlers: bool) -> sourceflow::Builder {
    sourceflow::builder()
        .service(name)
        .prefix(p)
        .transport(t.clone())
        .handlers(move |h| handlers && h.module_path == MODULE)
        .receive_wait(Duration::from_secs(1))
        .key_provider(LocalKeyProvider::new([3u8; 32], "aws-cc"))
}

/// The bucket's lifecycle rules as (id, prefix, days, enabled).
async fn rules(s3: &aws_sdk_s3::Client, bucket: &str) -> Vec<(String, String, i32, bool)> {
    let out = s3
        .get_bucket_lifecycle_configuration()
        .bucket(bucket)
        .send()
        .await
        .expect("lifecycle configuration");
    let mut rules: Vec<_> = out
        .rules()
        .iter()
        .map(|r| {
            (
                r.id().unwrap_or_default().to_string(),
                r.filter()
                    .and_then(|f| f.prefix())
                    .unwrap_or_default()
                    .to_string(),
                r.expiration().and_then(|e| e.days()).unwrap_or(0),
                r.status().as_str() == "Enabled",
            )
        })
        .collect();
    rules.sort();
    rules
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_mode_makes_the_bucket_with_its_lifecycle_rule_and_validate_checks_it() {
    if !enabled() {
        return;
    }
    let t = AwsTransport::from_env().await.expect("transport");
    let s3 = plain_s3().await;
    let p = prefix();
    let bucket = format!("{p}-claims-bucket");
    let claim = ClaimCheck::bucket(&bucket).expiration_days(20);
    let app = service(&t, &p, "cc-create", false)
        .claim_check(claim.clone())
        .start()
        .await
        .expect("start");
    app.shutdown().await.expect("shutdown");
    let ours = (
        format!("sourceflow-expire-{p}-claims"),
        format!("{p}-claims/"),
        20,
        true,
    );
    assert_eq!(rules(&s3, &bucket).await, vec![ours.clone()]);

    // Another prefix on the same bucket adds its rule and keeps the first.
    let other = service(&t, &p, "cc-other", false)
        .claim_check(claim.clone().prefix("other").expiration_days(16))
        .start()
        .await
        .expect("start");
    other.shutdown().await.expect("shutdown");
    let theirs = (
        "sourceflow-expire-other".to_string(),
        "other/".to_string(),
        16,
        true,
    );
    assert_eq!(rules(&s3, &bucket).await, vec![ours, theirs]);

    let validate = t.clone().provision_mode(ProvisionMode::Validate);
    let same = service(&validate, &p, "cc-create", false)
        .claim_check(claim.clone())
        .start()
        .await
        .expect("the bucket validates");
    same.shutdown().await.expect("shutdown");
    let err = service(&validate, &p, "cc-create", false)
        .claim_check(claim.clone().expiration_days(30))
        .start()
        .await
        .expect_err("the rule differs");
    let text = err.to_string();
    assert!(
        text.contains(&format!(
            "lifecycle rule `sourceflow-expire-{p}-claims` of bucket `{bucket}`: Expiration is Enabled, prefix `{p}-claims/`, 20 days, expected Enabled, prefix `{p}-claims/`, 30 days"
        )),
        "{text}"
    );
    let missing = format!("{p}-no-such-bucket");
    let err = service(&validate, &p, "cc-create", false)
        .claim_check(ClaimCheck::bucket(&missing))
        .start()
        .await
        .expect_err("no bucket");
    assert!(
        err.to_string()
            .contains(&format!("bucket `{missing}` is missing")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_large_command_is_ciphertext_in_s3_and_outlives_its_receiver() {
    if !enabled() {
        return;
    }
    let t = AwsTransport::from_env().await.expect("transport");
    let s3 = plain_s3().await;
    let p = prefix();
    let bucket = format!("{p}-claims-vault");
    let sender = service(&t, &p, "cc-vault-sender", false)
        .claim_check(ClaimCheck::bucket(&bucket))
        .start()
        .await
        .expect("sender");
    let marker = "VAULT-PLAINTEXT-91c2";
    let data = format!("{marker}{}", "0123456789abcdef".repeat(128 * 1024));
    sender
        .send(Vault { data: data.clone() })
        .await
        .expect("2 MiB");
    let queue = sender.queue_of::<Vault>();
    let receive = Receive {
        max: 1,
        wait: Duration::from_secs(5),
        visibility: Duration::from_secs(1),
    };
    let raw = t.receive(&queue, receive).await.expect("receive");
    assert_eq!(raw.len(), 1);
    assert!(raw[0].body.len() < 2048, "{}", raw[0].body);
    let env = envelope::decode(&raw[0].body, &raw[0].attributes).expect("envelope");
    let pointer = env.claim_check.expect("pointer");
    assert_eq!(pointer.bucket, bucket);
    let object = s3
        .get_object()
        .bucket(&bucket)
        .key(&pointer.key)
        .send()
        .await
        .expect("the object, read with the plain SDK");
    let bytes = object.body.collect().await.expect("body").into_bytes();
    assert_eq!(bytes.len() as u64, pointer.size);
    let text = String::from_utf8_lossy(&bytes);
    assert!(!text.contains(marker) && !text.contains("0123456789abcdef"));
    let sealed: Sealed = serde_json::from_slice(&bytes).expect("a sealed payload");
    assert_eq!(sealed.sfenc, 1);

    // The message comes back (visibility 1 s); a receiver handles it and leaves the object.
    let got = Got::default();
    let receiver = service(&t, &p, "cc-vault-receiver", true)
        .state(got.clone())
        .start()
        .await
        .expect("receiver");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while got.0.lock().expect("lock").is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "not handled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(got.0.lock().expect("lock")[0], data);
    receiver.shutdown().await.expect("shutdown");
    sender.shutdown().await.expect("shutdown");
    s3.head_object()
        .bucket(&bucket)
        .key(&pointer.key)
        .send()
        .await
        .expect("the object is still there after its receiver ran");
}
