//! Large messages: the claim check stores what SQS/SNS would refuse and sends a pointer;
//! receivers fetch and verify it, never delete it; a missing or corrupted object goes to
//! the dead-letter queue with the reason; compression keeps compressible payloads inline.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sourceflow::claim_check::Pointer;
use sourceflow::encryption::Sealed;
use sourceflow::envelope::{self, attr};
use sourceflow::naming::Naming;
use sourceflow::transport::ReceivedMessage;
use sourceflow::{command, event, Compression};

use crate::harness::{dlq_reason, eventually, Faulty, Harness};

#[command(queue = "cc-uploads", name = "tests.cc.Upload.v1")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Upload {
    pub id: u32,
    pub data: String,
}

#[event(topic = "cc-events", name = "tests.cc.Uploaded.v1")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Uploaded {
    pub id: u32,
    pub data: String,
}

/// Nobody consumes it: its messages stay queued, readable raw.
#[command(queue = "cc-parked", name = "tests.cc.Parked.v1")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parked {
    pub data: String,
}

#[command(queue = "cc-secret", name = "tests.cc.Secret.v1", encrypt)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Secret {
    pub data: String,
}

#[command(queue = "cc-fragile", name = "tests.cc.Fragile.v1")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fragile {
    pub data: String,
}

/// One handled message: (kind, id, data).
type Handled = (&'static str, u32, String);

/// What the handlers of a service saw.
#[derive(Clone, Default)]
pub struct Seen(pub Arc<Mutex<Vec<Handled>>>);

impl Seen {
    fn push(&self, kind: &'static str, id: u32, data: String) {
        self.0.lock().expect("lock").push((kind, id, data));
    }
    fn len(&self) -> usize {
        self.0.lock().expect("lock").len()
    }
    fn get(&self, kind: &str) -> Option<(u32, String)> {
        let all = self.0.lock().expect("lock");
        all.iter()
            .find(|(k, _, _)| *k == kind)
            .map(|(_, id, d)| (*id, d.clone()))
    }
}

/// A service that handles nothing: it only sends.
mod sender {
    pub const MODULE: &str = module_path!();
}

mod alpha {
    use super::{Fragile, Secret, Seen, Upload, Uploaded};
    use sourceflow::{handler, State};

    pub const MODULE: &str = module_path!();

    #[handler]
    async fn upload(cmd: Upload, State(s): State<Seen>) -> sourceflow::Result<()> {
        s.push("command", cmd.id, cmd.data);
        Ok(())
    }

    #[handler]
    async fn uploaded(evt: Uploaded, State(s): State<Seen>) -> sourceflow::Result<()> {
        s.push("event", evt.id, evt.data);
        Ok(())
    }

    #[handler]
    async fn secret(cmd: Secret, State(s): State<Seen>) -> sourceflow::Result<()> {
        s.push("secret", 0, cmd.data);
        Ok(())
    }

    #[handler]
    async fn fragile(cmd: Fragile, State(s): State<Seen>) -> sourceflow::Result<()> {
        s.push("fragile", 0, cmd.data);
        Ok(())
    }
}

mod beta {
    use super::{Seen, Uploaded};
    use sourceflow::{handler, State};

    pub const MODULE: &str = module_path!();

    #[handler]
    async fn uploaded(evt: Uploaded, State(s): State<Seen>) -> sourceflow::Result<()> {
        s.push("event", evt.id, evt.data);
        Ok(())
    }
}

/// `len` bytes of letters that do not repeat in any short period (gzip gains little).
fn text(len: usize, seed: u64) -> String {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The pointer of a raw message.
fn pointer_of(m: &ReceivedMessage) -> Pointer {
    let env = envelope::decode(&m.body, &m.attributes).expect("an envelope");
    env.claim_check.expect("a claim-check pointer")
}

/// The raw message's attributes, as `send_raw` takes them.
fn raw_attributes(m: &ReceivedMessage) -> Vec<(String, String)> {
    m.attributes
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_str().to_string()))
        .collect()
}

async fn resend(h: &Harness, queue: &str, m: &ReceivedMessage, body: &str) {
    let attrs = raw_attributes(m);
    let attrs: Vec<(&str, &str)> = attrs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    h.send_raw(queue, body, &attrs, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2_mib_command_and_a_1_mib_event_reach_two_services_intact() {
    let h = Harness::new().await;
    let claim = h.claim_check();
    let (seen_a, seen_b) = (Seen::default(), Seen::default());
    let sender = h
        .service("cc-sender", sender::MODULE)
        .claim_check(claim.clone())
        .start()
        .await
        .expect("sender");
    // Receivers need no claim-check settings of their own: the pointer names the bucket.
    let a = h
        .service("cc-alpha", alpha::MODULE)
        .state(seen_a.clone())
        .start()
        .await
        .expect("alpha");
    let b = h
        .service("cc-beta", beta::MODULE)
        .state(seen_b.clone())
        .start()
        .await
        .expect("beta");

    let command = Upload {
        id: 1,
        data: text(2 * 1024 * 1024, 1),
    };
    let event = Uploaded {
        id: 2,
        data: text(1024 * 1024, 2),
    };
    let command_id = sender.send(command.clone()).await.expect("2 MiB command");
    let event_id = sender.raise(event.clone()).await.expect("1 MiB event");
    eventually("alpha saw both, beta the event", || async {
        seen_a.len() >= 2 && seen_b.len() >= 1
    })
    .await;
    assert_eq!(seen_a.get("command"), Some((1, command.data.clone())));
    assert_eq!(seen_a.get("event"), Some((2, event.data.clone())));
    assert_eq!(seen_b.get("event"), Some((2, event.data.clone())));

    // Neither subscriber deleted the objects: both are still there, unchanged.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let prefix = format!("{}-claims", h.prefix);
    for (id, payload) in [
        (&command_id, serde_json::to_vec(&command).expect("json")),
        (&event_id, serde_json::to_vec(&event).expect("json")),
    ] {
        let key = format!("{prefix}/{id}/{}", sha256_hex(&payload));
        let stored = h
            .objects()
            .get(claim.bucket_name(), &key)
            .await
            .expect("store");
        assert_eq!(stored.as_deref(), Some(&payload[..]), "object `{key}`");
    }
    assert_eq!((seen_a.len(), seen_b.len()), (2, 1), "each once");
    for app in [sender, a, b] {
        app.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_carries_a_small_pointer_and_the_store_the_payload() {
    let h = Harness::new().await;
    let claim = h.claim_check();
    let sender = h
        .service("cc-raw", sender::MODULE)
        .claim_check(claim.clone())
        .start()
        .await
        .expect("sender");
    let parked = Parked {
        data: text(2 * 1024 * 1024, 3),
    };
    let id = sender.send(parked.clone()).await.expect("send");
    sender
        .send(Parked {
            data: "small".into(),
        })
        .await
        .expect("send");
    let queue = sender.queue_of::<Parked>();
    let raw = h.drain(&queue, 2).await;
    assert_eq!(raw.len(), 2);
    let (large, small): (Vec<_>, Vec<_>) = raw.iter().partition(|m| {
        m.body.len() > 300 || {
            envelope::decode(&m.body, &m.attributes)
                .map(|e| e.claim_check.is_some())
                .unwrap_or(false)
        }
    });
    let (m, small) = (large[0], small[0]);
    assert!(
        m.body.len() < 2048,
        "the queued message is small: {}",
        m.body
    );
    let env = envelope::decode(&m.body, &m.attributes).expect("an envelope");
    assert_eq!(
        (env.id.as_str(), env.wire_name.as_str()),
        (id.as_str(), "tests.cc.Parked.v1")
    );
    assert_eq!(
        envelope::attribute(&m.attributes, attr::TYPE),
        Some("tests.cc.Parked.v1")
    );
    assert_eq!(env.payload.get(), "null");
    let p = env.claim_check.expect("pointer");
    let payload = serde_json::to_vec(&parked).expect("json");
    assert_eq!(
        (p.bucket.as_str(), p.encoding.as_str(), p.size),
        (claim.bucket_name(), "identity", payload.len() as u64)
    );
    assert_eq!(p.sha256, sha256_hex(&payload));
    assert!(
        p.key.starts_with(&format!("{}-claims/{id}/", h.prefix)),
        "{}",
        p.key
    );
    let stored = h.objects().get(&p.bucket, &p.key).await.expect("store");
    assert_eq!(stored.as_deref(), Some(&payload[..]));
    // What fits travels inline, as before.
    let inline = envelope::decode(&small.body, &small.attributes).expect("an envelope");
    assert!(inline.claim_check.is_none());
    assert_eq!(inline.payload.get(), r#"{"data":"small"}"#);

    // A lower threshold stores smaller messages too.
    let low = h
        .service("cc-raw-low", sender::MODULE)
        .claim_check(claim.clone().threshold(1000))
        .start()
        .await
        .expect("sender");
    low.send(Parked {
        data: text(2000, 4),
    })
    .await
    .expect("send");
    let raw = h.drain(&queue, 1).await;
    assert_eq!(
        pointer_of(&raw[0]).size,
        2000 + r#"{"data":""}"#.len() as u64
    );
    sender.shutdown().await.expect("shutdown");
    low.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_large_command_leaves_no_plaintext_in_the_store() {
    let h = Harness::new().await;
    let sender = h
        .service("cc-enc", sender::MODULE)
        .claim_check(h.claim_check())
        .start()
        .await
        .expect("sender");
    let marker = "PLAINTEXT-MARKER-7f3a";
    let secret = Secret {
        data: format!("{marker}{}", text(2 * 1024 * 1024, 5)),
    };
    sender.send(secret.clone()).await.expect("send");
    let queue = sender.queue_of::<Secret>();
    let raw = h.drain(&queue, 1).await;
    let m = &raw[0];
    assert!(!m.body.contains(marker));
    let p = pointer_of(m);
    let stored = h
        .objects()
        .get(&p.bucket, &p.key)
        .await
        .expect("store")
        .expect("object");
    let stored_text = String::from_utf8_lossy(&stored);
    assert!(!stored_text.contains(marker), "plaintext in the store");
    assert!(
        !stored_text.contains(&secret.data[100..200]),
        "plaintext in the store"
    );
    let sealed: Sealed = serde_json::from_slice(&stored).expect("a sealed payload");
    assert_eq!(sealed.sfenc, 1);

    // The message, put back on its queue, is fetched, decrypted and handled whole.
    resend(&h, &queue, m, &m.body).await;
    let seen = Seen::default();
    let consumer = h
        .service("cc-enc-consumer", alpha::MODULE)
        .state(seen.clone())
        .start()
        .await
        .expect("consumer");
    eventually("the secret handled", || async { seen.len() >= 1 }).await;
    assert_eq!(seen.get("secret"), Some((0, secret.data.clone())));
    sender.shutdown().await.expect("shutdown");
    consumer.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_corrupted_stored_payload_goes_to_the_dead_letter_queue_with_the_reason() {
    let h = Harness::new().await;
    let sender = h
        .service("cc-fragile", sender::MODULE)
        .claim_check(h.claim_check())
        .start()
        .await
        .expect("sender");
    for seed in [6, 7] {
        let data = text(2 * 1024 * 1024, seed);
        sender.send(Fragile { data }).await.expect("send");
    }
    let queue = sender.queue_of::<Fragile>();
    let raw = h.drain(&queue, 2).await;
    assert_eq!(raw.len(), 2);
    let store = h.objects();
    // One object is overwritten with other bytes; the other one's pointer is made to name
    // an object that is gone.
    let corrupt = pointer_of(&raw[0]);
    let mut bytes = store
        .get(&corrupt.bucket, &corrupt.key)
        .await
        .expect("store")
        .expect("object");
    // Same size, one letter changed: only the digest tells.
    let i = bytes.len() / 2;
    bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
    store
        .put(&corrupt.bucket, &corrupt.key, bytes, "application/json")
        .await
        .expect("overwrite");
    let gone = pointer_of(&raw[1]);
    let gone_body = raw[1]
        .body
        .replace(&gone.key, &format!("{}-deleted", gone.key));
    resend(&h, &queue, &raw[0], &raw[0].body).await;
    resend(&h, &queue, &raw[1], &gone_body).await;

    let seen = Seen::default();
    let consumer = h
        .service("cc-fragile-consumer", alpha::MODULE)
        .state(seen.clone())
        .start()
        .await
        .expect("consumer");
    let dead = h.drain(&Naming::dead_letter(&queue), 2).await;
    assert_eq!(dead.len(), 2);
    let mut reasons: Vec<&str> = dead.iter().filter_map(dlq_reason).collect();
    reasons.sort();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("claim check: the payload is corrupted")
                && r.contains("does not match its SHA-256")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("claim check: the stored payload")
                && r.contains("does not exist (expired or deleted)")),
        "{reasons:?}"
    );
    assert_eq!(seen.len(), 0, "no handler ran");
    sender.shutdown().await.expect("shutdown");
    consumer.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_keeps_large_compressible_messages_inline() {
    let h = Harness::new().await;
    let (seen_a, seen_b) = (Seen::default(), Seen::default());
    // No bucket: compression alone.
    let sender = h
        .service("cc-gzip", sender::MODULE)
        .compression(Compression::above(64 * 1024))
        .start()
        .await
        .expect("sender");
    let a = h
        .service("cc-gzip-alpha", alpha::MODULE)
        .state(seen_a.clone())
        .start()
        .await
        .expect("alpha");
    let b = h
        .service("cc-gzip-beta", beta::MODULE)
        .state(seen_b.clone())
        .start()
        .await
        .expect("beta");
    // 1.5 MiB and 1 MiB of JSON that repeats: over SQS's and SNS's limits as they are.
    let row = r#"{"sku":"A-1","qty":1,"price":"9.99"},"#;
    let parked = Parked {
        data: row.repeat(1536 * 1024 / row.len()),
    };
    sender.send(parked.clone()).await.expect("1.5 MiB command");
    let raw = h.drain(&sender.queue_of::<Parked>(), 1).await;
    let m = &raw[0];
    assert!(m.body.len() < 256 * 1024, "{} bytes", m.body.len());
    let env = envelope::decode(&m.body, &m.attributes).expect("an envelope");
    assert_eq!(env.payload_encoding.as_deref(), Some("gzip"));
    assert!(env.claim_check.is_none());

    let event = Uploaded {
        id: 9,
        data: row.repeat(1024 * 1024 / row.len()),
    };
    sender.raise(event.clone()).await.expect("1 MiB event");
    eventually("both subscribers got it", || async {
        seen_a.len() >= 1 && seen_b.len() >= 1
    })
    .await;
    assert_eq!(seen_a.get("event"), Some((9, event.data.clone())));
    assert_eq!(seen_b.get("event"), Some((9, event.data.clone())));

    // Without compression or a bucket, the same event is refused at the call.
    let plain = h
        .service("cc-plain", sender::MODULE)
        .start()
        .await
        .expect("sender");
    let err = plain.raise(event).await.expect_err("too large");
    assert!(err.to_string().contains("sourceflow::claim_check"), "{err}");
    for app in [sender, a, b, plain] {
        app.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_is_retried_never_dead_lettered() {
    let h = Harness::new().await;
    let faulty = Faulty::new(h.transport.clone());
    let sender = h
        .service("cc-down", sender::MODULE)
        .transport(faulty.clone())
        .claim_check(h.claim_check())
        .start()
        .await
        .expect("sender");
    let queue = sender.queue_of::<Fragile>();
    // Sending while the store is away fails at the call, and sends nothing.
    faulty
        .objects_down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let err = sender
        .send(Fragile {
            data: text(2 * 1024 * 1024, 10),
        })
        .await
        .expect_err("the store is away");
    assert!(err.to_string().contains("connection refused"), "{err}");
    h.assert_empty(&queue, Duration::from_millis(300)).await;
    faulty
        .objects_down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let data = text(2 * 1024 * 1024, 11);
    sender
        .send(Fragile { data: data.clone() })
        .await
        .expect("send");

    // A receiver whose store is away hands the message back (no attempt spent, no dead
    // letter) until the store answers again.
    faulty
        .objects_down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = Seen::default();
    let consumer = h
        .service("cc-down-consumer", alpha::MODULE)
        .transport(faulty.clone())
        .max_receive_count(1)
        .infrastructure_retry(sourceflow::RetryPolicy::exponential(
            Duration::from_millis(50),
            Duration::from_millis(200),
        ))
        .state(seen.clone())
        .start()
        .await
        .expect("consumer");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(seen.len(), 0);
    h.assert_empty(&Naming::dead_letter(&queue), Duration::from_millis(200))
        .await;
    faulty
        .objects_down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    eventually("handled once the store is back", || async {
        seen.len() >= 1
    })
    .await;
    assert_eq!(seen.get("fragile"), Some((0, data)));
    sender.shutdown().await.expect("shutdown");
    consumer.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_message_delayed_past_its_payloads_expiry_is_refused_at_the_call() {
    let h = Harness::new().await;
    let sender = h
        .service("cc-late", sender::MODULE)
        .claim_check(h.claim_check().expiration_days(2))
        .start()
        .await
        .expect("sender");
    let late = sourceflow::SendOptions::new().delay(Duration::from_secs(3 * 86_400));
    let large = Upload {
        id: 9,
        data: text(2 * 1024 * 1024, 9),
    };
    let err = sender
        .send_with(large, late)
        .await
        .expect_err("its stored payload would expire before it is due");
    assert!(
        matches!(&err, sourceflow::Error::Unsupported(m) if m.contains("expire before the message is due")),
        "{err}"
    );
    let queue = sender.queue_of::<Upload>();
    h.assert_empty(&queue, Duration::from_millis(300)).await;
    sender.shutdown().await.expect("shutdown");
}
