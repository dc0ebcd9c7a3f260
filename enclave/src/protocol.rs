//! Host ⇄ worker protocol (docs/worker-protocol.md).
//!
//! Control frames travel over an inherited `AF_UNIX` stream socket:
//!
//! ```text
//! u32 LE  length L of what follows (1 ..= MAX_FRAME)
//! u8      message type
//! L-1     payload (fields little-endian; bytes/strings as u32 LE length + data)
//! ```
//!
//! Tensors and the sealed program never go through the socket: they go through a
//! shared-memory region (a memfd created by the host and inherited by the worker),
//! see [`Shm`]. After READY, requests and answers can also skip the socket: see
//! [`doorbell`]. The decoder never panics on any input (fuzzed with proptest).

use std::fmt;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::Duration;

/// 3: EVIDENCE carries the worker's protections, bound into its evidence hash.
/// 4: the worker says on the doorbell when it may sleep (`doorbell::WORKER_SLEEPS`),
/// and the host wakes it only then.
pub const PROTOCOL_VERSION: u32 = 4;
/// Upper bound on one control frame (type byte + payload). Manifests are the largest.
pub const MAX_FRAME: usize = 1 << 20;

/// Error codes carried by [`Msg::Error`].
pub mod code {
    pub const BAD_REQUEST: u16 = 1;
    pub const BAD_INPUT_SIZE: u16 = 2;
    pub const NONFINITE_INPUT: u16 = 3;
    pub const BUDGET_EXHAUSTED: u16 = 4;
    pub const AUTHENTICATION: u16 = 5;
    pub const KEY: u16 = 6;
    pub const PROGRAM: u16 = 7;
    pub const PROTOCOL: u16 = 8;
    pub const INTERNAL: u16 = 9;
    pub const MANIFEST: u16 = 10;
    pub const SANDBOX: u16 = 11;
    /// The licence expired (non-fatal at INFER; fatal when already expired at start).
    pub const LICENCE_EXPIRED: u16 = 12;
    /// No licence where one is required, or a forged / mismatched licence or offline cache.
    pub const LICENCE_INVALID: u16 = 13;
}

/// INFER flag: the caller allows NaN / ±Inf in the input.
pub const INFER_ALLOW_NONFINITE: u32 = 1;

/// After READY, the first [`doorbell::BYTES`] bytes of the shared region are the
/// doorbell block: the host posts an INFER there and the worker answers there, with
/// no socket frame either way (docs/worker-protocol.md, "Doorbell"). Byte offsets of
/// its little-endian fields; each group has its own cache line.
pub mod doorbell {
    /// u32, host: the request's sequence number, stored after batch and flags.
    pub const REQ_SEQ: usize = 0;
    /// u32, host: samples in the request (at the READY's `in_offset`).
    pub const REQ_BATCH: usize = 4;
    /// u32, host: INFER flags.
    pub const REQ_FLAGS: usize = 8;
    /// u64, host: `seq << 32 | n` once the first n input floats of request `seq` are
    /// in place. The host may post a request first and copy its input in afterwards,
    /// chunk by chunk, so the worker copies each chunk while the next is written; it
    /// rings `EVENTS` after announcing the whole input. Until then it sends nothing
    /// else (a frame fails the request).
    pub const REQ_PROGRESS: usize = 16;
    /// u32, worker: the sequence number answered, stored after the fields below.
    pub const ANS_SEQ: usize = 64;
    /// u32, worker: [`STATUS_OK`], or [`STATUS_ERROR`] with an ERROR frame on the socket.
    pub const ANS_STATUS: usize = 68;
    /// u32, worker: samples answered.
    pub const ANS_BATCH: usize = 72;
    /// u32, worker: values per output sample.
    pub const ANS_OUT_LEN: usize = 76;
    /// u64, worker: queries left (2⁶⁴−1 = unlimited).
    pub const ANS_LEFT: usize = 80;
    /// u64, worker: `seq << 32 | n` once the first n output floats of request `seq`
    /// are in place, raised chunk by chunk while the output is written (full-output
    /// policy only), so the host can copy them out while the rest is written.
    pub const ANS_PROGRESS: usize = 88;
    /// Floats per progress step (16 KiB).
    pub const PROGRESS_CHUNK: usize = 4096;
    /// u32, host: bumped after every request's whole input and every frame the host
    /// sends; the idle worker sleeps on it (futex) and the host wakes it.
    pub const EVENTS: usize = 128;
    /// u32, worker: 1 from just before it may sleep on `EVENTS` until it is awake
    /// again. The host wakes `EVENTS` only when it reads 1 here after its bump (each
    /// side fences between its store and its load, so one of them sees the other's):
    /// a worker that is still polling costs the host no system call.
    pub const WORKER_SLEEPS: usize = 132;
    /// Size of the block; inputs start after it.
    pub const BYTES: usize = 256;
    pub const STATUS_OK: u32 = 0;
    pub const STATUS_ERROR: u32 = 1;
}

/// Sleep while `word` still holds `expected`, for at most `timeout`; returns early
/// when another process wakes the word (or spuriously). A shared futex (no
/// FUTEX_PRIVATE_FLAG): the word lives in memory shared with the host.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a live, aligned u32; `ts` outlives the call; the kernel only
    // reads both. Any result (woken, timed out, value already changed, EINTR) is
    // fine: the caller re-reads the word.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wake whoever sleeps on `word` in [`futex_wait`] (or the host's equivalent).
pub fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a live, aligned u32; FUTEX_WAKE only uses its address.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    // worker → host
    Hello {
        version: u32,
        pubkey: [u8; 32],
        binary_sha256: [u8; 32],
        secmem: String,
        /// `native`, `gramine-direct` or `gramine-sgx` (platform.rs). Sent only when
        /// not `native`, as a trailing string, so a native HELLO is unchanged.
        platform: String,
    },
    Evidence {
        nonce: [u8; 32],
        kind: String,
        report: Vec<u8>,
        /// What protects this worker's secrets (canonical JSON, handshake.rs
        /// `protections`); its SHA-256 is part of the evidence hash.
        protections: String,
    },
    ChunkOk {
        received: u64,
    },
    Ready {
        max_batch: u32,
        in_len: u32,
        out_len: u32,
        in_offset: u64,
        out_offset: u64,
        secmem: String,
        policy: String,
    },
    Result {
        batch: u32,
        out_len: u32,
        queries_left: u64,
    },
    Pong {
        nonce: u64,
        queries_used: u64,
    },
    Bye,
    /// After SHUTDOWN, before BYE, under a metered licence: the final usage report
    /// (`licence::UsageSigner`); the worker answers nothing more after it.
    Usage {
        report: Vec<u8>,
        mac: [u8; 32],
    },
    /// An offline key cache sealed by the worker (licence with `offline: true`).
    KeyCache {
        key_id: String,
        blob: Vec<u8>,
    },
    Error {
        code: u16,
        fatal: bool,
        message: String,
    },
    // host → worker
    Challenge {
        nonce: [u8; 32],
    },
    Manifest {
        bytes: Vec<u8>,
    },
    SealedBegin {
        total_len: u64,
    },
    SealedChunk {
        len: u32,
    },
    Key {
        key_id: String,
        enc: [u8; 32],
        wrapped: Vec<u8>,
    },
    /// The key server's licence and its MAC; before KEY.
    Licence {
        licence: Vec<u8>,
        mac: [u8; 32],
    },
    /// Instead of KEY (and LICENCE): an offline key cache from an earlier KEY_CACHE.
    CachedKey {
        key_id: String,
        blob: Vec<u8>,
    },
    Infer {
        batch: u32,
        flags: u32,
    },
    Ping {
        nonce: u64,
    },
    Shutdown,
}

pub mod ty {
    pub const HELLO: u8 = 0x01;
    pub const CHALLENGE: u8 = 0x02;
    pub const EVIDENCE: u8 = 0x03;
    pub const MANIFEST: u8 = 0x10;
    pub const SEALED_BEGIN: u8 = 0x11;
    pub const SEALED_CHUNK: u8 = 0x12;
    pub const CHUNK_OK: u8 = 0x13;
    pub const KEY: u8 = 0x14;
    pub const READY: u8 = 0x15;
    pub const LICENCE: u8 = 0x16;
    pub const KEY_CACHE: u8 = 0x17;
    pub const CACHED_KEY: u8 = 0x18;
    pub const INFER: u8 = 0x20;
    pub const RESULT: u8 = 0x21;
    pub const PING: u8 = 0x22;
    pub const PONG: u8 = 0x23;
    pub const USAGE: u8 = 0x2D;
    pub const SHUTDOWN: u8 = 0x2E;
    pub const BYE: u8 = 0x2F;
    pub const ERROR: u8 = 0x7F;
}

#[derive(Debug)]
pub enum ProtoError {
    Io(io::Error),
    /// Peer closed the connection at a frame boundary.
    Closed,
    Malformed(String),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::Io(e) => write!(f, "control channel I/O error: {e}"),
            ProtoError::Closed => write!(f, "control channel closed by the peer"),
            ProtoError::Malformed(m) => write!(f, "malformed frame: {m}"),
        }
    }
}

impl std::error::Error for ProtoError {}

impl From<io::Error> for ProtoError {
    fn from(e: io::Error) -> Self {
        ProtoError::Io(e)
    }
}

fn bad<T>(m: &str) -> Result<T, ProtoError> {
    Err(ProtoError::Malformed(m.to_string()))
}

struct Cur<'a> {
    b: &'a [u8],
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if n > self.b.len() {
            return bad("payload too short");
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn arr32(&mut self) -> Result<[u8; 32], ProtoError> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }
    fn bytes(&mut self) -> Result<Vec<u8>, ProtoError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn string(&mut self) -> Result<String, ProtoError> {
        String::from_utf8(self.bytes()?).or_else(|_| bad("string is not UTF-8"))
    }
    fn bool(&mut self) -> Result<bool, ProtoError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => bad("bool is not 0 or 1"),
        }
    }
    fn end(&self) -> Result<(), ProtoError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            bad("trailing bytes after payload")
        }
    }
}

struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn raw(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.raw(v);
    }
}

impl Msg {
    pub fn type_byte(&self) -> u8 {
        match self {
            Msg::Hello { .. } => ty::HELLO,
            Msg::Challenge { .. } => ty::CHALLENGE,
            Msg::Evidence { .. } => ty::EVIDENCE,
            Msg::Manifest { .. } => ty::MANIFEST,
            Msg::SealedBegin { .. } => ty::SEALED_BEGIN,
            Msg::SealedChunk { .. } => ty::SEALED_CHUNK,
            Msg::ChunkOk { .. } => ty::CHUNK_OK,
            Msg::Key { .. } => ty::KEY,
            Msg::Ready { .. } => ty::READY,
            Msg::Licence { .. } => ty::LICENCE,
            Msg::KeyCache { .. } => ty::KEY_CACHE,
            Msg::CachedKey { .. } => ty::CACHED_KEY,
            Msg::Infer { .. } => ty::INFER,
            Msg::Result { .. } => ty::RESULT,
            Msg::Ping { .. } => ty::PING,
            Msg::Pong { .. } => ty::PONG,
            Msg::Usage { .. } => ty::USAGE,
            Msg::Shutdown => ty::SHUTDOWN,
            Msg::Bye => ty::BYE,
            Msg::Error { .. } => ty::ERROR,
        }
    }

    /// Encode to a complete frame (length prefix included).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc(vec![0, 0, 0, 0, self.type_byte()]);
        match self {
            Msg::Hello {
                version,
                pubkey,
                binary_sha256,
                secmem,
                platform,
            } => {
                e.u32(*version);
                e.raw(pubkey);
                e.raw(binary_sha256);
                e.bytes(secmem.as_bytes());
                if platform != "native" {
                    e.bytes(platform.as_bytes());
                }
            }
            Msg::Challenge { nonce } => e.raw(nonce),
            Msg::Evidence {
                nonce,
                kind,
                report,
                protections,
            } => {
                e.raw(nonce);
                e.bytes(kind.as_bytes());
                e.bytes(report);
                e.bytes(protections.as_bytes());
            }
            Msg::Manifest { bytes } => e.bytes(bytes),
            Msg::SealedBegin { total_len } => e.u64(*total_len),
            Msg::SealedChunk { len } => e.u32(*len),
            Msg::ChunkOk { received } => e.u64(*received),
            Msg::Key {
                key_id,
                enc,
                wrapped,
            } => {
                e.bytes(key_id.as_bytes());
                e.raw(enc);
                e.bytes(wrapped);
            }
            Msg::Ready {
                max_batch,
                in_len,
                out_len,
                in_offset,
                out_offset,
                secmem,
                policy,
            } => {
                e.u32(*max_batch);
                e.u32(*in_len);
                e.u32(*out_len);
                e.u64(*in_offset);
                e.u64(*out_offset);
                e.bytes(secmem.as_bytes());
                e.bytes(policy.as_bytes());
            }
            Msg::Licence { licence, mac }
            | Msg::Usage {
                report: licence,
                mac,
            } => {
                e.bytes(licence);
                e.raw(mac);
            }
            Msg::KeyCache { key_id, blob } | Msg::CachedKey { key_id, blob } => {
                e.bytes(key_id.as_bytes());
                e.bytes(blob);
            }
            Msg::Infer { batch, flags } => {
                e.u32(*batch);
                e.u32(*flags);
            }
            Msg::Result {
                batch,
                out_len,
                queries_left,
            } => {
                e.u32(*batch);
                e.u32(*out_len);
                e.u64(*queries_left);
            }
            Msg::Ping { nonce } => e.u64(*nonce),
            Msg::Pong {
                nonce,
                queries_used,
            } => {
                e.u64(*nonce);
                e.u64(*queries_used);
            }
            Msg::Shutdown | Msg::Bye => {}
            Msg::Error {
                code,
                fatal,
                message,
            } => {
                e.u16(*code);
                e.u8(*fatal as u8);
                e.bytes(message.as_bytes());
            }
        }
        let len = (e.0.len() - 4) as u32;
        e.0[..4].copy_from_slice(&len.to_le_bytes());
        e.0
    }

    /// Decode a frame body (type byte + payload, without the length prefix).
    pub fn decode(body: &[u8]) -> Result<Msg, ProtoError> {
        let (&t, payload) = match body.split_first() {
            Some(x) => x,
            None => return bad("empty frame"),
        };
        let mut c = Cur { b: payload };
        let m = match t {
            ty::HELLO => Msg::Hello {
                version: c.u32()?,
                pubkey: c.arr32()?,
                binary_sha256: c.arr32()?,
                secmem: c.string()?,
                platform: if c.b.is_empty() {
                    "native".into()
                } else {
                    c.string()?
                },
            },
            ty::CHALLENGE => Msg::Challenge { nonce: c.arr32()? },
            ty::EVIDENCE => Msg::Evidence {
                nonce: c.arr32()?,
                kind: c.string()?,
                report: c.bytes()?,
                protections: c.string()?,
            },
            ty::MANIFEST => Msg::Manifest { bytes: c.bytes()? },
            ty::SEALED_BEGIN => Msg::SealedBegin {
                total_len: c.u64()?,
            },
            ty::SEALED_CHUNK => Msg::SealedChunk { len: c.u32()? },
            ty::CHUNK_OK => Msg::ChunkOk { received: c.u64()? },
            ty::KEY => Msg::Key {
                key_id: c.string()?,
                enc: c.arr32()?,
                wrapped: c.bytes()?,
            },
            ty::READY => Msg::Ready {
                max_batch: c.u32()?,
                in_len: c.u32()?,
                out_len: c.u32()?,
                in_offset: c.u64()?,
                out_offset: c.u64()?,
                secmem: c.string()?,
                policy: c.string()?,
            },
            ty::LICENCE => Msg::Licence {
                licence: c.bytes()?,
                mac: c.arr32()?,
            },
            ty::KEY_CACHE => Msg::KeyCache {
                key_id: c.string()?,
                blob: c.bytes()?,
            },
            ty::CACHED_KEY => Msg::CachedKey {
                key_id: c.string()?,
                blob: c.bytes()?,
            },
            ty::INFER => Msg::Infer {
                batch: c.u32()?,
                flags: c.u32()?,
            },
            ty::RESULT => Msg::Result {
                batch: c.u32()?,
                out_len: c.u32()?,
                queries_left: c.u64()?,
            },
            ty::PING => Msg::Ping { nonce: c.u64()? },
            ty::PONG => Msg::Pong {
                nonce: c.u64()?,
                queries_used: c.u64()?,
            },
            ty::USAGE => Msg::Usage {
                report: c.bytes()?,
                mac: c.arr32()?,
            },
            ty::SHUTDOWN => Msg::Shutdown,
            ty::BYE => Msg::Bye,
            ty::ERROR => Msg::Error {
                code: c.u16()?,
                fatal: c.bool()?,
                message: c.string()?,
            },
            _ => {
                return Err(ProtoError::Malformed(format!(
                    "unknown message type 0x{t:02x}"
                )))
            }
        };
        c.end()?;
        Ok(m)
    }
}

/// Parse one frame from the front of `buf`. Returns the message and the number of
/// bytes consumed, or `Ok(None)` if `buf` does not yet hold a whole frame.
pub fn parse_frame(buf: &[u8]) -> Result<Option<(Msg, usize)>, ProtoError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(ProtoError::Malformed(format!(
            "frame length {len} out of range"
        )));
    }
    if buf.len() - 4 < len {
        return Ok(None);
    }
    Ok(Some((Msg::decode(&buf[4..4 + len])?, 4 + len)))
}

/// Read one frame (blocking).
pub fn read_msg<R: Read>(r: &mut R) -> Result<Msg, ProtoError> {
    let mut hdr = [0u8; 4];
    // Distinguish a clean close (EOF before any byte) from a torn frame.
    let mut got = 0;
    while got < 4 {
        match r.read(&mut hdr[got..]) {
            Ok(0) if got == 0 => return Err(ProtoError::Closed),
            Ok(0) => return bad("connection closed inside a frame header"),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes(hdr) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(ProtoError::Malformed(format!(
            "frame length {len} out of range"
        )));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Msg::decode(&body)
}

/// Reads frames with as few `read` calls as possible: a small frame (INFER, PING…)
/// usually arrives in one. Bytes past the frame are kept for the next call.
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameReader {
    pub fn new() -> Self {
        FrameReader {
            buf: vec![0; 4096],
            start: 0,
            end: 0,
        }
    }

    /// Whether bytes of a next frame are already buffered.
    pub fn has_buffered(&self) -> bool {
        self.end > self.start
    }

    /// Read one frame (blocking). Same errors as [`read_msg`].
    pub fn read<R: Read>(&mut self, r: &mut R) -> Result<Msg, ProtoError> {
        loop {
            if let Some((m, used)) = parse_frame(&self.buf[self.start..self.end])? {
                self.start += used;
                if self.start == self.end {
                    self.start = 0;
                    self.end = 0;
                }
                return Ok(m);
            }
            // Make room: move what we have to the front, grow up to one whole frame.
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                let want = if self.end >= 4 {
                    let h = [self.buf[0], self.buf[1], self.buf[2], self.buf[3]];
                    4 + u32::from_le_bytes(h) as usize // ≤ 4 + MAX_FRAME (parse_frame checked)
                } else {
                    self.buf.len() * 2
                };
                self.buf.resize(want.max(self.buf.len() + 1), 0);
            }
            match r.read(&mut self.buf[self.end..]) {
                Ok(0) if self.end == 0 => return Err(ProtoError::Closed),
                Ok(0) => return bad("connection closed inside a frame"),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

pub fn write_msg<W: Write>(w: &mut W, m: &Msg) -> Result<(), ProtoError> {
    let f = m.encode();
    if f.len() - 4 > MAX_FRAME {
        return bad("frame too large to send");
    }
    w.write_all(&f)?;
    w.flush()?;
    Ok(())
}

/// Write back and invalidate every cache line that `p..p + n` touches, on every core
/// (x86-64; nothing elsewhere). Uses `clflushopt` where the CPU has it, then one
/// `sfence`, else `clflush`: on an Intel Xeon VM `clflush` cost about 126 ns a line
/// and `clflushopt` about 7, on an AMD EPYC VM both about 2.4
/// (`cargo run --release --example evict_cost`). The bytes stay as they are.
///
/// # Safety
/// `p..p + n` must lie inside one live mapping.
pub unsafe fn flush_lines(p: *const u8, n: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS_CLFLUSHOPT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        // CPUID leaf 7, EBX bit 23.
        let opt = *HAS_CLFLUSHOPT
            .get_or_init(|| std::arch::x86_64::__cpuid_count(7, 0).ebx & (1 << 23) != 0);
        // Line boundaries: the first line starts at most 63 bytes before p, in p's
        // page (pages are line-aligned), so every flushed address is mapped.
        let first = p as usize & !63;
        for line in (first..p as usize + n).step_by(64) {
            let a = line as *const u8;
            // SAFETY: `a` is a mapped address (above and the caller's contract). Both
            // instructions write the line back and invalidate it without changing it;
            // clflushopt exists on this CPU (CPUID checked).
            unsafe {
                if opt {
                    std::arch::asm!("clflushopt [{0}]", in(reg) a, options(nostack, preserves_flags));
                } else {
                    std::arch::x86_64::_mm_clflush(a);
                }
            }
        }
        if opt {
            // Orders the weakly ordered clflushopts before what follows.
            std::arch::x86_64::_mm_sfence();
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, n);
}

/// Whether evicting a finished request's bytes ([`Shm::evict`]) pays on this CPU.
/// Measured with `cargo run --release --example transfer_floor` (the round trip's
/// copies between two threads) and in the full host↔worker round trip:
/// * AMD EPYC VM with AVX-512 (Zen 4 class): yes. Floor 19 µs with eviction, 33–39
///   without (31–37 and up to 125 in the VM's slow periods); round trip 28 vs 39 µs (32
///   vs 126 in a slow period).
/// * AMD EPYC VM without AVX-512 (Zen 3, family 25 model 1): no. Floor 33–38 µs with
///   eviction, 14.5–19.6 without; round trip (`benchmarks/ab_workers.py DIR EVICT
///   NOEVICT --bundle identity`) 57.9 vs 40.7 µs median.
/// * Intel Xeon VM: no. Floor 38–40 µs with eviction (with `clflushopt`; ten times
///   worse with `clflush`), 27–30 without; round trip 46 vs 37 µs. Its cores hand each
///   other modified lines quickly.
///
/// So: AMD CPUs with AVX-512 (Zen 4 and later, as far as measured). Other CPUs are
/// untested: no eviction.
pub fn eviction_pays() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let v = std::arch::x86_64::__cpuid(0);
        let mut vendor = [0u8; 12];
        vendor[..4].copy_from_slice(&v.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&v.edx.to_le_bytes());
        vendor[8..].copy_from_slice(&v.ecx.to_le_bytes());
        &vendor == b"AuthenticAMD" && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The shared-memory region (a host-created memfd, mapped `MAP_SHARED` by both).
///
/// The host can write to it at any time, so the worker never hands out references
/// into it: data is copied in and out through bounds-checked raw copies, and inputs
/// are validated only after they have been copied into private memory (no
/// check-then-use races).
pub struct Shm {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: Shm only ever accesses the mapping through bounds-checked byte copies.
unsafe impl Send for Shm {}
// SAFETY: every method takes &self and only copies bytes in or out through raw
// pointers; the region is shared with another process that may write at any time, so
// callers already treat its contents as racy and validate only private copies.
unsafe impl Sync for Shm {}

impl Shm {
    /// Map the whole memfd `fd` (its size from fstat). Takes ownership of `fd`.
    pub fn map_fd(fd: libc::c_int) -> io::Result<Shm> {
        // SAFETY: fstat writes into the zeroed struct we pass; fd validity is checked
        // by the kernel (EBADF).
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if (st.st_mode & libc::S_IFMT) != libc::S_IFREG || st.st_size <= 0 {
            return Err(io::Error::other(
                "shared-memory fd is not a non-empty regular file",
            ));
        }
        Shm::map_fd_len(fd, st.st_size as usize)
    }

    /// Map the first `len` bytes of `fd` (a file of at least that size: under Gramine,
    /// whose `untrusted_shm` files do not report their size, the host gives it).
    /// Takes ownership of `fd`.
    pub fn map_fd_len(fd: libc::c_int, len: usize) -> io::Result<Shm> {
        if len == 0 {
            // SAFETY: closing the fd we were given to own.
            unsafe { libc::close(fd) };
            return Err(io::Error::other("the shared-memory region is empty"));
        }
        // SAFETY: new shared mapping of a file we hold; the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        // SAFETY: the mapping keeps the file alive; closing our fd is harmless.
        unsafe { libc::close(fd) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Shm {
            ptr: ptr as *mut u8,
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: usize, n: usize) -> io::Result<()> {
        match offset.checked_add(n) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(io::Error::other("access outside the shared-memory region")),
        }
    }

    /// Copy `dst.len()` bytes from the region at `offset` into private memory.
    pub fn read_into(&self, offset: usize, dst: &mut [u8]) -> io::Result<()> {
        self.check(offset, dst.len())?;
        // SAFETY: bounds checked above; dst is private memory that cannot overlap the
        // mapping. Concurrent host writes can only change the bytes we copy, which is
        // why callers validate the copy, never the region.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copy f32 values out of the region (native = little-endian layout).
    pub fn read_f32(&self, offset: usize, dst: &mut [f32]) -> io::Result<()> {
        let n = std::mem::size_of_val(dst);
        self.check(offset, n)?;
        // SAFETY: as in read_into; any bit pattern is a valid f32.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.add(offset), dst.as_mut_ptr() as *mut u8, n)
        };
        Ok(())
    }

    /// Drop `offset..offset + n` of the region from every CPU cache (see
    /// [`flush_lines`]). Called on the bytes of a finished request, while the host
    /// prepares the next one: the host then writes the next input into lines that no
    /// other core holds, instead of waiting for this core to give up its copy of each
    /// line in turn, and the worker's next output likewise. A pure performance hint:
    /// the bytes stay as they are.
    pub fn evict(&self, offset: usize, n: usize) -> io::Result<()> {
        self.check(offset, n)?;
        // SAFETY: offset..offset + n lies inside our mapping (checked above).
        unsafe { flush_lines(self.ptr.add(offset), n) };
        Ok(())
    }

    /// The u32 at `offset` (a multiple of 4) as an atomic shared with the host: the
    /// doorbell's sequence numbers. Other fields go through the byte copies.
    pub fn atomic_u32(&self, offset: usize) -> io::Result<&AtomicU32> {
        self.check(offset, 4)?;
        if !offset.is_multiple_of(4) {
            return Err(io::Error::other("misaligned shared-memory word"));
        }
        // SAFETY: in bounds (checked above) and 4-aligned (the mapping is
        // page-aligned); the reference borrows self, so the mapping outlives it.
        // AtomicU32 has u32's layout and is made for memory that others write
        // concurrently; the host only ever stores whole aligned u32 values.
        Ok(unsafe { &*(self.ptr.add(offset) as *const AtomicU32) })
    }

    /// The u64 at `offset` (a multiple of 8) as an atomic shared with the host: the
    /// doorbell's output progress, which only the worker writes.
    pub fn atomic_u64(&self, offset: usize) -> io::Result<&AtomicU64> {
        self.check(offset, 8)?;
        if !offset.is_multiple_of(8) {
            return Err(io::Error::other("misaligned shared-memory word"));
        }
        // SAFETY: as in atomic_u32, with u64's size and alignment.
        Ok(unsafe { &*(self.ptr.add(offset) as *const AtomicU64) })
    }

    /// Copy private bytes into the region at `offset`.
    pub fn write_bytes(&self, offset: usize, src: &[u8]) -> io::Result<()> {
        self.check(offset, src.len())?;
        // SAFETY: bounds checked; src is private memory, disjoint from the mapping.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(offset), src.len()) };
        Ok(())
    }

    pub fn write_f32(&self, offset: usize, src: &[f32]) -> io::Result<()> {
        let n = std::mem::size_of_val(src);
        self.check(offset, n)?;
        // SAFETY: bounds checked; src is private memory, disjoint from the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr() as *const u8, self.ptr.add(offset), n)
        };
        Ok(())
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in map_fd.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    /// A fresh shared region of `len` bytes (a memfd of our own).
    fn test_shm(len: libc::off_t) -> Shm {
        // SAFETY: a fresh memfd of ours, sized before Shm maps (and owns) it.
        let fd = unsafe { libc::memfd_create(c"shm-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: resizing our own fd.
        assert_eq!(unsafe { libc::ftruncate(fd, len) }, 0);
        Shm::map_fd(fd).unwrap()
    }

    #[test]
    fn shm_evict_keeps_bytes_and_checks_bounds() {
        let shm = test_shm(8192);
        let vals: Vec<f32> = (0..2048).map(|i| i as f32 * 0.5 - 7.0).collect();
        shm.write_f32(0, &vals).unwrap();
        for (off, n) in [
            (0, 8192),
            (3, 61),
            (64, 64),
            (100, 5000),
            (8191, 1),
            (4096, 0),
        ] {
            shm.evict(off, n).unwrap();
        }
        let mut back = vec![0f32; 2048];
        shm.read_f32(0, &mut back).unwrap();
        assert_eq!(back, vals);
        assert!(shm.evict(8000, 193).is_err());
        assert!(shm.evict(usize::MAX, 2).is_err());
    }

    #[test]
    fn shm_doorbell_words_are_shared_and_futex_wakes_the_sleeper() {
        use std::sync::atomic::Ordering;
        let shm = test_shm(4096);
        assert!(shm.atomic_u32(4094).is_err(), "out of bounds");
        assert!(shm.atomic_u32(6).is_err(), "misaligned");
        let ev = shm.atomic_u32(doorbell::EVENTS).unwrap();
        ev.store(7, Ordering::Release);
        let mut raw = [0u8; 4];
        shm.read_into(doorbell::EVENTS, &mut raw).unwrap();
        assert_eq!(u32::from_le_bytes(raw), 7);
        // A waiter on an unchanged word sleeps until woken, not until its timeout.
        let t = std::time::Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                while ev.load(Ordering::Acquire) == 7 {
                    futex_wait(ev, 7, Duration::from_secs(20));
                }
            });
            std::thread::sleep(Duration::from_millis(50));
            ev.store(8, Ordering::Release);
            futex_wake(ev);
        });
        assert!(t.elapsed() < Duration::from_secs(10), "the wake was lost");
        // An already-changed word returns at once.
        futex_wait(ev, 7, Duration::from_secs(20));
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    /// A native HELLO is byte for byte what it was before platforms existed: the
    /// platform goes on the wire only when it is not `native`.
    #[test]
    fn native_hello_has_no_platform_field() {
        let hello = |platform: &str| Msg::Hello {
            version: 2,
            pubkey: [1; 32],
            binary_sha256: [2; 32],
            secmem: "mlock".into(),
            platform: platform.into(),
        };
        let native = hello("native").encode();
        assert_eq!(native.len(), 4 + 1 + 4 + 32 + 32 + 4 + 5);
        let g = hello("gramine-direct").encode();
        assert_eq!(&g[9..native.len()], &native[9..]);
        assert_eq!(&g[native.len()..], b"\x0e\0\0\0gramine-direct");
        assert_eq!(parse_frame(&g).unwrap().unwrap().0, hello("gramine-direct"));
        assert_eq!(parse_frame(&native).unwrap().unwrap().0, hello("native"));
    }

    fn samples() -> Vec<Msg> {
        vec![
            Msg::Hello {
                version: 1,
                pubkey: [1; 32],
                binary_sha256: [2; 32],
                secmem: "memfd_secret".into(),
                platform: "native".into(),
            },
            Msg::Hello {
                version: 2,
                pubkey: [1; 32],
                binary_sha256: [2; 32],
                secmem: "mlock".into(),
                platform: "gramine-direct".into(),
            },
            Msg::Challenge { nonce: [3; 32] },
            Msg::Evidence {
                nonce: [3; 32],
                kind: "none".into(),
                report: vec![1, 2, 3],
                protections: r#"{"seccomp":true}"#.into(),
            },
            Msg::Manifest {
                bytes: b"{}".to_vec(),
            },
            Msg::SealedBegin { total_len: 1 << 40 },
            Msg::SealedChunk { len: 4096 },
            Msg::ChunkOk { received: 4096 },
            Msg::Key {
                key_id: "k".into(),
                enc: [4; 32],
                wrapped: vec![5; 48],
            },
            Msg::Ready {
                max_batch: 64,
                in_len: 512,
                out_len: 10,
                in_offset: 0,
                out_offset: 131072,
                secmem: "mlock".into(),
                policy: "full".into(),
            },
            Msg::Licence {
                licence: b"{}".to_vec(),
                mac: [6; 32],
            },
            Msg::KeyCache {
                key_id: "k".into(),
                blob: vec![7; 100],
            },
            Msg::CachedKey {
                key_id: "k".into(),
                blob: vec![8; 100],
            },
            Msg::Infer { batch: 3, flags: 1 },
            Msg::Result {
                batch: 3,
                out_len: 10,
                queries_left: u64::MAX,
            },
            Msg::Ping { nonce: 9 },
            Msg::Pong {
                nonce: 9,
                queries_used: 4,
            },
            Msg::Usage {
                report: b"{}".to_vec(),
                mac: [9; 32],
            },
            Msg::Shutdown,
            Msg::Bye,
            Msg::Error {
                code: code::BAD_INPUT_SIZE,
                fatal: false,
                message: "é".into(),
            },
        ]
    }

    #[test]
    fn round_trip_all() {
        for m in samples() {
            let f = m.encode();
            let (d, n) = parse_frame(&f).unwrap().unwrap();
            assert_eq!(d, m);
            assert_eq!(n, f.len());
            let mut r = &f[..];
            assert_eq!(read_msg(&mut r).unwrap(), m);
            // Every strict prefix is incomplete, never an error or a panic.
            for cut in 0..f.len() {
                assert!(matches!(parse_frame(&f[..cut]), Ok(None)));
            }
        }
    }

    #[test]
    fn rejects_bad_frames() {
        assert!(parse_frame(&[0, 0, 0, 0]).is_err());
        assert!(parse_frame(&[0xff, 0xff, 0xff, 0x7f, 1]).is_err());
        assert!(parse_frame(&[1, 0, 0, 0, 0xEE]).is_err());
        // trailing bytes
        let mut f = Msg::Ping { nonce: 1 }.encode();
        f.push(0);
        f[0] += 1;
        assert!(parse_frame(&f).is_err());
        // bad bool
        let mut f = Msg::Error {
            code: 1,
            fatal: true,
            message: String::new(),
        }
        .encode();
        f[7] = 2;
        assert!(parse_frame(&f).is_err());
        let mut empty: &[u8] = &[];
        assert!(matches!(read_msg(&mut empty), Err(ProtoError::Closed)));
    }

    /// Hands out at most `step` bytes per read.
    struct Trickle<'a>(&'a [u8], usize);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn frame_reader_splits_and_joins() {
        let mut msgs = samples();
        msgs.push(Msg::Manifest {
            bytes: vec![7; 10_000], // larger than the initial buffer
        });
        msgs.push(Msg::Ping { nonce: 9 });
        let wire: Vec<u8> = msgs.iter().flat_map(|m| m.encode()).collect();
        for step in [1, 3, 7, 4096, usize::MAX] {
            let mut r = Trickle(&wire, step);
            let mut fr = FrameReader::new();
            for m in &msgs {
                assert_eq!(&fr.read(&mut r).unwrap(), m);
            }
            assert!(matches!(fr.read(&mut r), Err(ProtoError::Closed)));
        }
        // EOF inside a frame is an error, not a clean close
        let f = Msg::Ping { nonce: 1 }.encode();
        let mut r = Trickle(&f[..6], 2);
        assert!(matches!(
            FrameReader::new().read(&mut r),
            Err(ProtoError::Malformed(_))
        ));
        // an over-long length is refused before any allocation
        let mut r = Trickle(&[0xff, 0xff, 0xff, 0x7f, 1], 5);
        assert!(FrameReader::new().read(&mut r).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        #[test]
        fn parser_never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_frame(&data);
            let _ = Msg::decode(&data);
            let mut r = &data[..];
            let _ = read_msg(&mut r);
        }

        #[test]
        fn typed_garbage_never_panics(t in prop::sample::select(vec![1u8,2,3,0x10,0x11,0x12,0x13,0x14,0x15,0x16,0x17,0x18,0x20,0x21,0x22,0x23,0x2D,0x2E,0x2F,0x7F]),
                                      payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut body = vec![t];
            body.extend_from_slice(&payload);
            if let Ok(m) = Msg::decode(&body) {
                // Whatever decodes re-encodes to the same bytes.
                prop_assert_eq!(&m.encode()[4..], &body[..]);
            }
        }

        #[test]
        fn mutated_valid_frames_never_panic(idx in 0usize..19, pos in any::<usize>(), byte in any::<u8>()) {
            let s = samples();
            let mut f = s[idx % s.len()].encode();
            let p = pos % f.len();
            f[p] = byte;
            let _ = parse_frame(&f);
        }
    }
}
