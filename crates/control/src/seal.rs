//! Sealing upstream secrets for the store: ChaCha20-Poly1305 under a key derived (SHA-256) from
//! `admin.secret_key`. Stored as `v1:<base64(nonce ‖ ciphertext)>`; the clear secret never
//! reaches the database.

use base64::Engine;
use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use keypool_types::Secret;
use sha2::{Digest, Sha256};

fn cipher(key: &Secret) -> ChaCha20Poly1305 {
    let k: [u8; 32] = Sha256::digest(key.expose().as_bytes()).into();
    ChaCha20Poly1305::new(Key::from_slice(&k))
}

/// Why a secret could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("sealing failed")]
    Seal,
    #[error("unknown sealing format")]
    Format,
    #[error("sealed secret too short")]
    Short,
    #[error("sealed secret is not base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("cannot unseal: wrong admin.secret_key?")]
    WrongKey,
    #[error("the unsealed secret is not UTF-8")]
    Utf8(#[from] std::string::FromUtf8Error),
}

pub fn seal(key: &Secret, secret: &str) -> Result<String, SealError> {
    let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
    let ct = cipher(key)
        .encrypt(&nonce, secret.as_bytes())
        .map_err(|_| SealError::Seal)?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&ct);
    Ok(format!(
        "v1:{}",
        base64::engine::general_purpose::STANDARD.encode(out)
    ))
}

pub fn open(key: &Secret, sealed: &str) -> Result<String, SealError> {
    let raw = sealed.strip_prefix("v1:").ok_or(SealError::Format)?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(raw)?;
    if bytes.len() <= 12 {
        return Err(SealError::Short);
    }
    let (nonce, ct) = bytes.split_at(12);
    let clear = cipher(key)
        .decrypt(Nonce::from_slice(nonce), ct)
        .map_err(|_| SealError::WrongKey)?;
    Ok(String::from_utf8(clear)?)
}

/// `n` bytes from the operating system's generator.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    OsRng.fill_bytes(&mut b);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_and_refuses_the_wrong_key() {
        let k = Secret::new("master");
        let s = seal(&k, "sk-live-123").unwrap();
        assert!(s.starts_with("v1:") && !s.contains("sk-live"));
        assert_eq!(open(&k, &s).unwrap(), "sk-live-123");
        assert!(open(&Secret::new("other"), &s).is_err());
        assert_ne!(seal(&k, "sk-live-123").unwrap(), s, "fresh nonce each time");
    }
}
