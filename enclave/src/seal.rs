//! AES-256-GCM unsealing of the program container (docs/bundle.md, "private.sealed").
//!
//! ```text
//! offset 0    8 bytes    magic b"ENCSEAL1"
//! offset 8    12 bytes   AES-GCM nonce
//! offset 20   rest       ciphertext ‖ 16-byte tag
//! ```
//!
//! The associated data is the canonical JSON of the manifest without its `integrity`
//! object. The ciphertext is decrypted *in place* inside a [`SecretBuf`], so the
//! plaintext never exists outside secret memory. The AES-GCM is ring's: it
//! authenticates and decrypts in one pass (its AES-NI/VAES + CLMUL assembly is several
//! times faster than a verify-then-decrypt pass pair), and when the tag does not verify
//! it zeroes the buffer before it returns the error, so no plaintext is left behind.

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use serde_json::Value;
use std::fmt;
use std::ops::Range;

use crate::secmem::SecretBuf;

pub const MAGIC: &[u8; 8] = b"ENCSEAL1";
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
pub const HEADER_LEN: usize = MAGIC.len() + NONCE_LEN;
/// Smallest valid sealed file: header + tag (empty plaintext).
pub const MIN_SEALED_LEN: usize = HEADER_LEN + TAG_LEN;

#[derive(Debug)]
pub enum SealError {
    /// The sealed bytes are not an ENCSEAL1 file.
    Format(String),
    /// The manifest is not valid JSON / not canonicalisable.
    Manifest(String),
    /// The GCM tag did not verify: wrong key, or manifest or sealed file changed.
    Authentication,
    /// Secret memory could not be allocated.
    Memory(std::io::Error),
}

impl fmt::Display for SealError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SealError::Format(m) => write!(f, "sealed file is malformed: {m}"),
            SealError::Manifest(m) => write!(f, "manifest is invalid: {m}"),
            SealError::Authentication => write!(
                f,
                "authentication failed: the data key is wrong or the manifest or sealed file was modified"
            ),
            SealError::Memory(e) => write!(f, "cannot allocate secret memory: {e}"),
        }
    }
}

impl std::error::Error for SealError {}

fn check_no_floats(v: &Value, path: &str) -> Result<(), SealError> {
    match v {
        Value::Number(n) => {
            if n.is_f64() {
                Err(SealError::Manifest(format!(
                    "floating-point number at {path} (the authenticated manifest must contain none)"
                )))
            } else {
                Ok(())
            }
        }
        Value::Array(a) => a
            .iter()
            .enumerate()
            .try_for_each(|(i, x)| check_no_floats(x, &format!("{path}[{i}]"))),
        Value::Object(o) => o
            .iter()
            .try_for_each(|(k, x)| check_no_floats(x, &format!("{path}.{k}"))),
        _ => Ok(()),
    }
}

/// Parse manifest bytes and return `(parsed manifest, canonical AAD bytes)`.
///
/// The AAD is `serde_json::to_vec` of the manifest object without `integrity`
/// (serde_json's map is a BTreeMap, so keys come out sorted by code point, with no
/// whitespace). Floats are refused so number formatting cannot differ from Python.
pub fn canonical_manifest(manifest_json: &[u8]) -> Result<(Value, Vec<u8>), SealError> {
    let value: Value = serde_json::from_slice(manifest_json)
        .map_err(|e| SealError::Manifest(format!("not valid JSON: {e}")))?;
    let mut authed = value.clone();
    match authed.as_object_mut() {
        Some(obj) => {
            obj.remove("integrity");
        }
        None => return Err(SealError::Manifest("top level is not an object".into())),
    }
    check_no_floats(&authed, "$")?;
    let aad = serde_json::to_vec(&authed).map_err(|e| SealError::Manifest(e.to_string()))?;
    Ok((value, aad))
}

/// Check the sealed-file framing without decrypting.
pub fn check_format(sealed_len: usize, magic: &[u8]) -> Result<(), SealError> {
    if sealed_len < MIN_SEALED_LEN {
        return Err(SealError::Format(format!(
            "{sealed_len} bytes is shorter than the {MIN_SEALED_LEN}-byte minimum"
        )));
    }
    if magic.len() < MAGIC.len() || &magic[..MAGIC.len()] != MAGIC {
        return Err(SealError::Format("magic is not ENCSEAL1".into()));
    }
    Ok(())
}

/// AES-256-GCM-open `ct` in place with the detached `tag`. On failure `ct` is zeroed
/// (ring does it before it returns the error).
fn open_detached(
    key: &[u8],
    nonce: &[u8],
    aad: &[u8],
    ct: &mut [u8],
    tag: &[u8],
) -> Result<(), SealError> {
    if key.len() != 32 {
        return Err(SealError::Format("data key is not 32 bytes".into()));
    }
    let key = UnboundKey::new(&AES_256_GCM, key).map_err(|_| SealError::Authentication)?;
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Authentication)?;
    let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| SealError::Authentication)?;
    // The nonce is the sealer's, used once per data key (docs/bundle.md); opening
    // never reuses it for encryption.
    LessSafeKey::new(key)
        .open_in_place_separate_tag(nonce, Aad::from(aad), Tag::from(tag), ct, 0..)
        .map_err(|_| SealError::Authentication)?;
    Ok(())
}

/// Decrypt a whole sealed file that already sits in `buf` (typically a
/// [`SecretBuf<u8>`]) in place. Returns the byte range of the plaintext inside `buf`.
/// On error the buffer holds no plaintext.
pub fn unseal_in_place(buf: &mut [u8], aad: &[u8], key: &[u8]) -> Result<Range<usize>, SealError> {
    check_format(buf.len(), buf)?;
    let (header, body) = buf.split_at_mut(HEADER_LEN);
    let ct_len = body.len() - TAG_LEN;
    let (ct, tag) = body.split_at_mut(ct_len);
    open_detached(key, &header[MAGIC.len()..], aad, ct, tag)?;
    Ok(HEADER_LEN..HEADER_LEN + ct_len)
}

/// Bytes of room a [`Incoming`] leaves after the sealed file in its secret buffer
/// (so the program loader can move the container to align its tensor data).
pub const SLACK: usize = 64;

/// A sealed file being received, straight into the secret buffer its plaintext will
/// occupy (the ciphertext is not secret, but this way it is copied once and needs no
/// second, ordinary 21 MB buffer with page faults of its own).
///
/// Each fresh `memfd_secret` page costs a page fault that removes the page from the
/// kernel's direct map and flushes TLBs by IPI (~20 µs on a quiet 2-vCPU VM, 40–50 µs on
/// a loaded one; ~5300 of them for a 21 MB program): they are most of a start, and
/// nothing batches them from user space (`MAP_POPULATE` and `MADV_POPULATE_WRITE` do not
/// populate secretmem: the kernel refuses it to get_user_pages). So a helper thread
/// faults pages in from the *end* of the buffer down while the chunks arrive from the
/// start (faulting the pages they land on as they are copied in); the two meet in the
/// middle, and each page is faulted once. `Frontier` keeps them apart: the helper
/// never touches a page the receiver has claimed, nor the receiver one the helper is
/// touching.
pub struct Incoming {
    /// `None` only after `unseal` took it (or in drop).
    secret: Option<SecretBuf<u8>>,
    len: usize,
    frontier: std::sync::Arc<Frontier>,
    helper: Option<std::thread::JoinHandle<()>>,
}

/// Who may touch which pages of an [`Incoming`] buffer.
struct Frontier {
    state: std::sync::Mutex<Front>,
    touched: std::sync::Condvar,
}

struct Front {
    /// The receiver has claimed bytes `[0, claimed)`: the helper stays out of them.
    claimed: usize,
    /// The helper has faulted the pages from `low` to the end of the mapping.
    low: usize,
    /// The helper is touching the page at `low` right now.
    busy: bool,
    /// The helper is to stop (the buffer is going away).
    stop: bool,
}

impl Frontier {
    fn lock(&self) -> std::sync::MutexGuard<'_, Front> {
        // The helper never panics while holding the lock (it only does arithmetic).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The helper thread: fault pages in from the end of the mapping at `base` (where
/// `Front::low` starts) down until it meets the receiver's claim. `base` is a `*mut u8` passed as an address so the
/// closure is `Send`.
fn fault_from_end(base: usize, f: &Frontier) {
    let ps = crate::secmem::page_size();
    loop {
        let page = {
            let mut st = f.lock();
            match st.low.checked_sub(ps) {
                Some(p) if !st.stop && p >= st.claimed => {
                    st.low = p;
                    st.busy = true;
                    p
                }
                _ => return,
            }
        };
        // SAFETY: `page` is below the mapping's length (low starts there, page-aligned,
        // and only decreases), so the byte is inside the mapping, which `Incoming` keeps mapped
        // until this thread is joined (its Drop and `unseal` join first). No other
        // access to this page can happen now: the receiver only writes below
        // `claimed <= page`, and waits while `busy` covers a page it wants. The byte
        // is written back with its own value.
        unsafe {
            let b = (base as *mut u8).add(page);
            std::ptr::write_volatile(b, std::ptr::read_volatile(b));
        }
        f.lock().busy = false;
        f.touched.notify_all();
    }
}

impl Incoming {
    /// Start receiving a sealed file of `total` bytes.
    pub fn new(total: usize) -> std::io::Result<Incoming> {
        let size = total
            .checked_add(SLACK)
            .ok_or_else(|| std::io::Error::other("sealed file too large"))?;
        // Allocated here, on the handshake's thread, so that the backing it gets is
        // recorded (secmem's WEAKEST) before any later EVIDENCE reports it; only the
        // page faults go to the helper thread.
        let mut b = SecretBuf::<u8>::new(size)?;
        let (base, map_len) = (b.as_mut_ptr() as usize, b.mapped_bytes());
        let frontier = std::sync::Arc::new(Frontier {
            state: std::sync::Mutex::new(Front {
                claimed: 0,
                low: map_len,
                busy: false,
                stop: false,
            }),
            touched: std::sync::Condvar::new(),
        });
        let f = frontier.clone();
        let helper = std::thread::Builder::new()
            .name("enclave-prefault".into())
            .spawn(move || fault_from_end(base, &f))?;
        Ok(Incoming {
            secret: Some(b),
            len: total,
            frontier,
            helper: Some(helper),
        })
    }

    /// Size of the sealed file.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where the sealed bytes `range` go as they arrive (in order, for the helper to
    /// meet them, though any range is safe). Panics if `range` is outside the file.
    pub fn chunk_mut(&mut self, range: Range<usize>) -> &mut [u8] {
        assert!(range.start <= range.end && range.end <= self.len);
        {
            let mut st = self.frontier.lock();
            // Wait while the helper is touching a page this range covers.
            while st.busy && st.low < range.end {
                st = self
                    .frontier
                    .touched
                    .wait(st)
                    .unwrap_or_else(|e| e.into_inner());
            }
            st.claimed = st.claimed.max(range.end);
        }
        let buf = self.secret.as_mut().expect("present until unseal");
        // SAFETY: `range` lies inside the buffer (asserted; len <= its length). The
        // helper thread touches no byte below `claimed >= range.end` from now on and
        // is touching none of these pages (waited above), so this is the only access
        // to these bytes while the returned borrow of `self` lives.
        unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().add(range.start), range.len()) }
    }

    /// Stop the helper and wait for it (it then holds no pointer into the buffer).
    fn join_helper(&mut self) -> Result<(), SealError> {
        self.frontier.lock().stop = true;
        match self.helper.take() {
            Some(h) => h
                .join()
                .map_err(|_| SealError::Memory(std::io::Error::other("prefault thread panicked"))),
            None => Ok(()),
        }
    }

    /// Decrypt (see [`unseal_in_place`]) in the secret buffer. Returns the buffer and
    /// the plaintext's byte range in it ([`SLACK`] bytes free after it).
    pub fn unseal(
        mut self,
        aad: &[u8],
        key: &[u8],
    ) -> Result<(SecretBuf<u8>, Range<usize>), SealError> {
        self.join_helper()?;
        crate::worker::trace("unseal: the secret pages are faulted in (prefault thread joined)");
        let n = self.len;
        let mut buf = self.secret.take().expect("present until unseal");
        check_format(n, &buf[..n])?;
        let range = unseal_in_place(&mut buf[..n], aad, key)?;
        crate::worker::trace("unseal: tag verified, decrypted in place");
        Ok((buf, range))
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // Before the buffer is unmapped (it drops after this), no thread may point
        // into it. A helper that panicked has nothing left to wait for.
        let _ = self.join_helper();
    }
}

/// Unseal `sealed` into a fresh secret buffer holding exactly the plaintext.
pub fn unseal(sealed: &[u8], aad: &[u8], key: &[u8]) -> Result<SecretBuf<u8>, SealError> {
    check_format(sealed.len(), sealed)?;
    let ct_len = sealed.len() - MIN_SEALED_LEN;
    let mut out = SecretBuf::<u8>::new(ct_len).map_err(SealError::Memory)?;
    out.copy_from_slice(&sealed[HEADER_LEN..HEADER_LEN + ct_len]);
    open_detached(
        key,
        &sealed[MAGIC.len()..HEADER_LEN],
        aad,
        &mut out,
        &sealed[HEADER_LEN + ct_len..],
    )?;
    Ok(out)
}

/// Seal (for tests and tools; the enclave never seals).
#[cfg(test)]
pub fn seal_for_test(plain: &[u8], aad: &[u8], key: &[u8], nonce: &[u8; 12]) -> Vec<u8> {
    // RustCrypto's AES-GCM seals, ring's opens: the test also checks the two agree.
    use aes_gcm::aead::{AeadInPlace, KeyInit};
    let cipher = aes_gcm::Aes256Gcm::new_from_slice(key).unwrap();
    let mut body = plain.to_vec();
    let tag = cipher
        .encrypt_in_place_detached(aes_gcm::Nonce::from_slice(nonce), aad, &mut body)
        .unwrap();
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(nonce);
    out.extend_from_slice(&body);
    out.extend_from_slice(&tag);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7u8; 32];

    fn manifest() -> Vec<u8> {
        br#"{"version": 1, "format": "ennclave-bundle", "private": {"key_id": "k1", "shape": [null, 4]},
            "output_policy": {"mode": "full"}, "integrity": {"files": {"a": "00"}}}"#
            .to_vec()
    }

    #[test]
    fn canonical_sorts_and_drops_integrity() {
        let (_, aad) = canonical_manifest(&manifest()).unwrap();
        assert_eq!(
            std::str::from_utf8(&aad).unwrap(),
            r#"{"format":"ennclave-bundle","output_policy":{"mode":"full"},"private":{"key_id":"k1","shape":[null,4]},"version":1}"#
        );
    }

    #[test]
    fn canonical_escapes_like_python() {
        let (_, aad) =
            canonical_manifest("{\"b\":\"é\\u0001\\n\\\"\",\"a\":[]}".as_bytes()).unwrap();
        assert_eq!(
            std::str::from_utf8(&aad).unwrap(),
            "{\"a\":[],\"b\":\"é\\u0001\\n\\\"\"}"
        );
    }

    #[test]
    fn canonical_refuses_floats() {
        assert!(canonical_manifest(br#"{"a": 1.5}"#).is_err());
        assert!(canonical_manifest(br#"{"integrity": 1.5, "a": 1}"#).is_ok());
        assert!(canonical_manifest(br#"[1]"#).is_err());
        assert!(canonical_manifest(b"not json").is_err());
    }

    #[test]
    fn round_trip_and_in_place() {
        let (_, aad) = canonical_manifest(&manifest()).unwrap();
        let sealed = seal_for_test(b"ENCPROG1 hello", &aad, &KEY, &[1; 12]);
        let out = unseal(&sealed, &aad, &KEY).unwrap();
        assert_eq!(&out[..], b"ENCPROG1 hello");
        let mut buf = SecretBuf::<u8>::new(sealed.len()).unwrap();
        buf.copy_from_slice(&sealed);
        let r = unseal_in_place(&mut buf, &aad, &KEY).unwrap();
        assert_eq!(&buf[r], b"ENCPROG1 hello");
    }

    #[test]
    fn tamper_detected() {
        let (_, aad) = canonical_manifest(&manifest()).unwrap();
        let sealed = seal_for_test(b"secret weights", &aad, &KEY, &[1; 12]);
        // Flip every byte position once.
        for i in 8..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(matches!(
                unseal(&bad, &aad, &KEY),
                Err(SealError::Authentication)
            ));
        }
        // Changed manifest (policy) → different AAD.
        let m2 = String::from_utf8(manifest())
            .unwrap()
            .replace("full", "top_k");
        let (_, aad2) = canonical_manifest(m2.as_bytes()).unwrap();
        assert!(matches!(
            unseal(&sealed, &aad2, &KEY),
            Err(SealError::Authentication)
        ));
        // Changing only `integrity` does not change the AAD.
        let m3 = String::from_utf8(manifest())
            .unwrap()
            .replace("\"00\"", "\"11\"");
        let (_, aad3) = canonical_manifest(m3.as_bytes()).unwrap();
        assert!(unseal(&sealed, &aad3, &KEY).is_ok());
        // Wrong key.
        assert!(matches!(
            unseal(&sealed, &aad, &[8u8; 32]),
            Err(SealError::Authentication)
        ));
        // Wrong magic / truncated.
        let mut bad = sealed.clone();
        bad[0] = b'X';
        assert!(matches!(
            unseal(&bad, &aad, &KEY),
            Err(SealError::Format(_))
        ));
        assert!(matches!(
            unseal(&sealed[..20], &aad, &KEY),
            Err(SealError::Format(_))
        ));
    }

    #[test]
    fn incoming_receives_while_the_helper_faults() {
        let (_, aad) = canonical_manifest(&manifest()).unwrap();
        // Large enough (1 MiB, 256 pages) that the receiver and the helper meet.
        let plain: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
        let sealed = seal_for_test(&plain, &aad, &KEY, &[5; 12]);
        for chunk in [1usize, 4093, 65536, sealed.len()] {
            let mut inc = Incoming::new(sealed.len()).unwrap();
            let mut at = 0;
            while at < sealed.len() {
                let end = (at + chunk).min(sealed.len());
                inc.chunk_mut(at..end).copy_from_slice(&sealed[at..end]);
                at = end;
            }
            let (buf, r) = inc.unseal(&aad, &KEY).unwrap();
            assert_eq!(&buf[r.clone()], &plain[..], "chunk {chunk}");
            assert!(buf.len() >= r.end + SLACK);
        }
        // Dropped half-received (a failed handshake): the helper is stopped and joined.
        let mut inc = Incoming::new(sealed.len()).unwrap();
        inc.chunk_mut(0..100).copy_from_slice(&sealed[..100]);
        drop(inc);
        // A changed byte still fails authentication.
        let mut inc = Incoming::new(sealed.len()).unwrap();
        inc.chunk_mut(0..sealed.len()).copy_from_slice(&sealed);
        inc.chunk_mut(500..501)[0] ^= 1;
        assert!(matches!(
            inc.unseal(&aad, &KEY),
            Err(SealError::Authentication)
        ));
    }

    #[test]
    fn failed_in_place_leaves_no_plaintext() {
        let (_, aad) = canonical_manifest(&manifest()).unwrap();
        let plain = b"very secret weights!";
        let sealed = seal_for_test(plain, &aad, &KEY, &[3; 12]);
        let mut buf = sealed.clone();
        assert!(unseal_in_place(&mut buf, &aad, &[9u8; 32]).is_err());
        assert!(!buf.windows(plain.len()).any(|w| w == plain));
        // The right key but a changed tag: the one-pass open has decrypted the body
        // before the tag check fails, so the body must have been wiped.
        let mut buf = sealed.clone();
        *buf.last_mut().unwrap() ^= 1;
        assert!(matches!(
            unseal_in_place(&mut buf, &aad, &KEY),
            Err(SealError::Authentication)
        ));
        assert!(!buf.windows(plain.len()).any(|w| w == plain));
        assert!(buf[HEADER_LEN..buf.len() - TAG_LEN].iter().all(|&b| b == 0));
    }
}
