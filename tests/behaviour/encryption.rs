//! Payload encryption: round trip, nothing in clear on the wire, tampering and replay
//! refused (to the DLQ, with the reason) while the listener keeps going, data-key caching.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sourceflow::encryption::{
    self, DataKey, EncryptionContext, KeyProvider, LocalKeyProvider, PlainKey, Sealed,
};
use sourceflow::envelope::{self, attr};
use sourceflow::naming::Naming;
use sourceflow::transport::ReceivedMessage;
use sourceflow::{command, event, handler, State};

use crate::harness::{dlq_reason, eventually, Harness};

#[command(queue = "enc-payments", name = "tests.ChargeCard.enc.v1", encrypt)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecureCharge {
    pub order_id: u64,
    #[sensitive(card)]
    pub card_number: String,
    #[sensitive(email)]
    pub email: String,
}

#[command(queue = "enc-refunds", name = "tests.Refund.enc.v1", encrypt)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecureRefund {
    pub order_id: u64,
    #[sensitive(card)]
    pub card_number: String,
    #[sensitive(email)]
    pub email: String,
}

#[event(topic = "enc-events", name = "tests.Charged.enc.v1", encrypt)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecureCharged {
    pub order_id: u64,
    #[sensitive]
    pub token: String,
}

#[derive(Clone, Default)]
pub struct Seen(pub Arc<Mutex<Vec<String>>>);

impl Seen {
    fn all(&self) -> Vec<String> {
        self.0.lock().expect("seen").clone()
    }
}

mod payments {
    use super::*;
    pub const MODULE: &str = module_path!();

    #[handler]
    async fn charge(
        cmd: SecureCharge,
        ctx: &sourceflow::Context,
        State(s): State<Seen>,
    ) -> sourceflow::Result<()> {
        s.0.lock()
            .expect("seen")
            .push(format!("charge {} {}", cmd.order_id, cmd.card_number));
        ctx.raise(SecureCharged {
            order_id: cmd.order_id,
            token: format!("tok-{}", cmd.order_id),
        })
        .await
    }

    #[handler]
    async fn refund(cmd: SecureRefund, State(s): State<Seen>) -> sourceflow::Result<()> {
        s.0.lock()
            .expect("seen")
            .push(format!("refund {}", cmd.order_id));
        Ok(())
    }

    #[handler]
    async fn charged(evt: SecureCharged, State(s): State<Seen>) -> sourceflow::Result<()> {
        s.0.lock()
            .expect("seen")
            .push(format!("charged {} {}", evt.order_id, evt.token));
        Ok(())
    }
}

/// Only sends: nothing here handles the encrypted types, so their messages stay queued.
mod sender_only {
    pub const MODULE: &str = module_path!();
}

/// A key provider that counts its calls.
#[derive(Clone)]
struct Counting {
    inner: Arc<LocalKeyProvider>,
    generated: Arc<AtomicU32>,
    decrypted: Arc<AtomicU32>,
}

impl Counting {
    fn new() -> Self {
        Counting {
            inner: Arc::new(LocalKeyProvider::new([42u8; 32], "test-key")),
            generated: Arc::default(),
            decrypted: Arc::default(),
        }
    }
}

#[async_trait]
impl KeyProvider for Counting {
    fn name(&self) -> &'static str {
        "counting"
    }
    async fn generate_data_key(&self, context: &EncryptionContext) -> sourceflow::Result<DataKey> {
        self.generated.fetch_add(1, Ordering::SeqCst);
        self.inner.generate_data_key(context).await
    }
    async fn decrypt_data_key(
        &self,
        encrypted: &[u8],
        context: &EncryptionContext,
    ) -> sourceflow::Result<PlainKey> {
        self.decrypted.fetch_add(1, Ordering::SeqCst);
        self.inner.decrypt_data_key(encrypted, context).await
    }
}

fn card(n: u64) -> SecureCharge {
    SecureCharge {
        order_id: n,
        card_number: format!("5555 4444 3333 {:04}", 1000 + n),
        email: format!("buyer{n}@private.example"),
    }
}

/// Sends a (possibly altered) copy of a raw message.
async fn resend(
    h: &Harness,
    m: &ReceivedMessage,
    body: String,
    attributes: Vec<(String, String)>,
    queue: String,
) {
    let pairs: Vec<(&str, &str)> = attributes
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    h.send_raw(&queue, &body, &pairs, m.group_id.as_deref())
        .await;
}

/// Takes `n` raw messages off a queue nobody consumes.
async fn peek(h: &Harness, queue: &str, n: usize) -> Vec<ReceivedMessage> {
    let got = h.drain(queue, n).await;
    assert_eq!(got.len(), n);
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_types_round_trip_and_nothing_is_in_clear_on_the_wire() {
    let h = Harness::new().await;
    let keys = Counting::new();
    // A sender alone: the messages stay in the queue, readable with the plain transport.
    let sender = h
        .service("enc-sender", sender_only::MODULE)
        .key_provider(keys.clone())
        .start()
        .await
        .expect("sender");
    let cmd = card(1);
    sender.send(cmd.clone()).await.expect("send");
    let raw = peek(&h, &sender.queue_of::<SecureCharge>(), 1).await;
    let m = &raw[0];
    for secret in [
        cmd.card_number.as_str(),
        cmd.email.as_str(),
        "5555",
        "private.example",
    ] {
        assert!(
            !m.body.contains(secret),
            "{secret:?} is in clear on the wire: {}",
            m.body
        );
        assert!(m
            .attributes
            .iter()
            .all(|(_, v)| !v.as_str().contains(secret)));
    }
    assert_eq!(
        envelope::attribute(&m.attributes, encryption::ATTRIBUTE),
        Some(encryption::FORMAT_V1)
    );
    let env = envelope::decode(&m.body, &m.attributes).expect("envelope");
    let sealed: Sealed = serde_json::from_str(env.payload.get()).expect("ciphertext object");
    assert_eq!(
        (sealed.sfenc, sealed.alg.as_str(), sealed.kid.as_str()),
        (1, "AES-256-GCM", "test-key")
    );

    // A consumer with the same key reads them, and what its handler raises is encrypted too.
    let seen = Seen::default();
    let consumer = h
        .service("enc-consumer", payments::MODULE)
        .key_provider(keys.clone())
        .state(seen.clone())
        .start()
        .await
        .expect("consumer");
    for n in 2..5 {
        sender.send(card(n)).await.expect("send");
    }
    eventually("three charges and their events", || async {
        seen.all().len() >= 6
    })
    .await;
    let all = seen.all();
    assert!(
        all.contains(&"charge 2 5555 4444 3333 1002".to_string()),
        "{all:?}"
    );
    assert!(all.contains(&"charged 4 tok-4".to_string()), "{all:?}");
    sender.shutdown().await.expect("shutdown");
    consumer.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_replayed_or_clear_messages_go_to_the_dlq_and_the_listener_keeps_going() {
    let h = Harness::new().await;
    let keys = Counting::new();
    let sender = h
        .service("enc-tamper-sender", sender_only::MODULE)
        .key_provider(keys.clone())
        .start()
        .await
        .expect("sender");
    let charges = sender.queue_of::<SecureCharge>();
    let refunds = sender.queue_of::<SecureRefund>();
    for n in 0..6 {
        sender.send(card(n)).await.expect("send");
    }
    let raw = peek(&h, &charges, 6).await;
    let attrs = |m: &ReceivedMessage| -> Vec<(String, String)> {
        m.attributes
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_str().to_string()))
            .collect()
    };
    // Flip one bit in a field of the ciphertext object.
    let flip = |m: &ReceivedMessage, field: &str| -> String {
        let mut env: serde_json::Value = serde_json::from_str(&m.body).expect("json");
        let text = env["payload"][field].as_str().expect("field").to_string();
        let mut bytes = B64.decode(text).expect("b64");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        env["payload"][field] = serde_json::Value::String(B64.encode(bytes));
        env.to_string()
    };
    resend(
        &h,
        &raw[0],
        flip(&raw[0], "ct"),
        attrs(&raw[0]),
        charges.clone(),
    )
    .await; // ciphertext
    resend(
        &h,
        &raw[1],
        flip(&raw[1], "iv"),
        attrs(&raw[1]),
        charges.clone(),
    )
    .await; // nonce
    resend(
        &h,
        &raw[2],
        flip(&raw[2], "edk"),
        attrs(&raw[2]),
        charges.clone(),
    )
    .await; // data key
            // The tag is the last 16 bytes of `ct`: flip its first byte.
    let mut env: serde_json::Value = serde_json::from_str(&raw[3].body).expect("json");
    let mut ct = B64
        .decode(env["payload"]["ct"].as_str().expect("ct"))
        .expect("b64");
    let tag_start = ct.len() - 16;
    ct[tag_start] ^= 0x80;
    env["payload"]["ct"] = serde_json::Value::String(B64.encode(ct));
    resend(
        &h,
        &raw[3],
        env.to_string(),
        attrs(&raw[3]),
        charges.clone(),
    )
    .await;
    // Replayed as another type on that type's queue: the context no longer matches.
    let mut replay: serde_json::Value = serde_json::from_str(&raw[4].body).expect("json");
    replay["type"] = "tests.Refund.enc.v1".into();
    let mut replay_attrs = attrs(&raw[4]);
    for (k, v) in replay_attrs.iter_mut() {
        if k == attr::TYPE {
            *v = "tests.Refund.enc.v1".into();
        }
    }
    resend(
        &h,
        &raw[4],
        replay.to_string(),
        replay_attrs,
        refunds.clone(),
    )
    .await;
    // A type that requires encryption, sent in clear.
    h.send_raw(
        &charges,
        r#"{"v":1,"type":"tests.ChargeCard.enc.v1","id":"clear-1","payload":{"order_id":9,"card_number":"1","email":"a@b"}}"#,
        &[(attr::TYPE, "tests.ChargeCard.enc.v1")],
        None,
    )
    .await;
    // And one good message, untouched.
    resend(
        &h,
        &raw[5],
        raw[5].body.to_string(),
        attrs(&raw[5]),
        charges.clone(),
    )
    .await;

    let seen = Seen::default();
    let consumer = h
        .service("enc-tamper-consumer", payments::MODULE)
        .key_provider(keys.clone())
        .state(seen.clone())
        .start()
        .await
        .expect("consumer");
    eventually("the good message is handled", || async {
        seen.all().iter().any(|s| s.starts_with("charge 5 "))
    })
    .await;
    let mut reasons: Vec<String> = h
        .drain(&Naming::dead_letter(&charges), 5)
        .await
        .iter()
        .map(|m| dlq_reason(m).unwrap_or("<none>").to_string())
        .collect();
    reasons.extend(
        h.drain(&Naming::dead_letter(&refunds), 1)
            .await
            .iter()
            .map(|m| dlq_reason(m).unwrap_or("<none>").to_string()),
    );
    reasons.sort();
    assert_eq!(reasons.len(), 6, "{reasons:#?}");
    let auth = reasons
        .iter()
        .filter(|r| r.contains("payload authentication failed"))
        .count();
    assert_eq!(
        auth, 3,
        "ciphertext, nonce and tag flips fail authentication: {reasons:#?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("the data key does not decrypt")),
        "{reasons:#?}"
    );
    assert!(
        reasons.iter().any(
            |r| r.contains("`tests.ChargeCard.enc.v1` must be encrypted, but arrived in clear")
        ),
        "{reasons:#?}"
    );
    assert!(
        reasons
            .iter()
            .filter(|r| r.starts_with("decryption failed"))
            .count()
            == 6,
        "{reasons:#?}"
    );
    let handled = seen.all();
    assert_eq!(
        handled
            .iter()
            .filter(|s| s.starts_with("charge ") || s.starts_with("refund "))
            .count(),
        1,
        "only the untouched message was handled: {handled:?}"
    );
    sender.shutdown().await.expect("shutdown");
    consumer.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_keys_are_cached_on_both_sides() {
    let h = Harness::new().await;
    let keys = Counting::new();
    let seen = Seen::default();
    let app = h
        .service("enc-cache", payments::MODULE)
        .key_provider(keys.clone())
        .state(seen.clone())
        .concurrency(20)
        .start()
        .await
        .expect("start");
    // The embedded transport takes thousands in a blink; an AWS API is slower.
    let n_messages: u64 = if h.transport.name() == "memory" {
        2_000
    } else {
        300
    };
    let sends = (0..n_messages).map(|n| {
        let app = app.clone();
        async move { app.send(card(n)).await.expect("send") }
    });
    futures_util::future::join_all(sends).await;
    eventually("all charges and events handled", || async {
        seen.all().len() as u64 == 2 * n_messages
    })
    .await;
    // One data key per encryption context (the command's queue, the event's topic) in the
    // cache window, and one decrypt per distinct data key.
    assert_eq!(
        keys.generated.load(Ordering::SeqCst),
        2,
        "GenerateDataKey calls"
    );
    assert_eq!(keys.decrypted.load(Ordering::SeqCst), 2, "Decrypt calls");
    app.shutdown().await.expect("shutdown");

    // Without the cache: one of each per message.
    let uncached = Counting::new();
    let seen2 = Seen::default();
    let app = h
        .service("enc-nocache", payments::MODULE)
        .key_provider(uncached.clone())
        .key_cache(encryption::CacheLimits::disabled())
        .state(seen2.clone())
        .start()
        .await
        .expect("start");
    for n in 0..10 {
        app.send(card(n)).await.expect("send");
    }
    eventually("ten charges and events", || async {
        seen2.all().len() == 20
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(uncached.generated.load(Ordering::SeqCst), 20);
    assert_eq!(uncached.decrypted.load(Ordering::SeqCst), 20);
    app.shutdown().await.expect("shutdown");
}

mod pins {
    use super::*;

    pub const MODULE: &str = module_path!();

    #[command(queue = "enc-pins", name = "tests.SetPin.enc.v1", encrypt)]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct SetPin {
        pub account: u64,
        #[sensitive]
        pub pin: u64,
    }

    #[handler]
    async fn set_pin(_cmd: SetPin, State(s): State<Seen>) -> sourceflow::Result<()> {
        s.0.lock().expect("seen").push("set".into());
        Ok(())
    }
}

/// A payload whose `#[sensitive]` field has the wrong type: serde_json's own error would
/// quote the value (`invalid type: string "4111 …", expected u64`) into the dead-letter
/// reason and the log. The reason names the field and the expected type only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mistyped_sensitive_field_never_reaches_the_dead_letter_reason_or_the_logs() {
    use pins::{SetPin, MODULE};
    let h = Harness::new().await;
    let seen = Seen::default();
    let app = h
        .service("enc-pins", MODULE)
        .state(seen.clone())
        .max_receive_count(1)
        .start()
        .await
        .expect("start");
    let queue = app.queue_of::<SetPin>();
    const SECRET: &str = "4111 1111 1111 1111";
    // Sealed exactly as a sender would, with the service's key and context.
    let encryptor = encryption::Encryptor::new(
        Arc::new(LocalKeyProvider::new(
            crate::harness::TEST_MASTER_KEY,
            "test-local",
        )),
        encryption::CacheLimits::default(),
    );
    let plaintext = format!(r#"{{"account":1,"pin":"{SECRET}"}}"#);
    let sealed = encryptor
        .seal(
            plaintext.as_bytes(),
            &encryption::context("tests.SetPin.enc.v1", &queue),
        )
        .await
        .expect("seal");
    let body = serde_json::json!({
        "v": 1, "type": "tests.SetPin.enc.v1", "id": uuid::Uuid::new_v4().to_string(),
        "payload": sealed,
    })
    .to_string();
    h.send_raw(
        &queue,
        &body,
        &[
            (attr::TYPE, "tests.SetPin.enc.v1"),
            (encryption::ATTRIBUTE, encryption::FORMAT_V1),
        ],
        None,
    )
    .await;
    let dead = h.drain(&Naming::dead_letter(&queue), 1).await;
    assert_eq!(dead.len(), 1, "the mistyped payload is dead-lettered");
    let reason = dlq_reason(&dead[0]).expect("reason").to_string();
    assert!(
        reason.contains("at `pin`") && reason.contains("expected u64"),
        "the reason names the field and the type: {reason}"
    );
    // (Random ids in the logs may contain "4111"; the value has its spaces.)
    assert!(
        !reason.contains("1111 1111"),
        "the value leaked into the reason: {reason}"
    );
    // The listener logs the line once the broker confirmed the move, which can be after
    // the dead letter is already readable.
    let logged = || {
        crate::harness::telemetry()
            .logs
            .lock()
            .expect("logs")
            .clone()
    };
    crate::harness::eventually("the dead-letter line is logged", || async {
        logged().contains("at `pin`")
    })
    .await;
    let logs = logged();
    assert!(
        !logs.contains("1111 1111"),
        "the value leaked into the logs"
    );
    assert!(seen.all().is_empty(), "the handler never ran");
    app.shutdown().await.expect("shutdown");
}
