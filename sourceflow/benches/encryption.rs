//! Per-message cost of payload encryption, with and without the data-key caches, and the
//! key-provider calls per 10,000 messages, measured side by side in one run.
//!
//! ```text
//! cargo bench -p sourceflow --bench encryption
//! ```
//!
//! Each round seals and opens 10,000 order payloads (~180 bytes of JSON) through the same
//! `Encryptor` the runtime uses: (1) JSON only, no encryption, the baseline; (2) encrypted
//! with both caches on (default limits); (3) encrypted with caching disabled, so every
//! message costs a `GenerateDataKey` and a `Decrypt` — with KMS those are network calls
//! (~1-5 ms each on AWS), here they are local AES key wraps, so (3) shows the floor of the
//! uncached cost. Rounds alternate and the median is reported.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sourceflow::encryption::{
    context, CacheLimits, DataKey, EncryptionContext, Encryptor, KeyProvider, LocalKeyProvider,
    PlainKey,
};

const MESSAGES: usize = 10_000;
const ROUNDS: usize = 5;

#[derive(serde::Serialize, serde::Deserialize)]
struct Order {
    order_id: u64,
    customer: String,
    amount_cents: u64,
    card_number: String,
    email: String,
}

struct Counting {
    inner: LocalKeyProvider,
    generate: AtomicU64,
    decrypt: AtomicU64,
}

#[async_trait]
impl KeyProvider for Counting {
    fn name(&self) -> &'static str {
        "counting"
    }
    async fn generate_data_key(&self, c: &EncryptionContext) -> sourceflow::Result<DataKey> {
        self.generate.fetch_add(1, Ordering::Relaxed);
        self.inner.generate_data_key(c).await
    }
    async fn decrypt_data_key(
        &self,
        e: &[u8],
        c: &EncryptionContext,
    ) -> sourceflow::Result<PlainKey> {
        self.decrypt.fetch_add(1, Ordering::Relaxed);
        self.inner.decrypt_data_key(e, c).await
    }
}

fn payloads() -> Vec<Vec<u8>> {
    (0..MESSAGES as u64)
        .map(|i| {
            serde_json::to_vec(&Order {
                order_id: i,
                customer: format!("customer-{}", i % 97),
                amount_cents: 1000 + i,
                card_number: format!("4111 1111 1111 {:04}", i % 10_000),
                email: format!("buyer{i}@example.com"),
            })
            .expect("json")
        })
        .collect()
}

struct Run {
    per_message: Duration,
    generate: u64,
    decrypt: u64,
}

async fn encrypted(payloads: &[Vec<u8>], limits: CacheLimits) -> Run {
    let provider = Arc::new(Counting {
        inner: LocalKeyProvider::new([3u8; 32], "bench"),
        generate: AtomicU64::new(0),
        decrypt: AtomicU64::new(0),
    });
    let enc = Encryptor::new(provider.clone(), limits);
    let ctx = context("orders.CreateOrder.v1", "orders.fifo");
    let start = Instant::now();
    for p in payloads {
        let sealed = enc.seal(p, &ctx).await.expect("seal");
        let opened = enc.open(&sealed, &ctx).await.expect("open");
        std::hint::black_box(opened);
    }
    Run {
        per_message: start.elapsed() / payloads.len() as u32,
        generate: provider.generate.load(Ordering::Relaxed),
        decrypt: provider.decrypt.load(Ordering::Relaxed),
    }
}

fn plain(payloads: &[Vec<u8>]) -> Duration {
    let start = Instant::now();
    for p in payloads {
        let order: Order = serde_json::from_slice(p).expect("json");
        std::hint::black_box(serde_json::to_vec(&order).expect("json"));
    }
    start.elapsed() / payloads.len() as u32
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let payloads = payloads();
    let (mut base, mut cached, mut uncached) = (Vec::new(), Vec::new(), Vec::new());
    let mut calls = ((0, 0), (0, 0));
    // Warm-up, then alternate.
    rt.block_on(encrypted(&payloads[..1000], CacheLimits::default()));
    for _ in 0..ROUNDS {
        base.push(plain(&payloads));
        let c = rt.block_on(encrypted(&payloads, CacheLimits::default()));
        let u = rt.block_on(encrypted(&payloads, CacheLimits::disabled()));
        calls = ((c.generate, c.decrypt), (u.generate, u.decrypt));
        cached.push(c.per_message);
        uncached.push(u.per_message);
    }
    let (b, c, u) = (median(base), median(cached), median(uncached));
    println!("payload encryption, {MESSAGES} messages per round, median of {ROUNDS} rounds");
    println!(
        "{:<34} {:>12} {:>16} {:>16}",
        "", "per message", "GenerateDataKey", "Decrypt"
    );
    println!(
        "{:<34} {:>10.2}µs {:>16} {:>16}",
        "JSON only (baseline)",
        b.as_secs_f64() * 1e6,
        "-",
        "-"
    );
    println!(
        "{:<34} {:>10.2}µs {:>16} {:>16}",
        "seal + open, caches on",
        c.as_secs_f64() * 1e6,
        calls.0 .0,
        calls.0 .1
    );
    println!(
        "{:<34} {:>10.2}µs {:>16} {:>16}",
        "seal + open, caches off",
        u.as_secs_f64() * 1e6,
        calls.1 .0,
        calls.1 .1
    );
    println!(
        "cache saves {:.1}x per message locally; with KMS it saves {} of {} network calls per {MESSAGES} messages",
        u.as_secs_f64() / c.as_secs_f64(),
        (calls.1 .0 + calls.1 .1) - (calls.0 .0 + calls.0 .1),
        calls.1 .0 + calls.1 .1
    );
}
