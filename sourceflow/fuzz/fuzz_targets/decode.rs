//! Fuzzes everything a listener does with bytes from a queue before a handler runs:
//! envelope decoding against its attributes, the ciphertext object, and decryption.
//! It must never panic, whatever arrives.
//!
//! ```text
//! cargo install cargo-fuzz
//! cd sourceflow/fuzz && cargo fuzz run decode --sanitizer none -- -max_total_time=60
//! ```
#![no_main]

use libfuzzer_sys::fuzz_target;
use sourceflow::encryption::{context, CacheLimits, Encryptor, LocalKeyProvider, Sealed};
use sourceflow::envelope::{attr, decode};
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the declared type; the rest is the body.
    let (ty, body) = match data.split_first() {
        Some((t, rest)) => (format!("T{}", t % 4), rest),
        None => ("T0".to_string(), data),
    };
    let body = String::from_utf8_lossy(body);
    let attrs = vec![(attr::TYPE.into(), ty.clone().into())];
    if let Ok(env) = decode(&body, &attrs) {
        if let Ok(sealed) = serde_json::from_str::<Sealed>(env.payload.get()) {
            let enc = Encryptor::new(
                Arc::new(LocalKeyProvider::new([1u8; 32], "fuzz")),
                CacheLimits::default(),
            );
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            let _ = rt.block_on(enc.open(&sealed, &context(&ty, "q")));
        }
    }
});
