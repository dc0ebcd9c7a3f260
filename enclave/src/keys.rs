//! Ephemeral X25519 key pair and HPKE unwrapping of the bundle's data key.
//!
//! Each worker start generates a fresh key pair; the private half never leaves this
//! process. Whoever releases the data key (the host in `local` mode, a key server
//! later) wraps it to the public half with HPKE (RFC 9180), base mode,
//! DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM, single shot:
//!
//! * `info` = `b"ennclave data key v1"` ‖ `0x00` ‖ key_id (UTF-8)
//! * `aad`  = empty
//!
//! The key id is bound through `info` rather than `aad` because single-shot HPKE APIs
//! (notably Python `cryptography`'s `hpke.Suite`) expose only `info`, which RFC 9180
//! §8.1 recommends for exactly this. Both are inputs to the authenticated key
//! schedule, so a key wrapped for one key id does not unwrap under another.
//!
//! The unwrapped key is decrypted in place inside a [`SecretBuf`].

use hpke::aead::{AeadTag, AesGcm256};
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as KemTrait, OpModeR, Serializable};
use rand_core::OsRng;
use std::fmt;

use crate::secmem::SecretBuf;

type Kem = X25519HkdfSha256;

pub const INFO_PREFIX: &[u8] = b"ennclave data key v1";
pub const DATA_KEY_LEN: usize = 32;
pub const ENC_LEN: usize = 32;
pub const TAG_LEN: usize = 16;
pub const WRAPPED_LEN: usize = DATA_KEY_LEN + TAG_LEN;

#[derive(Debug)]
pub enum KeyError {
    Format(String),
    /// HPKE open failed: wrapped for another key pair or key id, or modified.
    Unwrap,
    Memory(std::io::Error),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Format(m) => write!(f, "wrapped key is malformed: {m}"),
            KeyError::Unwrap => write!(
                f,
                "the wrapped data key does not open with this worker's key (wrong recipient or key id, or modified)"
            ),
            KeyError::Memory(e) => write!(f, "cannot allocate secret memory: {e}"),
        }
    }
}

impl std::error::Error for KeyError {}

/// `info` for a key id.
pub fn info_for(key_id: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(INFO_PREFIX.len() + 1 + key_id.len());
    v.extend_from_slice(INFO_PREFIX);
    v.push(0);
    v.extend_from_slice(key_id.as_bytes());
    v
}

/// The worker's ephemeral key pair.
pub struct EphemeralKey {
    // Boxed so the secret scalar has one heap location for its whole life (x25519-dalek
    // zeroizes it on drop) instead of being copied around the stack.
    sk: Box<<Kem as KemTrait>::PrivateKey>,
    pk: [u8; 32],
}

impl EphemeralKey {
    pub fn generate() -> Self {
        let (sk, pk) = Kem::gen_keypair(&mut OsRng);
        let mut pkb = [0u8; 32];
        pkb.copy_from_slice(&pk.to_bytes());
        EphemeralKey {
            sk: Box::new(sk),
            pk: pkb,
        }
    }

    pub fn public_bytes(&self) -> [u8; 32] {
        self.pk
    }

    /// Unwrap a data key: `enc` is the 32-byte encapsulated key, `wrapped` the 48-byte
    /// ciphertext ‖ tag.
    pub fn unwrap_data_key(
        &self,
        enc: &[u8],
        wrapped: &[u8],
        key_id: &str,
    ) -> Result<SecretBuf<u8>, KeyError> {
        if enc.len() != ENC_LEN {
            return Err(KeyError::Format(format!(
                "enc is {} bytes, expected {ENC_LEN}",
                enc.len()
            )));
        }
        if wrapped.len() != WRAPPED_LEN {
            return Err(KeyError::Format(format!(
                "wrapped key is {} bytes, expected {WRAPPED_LEN}",
                wrapped.len()
            )));
        }
        let encapped = <Kem as KemTrait>::EncappedKey::from_bytes(enc)
            .map_err(|_| KeyError::Format("enc is not an X25519 public key".into()))?;
        let mut ctx = hpke::setup_receiver::<AesGcm256, HkdfSha256, Kem>(
            &OpModeR::Base,
            &self.sk,
            &encapped,
            &info_for(key_id),
        )
        .map_err(|_| KeyError::Unwrap)?;
        let tag = AeadTag::<AesGcm256>::from_bytes(&wrapped[DATA_KEY_LEN..])
            .map_err(|_| KeyError::Format("bad tag".into()))?;
        let mut key = SecretBuf::<u8>::new(DATA_KEY_LEN).map_err(KeyError::Memory)?;
        key.copy_from_slice(&wrapped[..DATA_KEY_LEN]);
        ctx.open_in_place_detached(&mut key, &[], &tag)
            .map_err(|_| KeyError::Unwrap)?;
        Ok(key)
    }
}

/// Wrap a data key to a public key (what the host / key server does). Returns
/// `(enc, wrapped)`. Used by tests and by tools written in Rust.
pub fn wrap_data_key(
    recipient_pk: &[u8],
    data_key: &[u8],
    key_id: &str,
) -> Result<([u8; ENC_LEN], Vec<u8>), KeyError> {
    let pk = <Kem as KemTrait>::PublicKey::from_bytes(recipient_pk)
        .map_err(|_| KeyError::Format("recipient key is not an X25519 public key".into()))?;
    let (encapped, mut ctx) = hpke::setup_sender::<AesGcm256, HkdfSha256, Kem, _>(
        &hpke::OpModeS::Base,
        &pk,
        &info_for(key_id),
        &mut OsRng,
    )
    .map_err(|_| KeyError::Unwrap)?;
    let mut body = data_key.to_vec();
    let tag = ctx
        .seal_in_place_detached(&mut body, &[])
        .map_err(|_| KeyError::Unwrap)?;
    body.extend_from_slice(&tag.to_bytes());
    let mut enc = [0u8; ENC_LEN];
    enc.copy_from_slice(&encapped.to_bytes());
    Ok((enc, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_unwrap() {
        let k = EphemeralKey::generate();
        let dk = [42u8; 32];
        let (enc, wrapped) = wrap_data_key(&k.public_bytes(), &dk, "key-1").unwrap();
        let got = k.unwrap_data_key(&enc, &wrapped, "key-1").unwrap();
        assert_eq!(&got[..], &dk);
    }

    #[test]
    fn wrong_key_id_or_recipient_or_tamper() {
        let k = EphemeralKey::generate();
        let other = EphemeralKey::generate();
        let (enc, wrapped) = wrap_data_key(&k.public_bytes(), &[1u8; 32], "key-1").unwrap();
        assert!(matches!(
            k.unwrap_data_key(&enc, &wrapped, "key-2"),
            Err(KeyError::Unwrap)
        ));
        assert!(matches!(
            other.unwrap_data_key(&enc, &wrapped, "key-1"),
            Err(KeyError::Unwrap)
        ));
        let mut bad = wrapped.clone();
        bad[3] ^= 1;
        assert!(matches!(
            k.unwrap_data_key(&enc, &bad, "key-1"),
            Err(KeyError::Unwrap)
        ));
        assert!(matches!(
            k.unwrap_data_key(&enc[..31], &wrapped, "key-1"),
            Err(KeyError::Format(_))
        ));
        assert!(matches!(
            k.unwrap_data_key(&enc, &wrapped[..40], "key-1"),
            Err(KeyError::Format(_))
        ));
    }

    #[test]
    fn fresh_keys_differ() {
        assert_ne!(
            EphemeralKey::generate().public_bytes(),
            EphemeralKey::generate().public_bytes()
        );
    }
}
