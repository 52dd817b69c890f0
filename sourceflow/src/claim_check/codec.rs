//! Bytes in and out: gzip, and the SHA-256 digest a pointer carries.

use std::io::{Read, Write};

use sha2::{Digest, Sha256};

/// The most a compressed payload may expand to when read (a guard against a small body
/// that inflates without end).
pub(super) const MAX_INFLATED: u64 = 256 * 1024 * 1024;

/// `bytes`, gzip-compressed (level 6, the default of `gzip`).
pub(super) fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(bytes.len() / 4),
        flate2::Compression::default(),
    );
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(bytes);
    enc.finish().unwrap_or_default()
}

/// The bytes a gzip stream holds, refused past [`MAX_INFLATED`].
pub(super) fn gunzip(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(bytes.len().saturating_mul(4));
    flate2::read::GzDecoder::new(bytes)
        .take(MAX_INFLATED + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("not a gzip stream: {e}"))?;
    if out.len() as u64 > MAX_INFLATED {
        return Err(format!("inflates past {MAX_INFLATED} bytes"));
    }
    Ok(out)
}

/// The lowercase hex SHA-256 of `bytes`.
pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for b in digest {
        hex.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        hex.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_round_trips_and_refuses_garbage() {
        let data = "abc".repeat(10_000);
        let z = gzip(data.as_bytes());
        assert!(z.len() < data.len() / 10);
        assert_eq!(gunzip(&z).unwrap(), data.as_bytes());
        assert!(gunzip(b"not gzip").is_err());
    }

    #[test]
    fn sha256_is_the_known_digest() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
