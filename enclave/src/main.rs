//! `ennclave-enclave` — the worker process that holds the private part of a model.
//!
//! ```text
//! ennclave-enclave --ctl-fd N --shm-fd M [--threads T] [--max-batch B] [--spin-us U]
//!                  [--idle-check-ms I]
//! ```
//!
//! `N` is an inherited AF_UNIX stream socket (control frames), `M` an inherited memfd
//! (tensors, the sealed program and, after READY, the doorbell). The message flow is in
//! docs/worker-protocol.md: HELLO → [CHALLENGE/EVIDENCE] → MANIFEST, SEALED_BEGIN,
//! SEALED_CHUNK…, KEY (any order after MANIFEST) → unseal → program → executor →
//! seccomp → READY → INFER (on the doorbell or as a frame)/PING… → SHUTDOWN.

use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use ennclave_enclave::exec::Executor;
use ennclave_enclave::keys::EphemeralKey;
use ennclave_enclave::program::Program;
use ennclave_enclave::protocol::{
    code, doorbell, eviction_pays, futex_wait, futex_wake, write_msg, FrameReader, Msg, ProtoError,
    Shm, INFER_ALLOW_NONFINITE, PROTOCOL_VERSION,
};
use ennclave_enclave::secmem::{Backing, SecretBuf};
use ennclave_enclave::{licence, sandbox, seal};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// `ENNCLAVE_TRACE=1`: start-up phase timings (no secrets) on stderr.
static TRACE: std::sync::OnceLock<Option<std::time::Instant>> = std::sync::OnceLock::new();

fn trace(phase: &str) {
    let t0 = TRACE.get_or_init(|| {
        (std::env::var_os("ENNCLAVE_TRACE").is_some_and(|v| v == "1")).then(std::time::Instant::now)
    });
    if let Some(t0) = t0 {
        eprintln!(
            "ennclave-enclave trace: {:9.3} ms  {phase}",
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
}

/// Sealed programs larger than this are refused before allocating.
const MAX_SEALED: u64 = 64 << 30;
const DEFAULT_MAX_BATCH: usize = 1024;
/// After answering, poll the doorbell this long before sleeping on it. Waking a
/// sleeping thread costs tens of µs on a VM (scheduler + IPI); a host that sends its
/// next request within the window skips that cost. Bounded, so an idle worker sleeps.
const DEFAULT_SPIN_US: u64 = 200;
/// The longest an idle worker sleeps before it checks whether the host hung up.
const DEFAULT_IDLE_CHECK_MS: u64 = 100;
/// Requests up to this many bytes (each way) are evicted from the caches after the
/// answer (see `Shm::evict`), on CPUs where that pays (`eviction_pays`).
const EVICT_MAX: usize = 256 << 10;

struct Args {
    ctl_fd: i32,
    shm_fd: i32,
    threads: usize,
    max_batch: usize,
    spin_us: u64,
    idle_check_ms: u64,
}

fn usage() -> String {
    "usage: ennclave-enclave --ctl-fd N --shm-fd M [--threads T] [--max-batch B] [--spin-us U] \
     [--idle-check-ms I]\n\
     (started by the ennclave Python runtime; not meant to be run by hand)"
        .to_string()
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        ctl_fd: -1,
        shm_fd: -1,
        threads: 0,
        max_batch: DEFAULT_MAX_BATCH,
        spin_us: DEFAULT_SPIN_US,
        idle_check_ms: DEFAULT_IDLE_CHECK_MS,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--help" || k == "-h" {
            return Err(usage());
        }
        if k == "--version" {
            return Err(format!(
                "ennclave-enclave {} (protocol {PROTOCOL_VERSION})",
                env!("CARGO_PKG_VERSION")
            ));
        }
        let v = it
            .next()
            .ok_or_else(|| format!("{k} needs a value\n{}", usage()))?;
        let n: i64 = v
            .parse()
            .map_err(|_| format!("{k} expects an integer, got {v:?}"))?;
        match k.as_str() {
            "--ctl-fd" => a.ctl_fd = n as i32,
            "--shm-fd" => a.shm_fd = n as i32,
            "--threads" => a.threads = n.max(0) as usize,
            "--max-batch" => a.max_batch = n.max(1) as usize,
            "--spin-us" => a.spin_us = n.clamp(0, 10_000) as u64,
            "--idle-check-ms" => a.idle_check_ms = n.clamp(1, 3_600_000) as u64,
            _ => return Err(format!("unknown argument {k}\n{}", usage())),
        }
    }
    if a.ctl_fd < 3 || a.shm_fd < 3 || a.ctl_fd == a.shm_fd {
        return Err(format!(
            "--ctl-fd and --shm-fd must be two distinct inherited fds ≥ 3\n{}",
            usage()
        ));
    }
    Ok(a)
}

/// A failure that ends the worker (sent as a fatal ERROR frame).
struct Fatal(u16, String);

impl Fatal {
    fn new(code: u16, msg: impl Into<String>) -> Self {
        Fatal(code, msg.into())
    }
}

impl From<ProtoError> for Fatal {
    fn from(e: ProtoError) -> Self {
        Fatal(code::PROTOCOL, e.to_string())
    }
}

// ---------------------------------------------------------------- output policy

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Full,
    TopK(usize),
    Label,
    Round(i32),
}

#[derive(Clone, Copy, Debug)]
struct Policy {
    mode: Mode,
    max_queries: Option<u64>,
}

impl Policy {
    fn from_manifest(m: &Value, out_len: usize) -> Result<Policy, String> {
        let p = match m.get("output_policy") {
            None | Some(Value::Null) => {
                return Ok(Policy {
                    mode: Mode::Full,
                    max_queries: None,
                })
            }
            Some(p) if p.is_object() => p,
            Some(_) => return Err("output_policy is not an object".into()),
        };
        let int = |key: &str| -> Result<Option<u64>, String> {
            match p.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| format!("output_policy.{key} must be a non-negative integer")),
            }
        };
        let mode = match p.get("mode").and_then(Value::as_str).unwrap_or("full") {
            "full" => Mode::Full,
            "top_k" => {
                let k = int("k")?.ok_or("output_policy mode top_k needs an integer k")? as usize;
                if k == 0 || k > out_len {
                    return Err(format!("output_policy.k = {k} is outside 1..={out_len}"));
                }
                Mode::TopK(k)
            }
            "label" => Mode::Label,
            "round" => {
                let d = int("decimals")?.unwrap_or(2);
                if d > 8 {
                    return Err(format!("output_policy.decimals = {d} is outside 0..=8"));
                }
                Mode::Round(d as i32)
            }
            other => return Err(format!("unknown output_policy mode {other:?}")),
        };
        Ok(Policy {
            mode,
            max_queries: int("max_queries")?,
        })
    }

    fn out_len(&self, full: usize) -> usize {
        match self.mode {
            Mode::Full | Mode::Round(_) => full,
            Mode::TopK(k) => 2 * k,
            Mode::Label => 1,
        }
    }

    fn describe(&self) -> String {
        let mut s = match self.mode {
            Mode::Full => "full".to_string(),
            Mode::TopK(k) => format!("top_k:{k}"),
            Mode::Label => "label".to_string(),
            Mode::Round(d) => format!("round:{d}"),
        };
        if let Some(q) = self.max_queries {
            s.push_str(&format!(";max_queries:{q}"));
        }
        s
    }

    /// Apply to one sample: `full` is the raw output, `out` gets `out_len(full.len())`.
    fn apply(&self, full: &[f32], out: &mut [f32], order: &mut Vec<usize>) {
        match self.mode {
            Mode::Full => out.copy_from_slice(full),
            Mode::Round(d) => {
                let s = 10f64.powi(d);
                for (o, &x) in out.iter_mut().zip(full) {
                    *o = ((x as f64 * s).round() / s) as f32;
                }
            }
            Mode::Label => out[0] = argmax(full) as f32,
            Mode::TopK(k) => {
                order.clear();
                order.extend(0..full.len());
                // Descending by value, NaN last, ties by lower index (stable sort).
                order.sort_by(|&a, &b| key(full[b]).total_cmp(&key(full[a])));
                for i in 0..k {
                    out[i] = order[i] as f32;
                    out[k + i] = full[order[i]];
                }
            }
        }
    }
}

fn key(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else {
        x
    }
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if key(x) > key(v[best]) {
            best = i;
        }
    }
    best
}

// ---------------------------------------------------------------- handshake

fn binary_sha256() -> [u8; 32] {
    let mut h = Sha256::new();
    if let Ok(bytes) = std::fs::read("/proc/self/exe") {
        h.update(&bytes);
    }
    h.finalize().into()
}

fn backing_name(b: Backing) -> String {
    b.as_str().to_string()
}

/// Placeholder evidence: a hash binding the nonce to this worker's key and binary.
/// Unauthenticated (anyone can compute it); a TEE backend will put the same hash into
/// the report data of a hardware quote.
fn evidence_report(nonce: &[u8; 32], pubkey: &[u8; 32], bin: &[u8; 32]) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(b"ennclave evidence v1\0");
    h.update(nonce);
    h.update(pubkey);
    h.update(bin);
    h.finalize().to_vec()
}

/// Product of the non-batch dims of the single tensor spec in `specs` (manifest).
fn manifest_len(m: &Value, part: &str, which: &str) -> Option<usize> {
    let shape = m
        .get(part)?
        .get(which)?
        .as_array()?
        .first()?
        .get("shape")?
        .as_array()?;
    shape
        .iter()
        .skip(1)
        .try_fold(1usize, |acc, d| acc.checked_mul(d.as_u64()? as usize))
}

struct Loaded {
    /// The key server's licence, checked at start; enforced at every INFER.
    licence: Option<licence::Licence>,
    exec: Executor,
    policy: Policy,
    in_len: usize,
    out_len: usize,
    secmem: String,
}

fn handshake(
    ctl: &mut UnixStream,
    rd: &mut FrameReader,
    shm: &Shm,
    args: &Args,
) -> Result<Option<Loaded>, Fatal> {
    trace("handshake start");
    let ek = EphemeralKey::generate();
    let pubkey = ek.public_bytes();
    let bin = binary_sha256();
    // Read before seccomp: the offline key cache is bound to it (none without it).
    let machine_id = licence::read_machine_id();
    trace("binary hashed");
    let probe = SecretBuf::<u8>::new(1).map_err(|e| Fatal::new(code::INTERNAL, e.to_string()))?;
    let secmem = backing_name(probe.backing());
    drop(probe);
    write_msg(
        ctl,
        &Msg::Hello {
            version: PROTOCOL_VERSION,
            pubkey,
            binary_sha256: bin,
            secmem: secmem.clone(),
        },
    )?;
    trace("HELLO sent");

    let mut manifest: Option<(Value, Vec<u8>)> = None;
    let mut sealed: Option<seal::Incoming> = None;
    let mut received: u64 = 0;
    let mut key: Option<SecretBuf<u8>> = None;
    let mut licence_msg: Option<(Vec<u8>, [u8; 32])> = None;
    let mut held_licence: Option<licence::Licence> = None;

    loop {
        let msg = match rd.read(ctl) {
            Err(ProtoError::Closed) => return Ok(None),
            r => r?,
        };
        match msg {
            Msg::Challenge { nonce } => write_msg(
                ctl,
                &Msg::Evidence {
                    nonce,
                    kind: "none".into(),
                    report: evidence_report(&nonce, &pubkey, &bin),
                },
            )?,
            Msg::Manifest { bytes } => {
                if manifest.is_some() {
                    return Err(Fatal::new(code::PROTOCOL, "MANIFEST sent twice"));
                }
                manifest = Some(
                    seal::canonical_manifest(&bytes)
                        .map_err(|e| Fatal::new(code::MANIFEST, e.to_string()))?,
                );
            }
            Msg::SealedBegin { total_len } => {
                if sealed.is_some() {
                    return Err(Fatal::new(code::PROTOCOL, "SEALED_BEGIN sent twice"));
                }
                if total_len < seal::MIN_SEALED_LEN as u64 || total_len > MAX_SEALED {
                    return Err(Fatal::new(
                        code::BAD_REQUEST,
                        format!("sealed program size {total_len} is out of range"),
                    ));
                }
                sealed = Some(seal::Incoming::new(total_len as usize).map_err(|e| {
                    Fatal::new(
                        code::INTERNAL,
                        format!("cannot allocate secret memory: {e}"),
                    )
                })?);
            }
            Msg::SealedChunk { len } => {
                let buf = sealed.as_mut().ok_or_else(|| {
                    Fatal::new(code::PROTOCOL, "SEALED_CHUNK before SEALED_BEGIN")
                })?;
                let len = len as usize;
                let start = received as usize;
                if len == 0 || len > shm.len() || start + len > buf.len() {
                    return Err(Fatal::new(
                        code::BAD_REQUEST,
                        "SEALED_CHUNK length out of range",
                    ));
                }
                shm.read_into(0, &mut buf.cipher_mut()[start..start + len])
                    .map_err(|e| Fatal::new(code::INTERNAL, e.to_string()))?;
                received += len as u64;
                write_msg(ctl, &Msg::ChunkOk { received })?;
            }
            Msg::Key {
                key_id,
                enc,
                wrapped,
            } => {
                if key.is_some() {
                    return Err(Fatal::new(code::PROTOCOL, "the data key was sent twice"));
                }
                let (m, _) = manifest
                    .as_ref()
                    .ok_or_else(|| Fatal::new(code::PROTOCOL, "KEY before MANIFEST"))?;
                let want = m
                    .get("private")
                    .and_then(|p| p.get("key_id"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| Fatal::new(code::MANIFEST, "manifest has no private.key_id"))?;
                if want != key_id {
                    return Err(Fatal::new(
                        code::KEY,
                        format!("KEY is for key id {key_id:?} but the manifest names {want:?}"),
                    ));
                }
                let k = ek
                    .unwrap_data_key(&enc, &wrapped, &key_id)
                    .map_err(|e| Fatal::new(code::KEY, e.to_string()))?;
                held_licence = admit_licence(
                    ctl,
                    m,
                    &key_id,
                    &k,
                    licence_msg.take(),
                    Some(&pubkey),
                    &bin,
                    machine_id.as_deref(),
                )?;
                key = Some(k);
            }
            Msg::Licence { licence: raw, mac } => {
                if key.is_some() {
                    return Err(Fatal::new(
                        code::PROTOCOL,
                        "LICENCE after KEY (it must come before)",
                    ));
                }
                if licence_msg.is_some() || raw.len() > licence::MAX_LICENCE {
                    return Err(Fatal::new(
                        code::LICENCE_INVALID,
                        "LICENCE sent twice or too large",
                    ));
                }
                licence_msg = Some((raw, mac));
            }
            Msg::CachedKey { key_id, blob } => {
                if key.is_some() || licence_msg.is_some() {
                    return Err(Fatal::new(
                        code::PROTOCOL,
                        "CACHED_KEY replaces KEY and LICENCE; it cannot come with them",
                    ));
                }
                let (m, _) = manifest
                    .as_ref()
                    .ok_or_else(|| Fatal::new(code::PROTOCOL, "CACHED_KEY before MANIFEST"))?;
                let want = m.get("private").and_then(|p| p.get("key_id"));
                if want.and_then(Value::as_str) != Some(key_id.as_str()) {
                    return Err(Fatal::new(
                        code::KEY,
                        format!("CACHED_KEY is for key id {key_id:?}, not this manifest's"),
                    ));
                }
                let mid = machine_id.as_deref().ok_or_else(|| {
                    Fatal::new(
                        code::LICENCE_INVALID,
                        "this machine has no /etc/machine-id, so an offline key cache cannot be opened",
                    )
                })?;
                let c = licence::open_cache(mid, &bin, &key_id, &blob)
                    .map_err(|e| Fatal::new(code::LICENCE_INVALID, e.to_string()))?;
                held_licence = admit_licence(
                    ctl,
                    m,
                    &key_id,
                    &c.data_key,
                    Some((c.licence_raw, c.mac)),
                    None,
                    &bin,
                    None,
                )?;
                key = Some(c.data_key);
            }
            Msg::Ping { nonce } => write_msg(
                ctl,
                &Msg::Pong {
                    nonce,
                    queries_used: 0,
                },
            )?,
            Msg::Shutdown => {
                write_msg(ctl, &Msg::Bye)?;
                return Ok(None);
            }
            Msg::Infer { .. } => {
                write_msg(
                    ctl,
                    &Msg::Error {
                        code: code::PROTOCOL,
                        fatal: false,
                        message: "INFER before the program is loaded".into(),
                    },
                )?;
            }
            other => {
                return Err(Fatal::new(
                    code::PROTOCOL,
                    format!(
                        "unexpected message type 0x{:02x} during the handshake",
                        other.type_byte()
                    ),
                ))
            }
        }
        let complete = matches!(&sealed, Some(b) if received as usize == b.len());
        if manifest.is_some() && complete && key.is_some() {
            break;
        }
    }

    // Everything is here: unseal, build, then lock down.
    trace("manifest, sealed program and key received");
    let (manifest, aad) = manifest.expect("checked above");
    let sealed = sealed.expect("checked above");
    let key = key.expect("checked above");
    // The plaintext container goes into secret memory and stays there: the program
    // uses the weights in place, and dropping it zeroes it.
    let (container, range) = sealed.unseal(&aad, &key).map_err(|e| match e {
        seal::SealError::Authentication => Fatal::new(code::AUTHENTICATION, e.to_string()),
        seal::SealError::Memory(_) => Fatal::new(code::INTERNAL, e.to_string()),
        _ => Fatal::new(code::BAD_REQUEST, e.to_string()),
    })?;
    drop(key);
    trace("unsealed");
    let program = Program::from_secret(container, range).map_err(|e| {
        Fatal::new(
            code::PROGRAM,
            format!("the enclave program is invalid: {e}"),
        )
    })?;
    trace("program parsed");
    let secmem = backing_name(program.weights_backing());

    let threads = if args.threads > 0 {
        args.threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    };
    let exec = Executor::new(&program, args.max_batch, threads)
        .map_err(|e| Fatal::new(code::PROGRAM, format!("cannot prepare the program: {e}")))?;
    trace("executor ready (buffers, thread pool, warm-up)");
    let in_len = exec.input_len_per_sample();
    let out_len = exec.output_len_per_sample();
    for (part, which, have) in [
        ("private", "inputs", in_len),
        ("private", "outputs", out_len),
    ] {
        if let Some(want) = manifest_len(&manifest, part, which) {
            if want != have {
                return Err(Fatal::new(
                    code::MANIFEST,
                    format!("manifest {part}.{which} has {want} values per sample but the program has {have}"),
                ));
            }
        }
    }
    let policy =
        Policy::from_manifest(&manifest, out_len).map_err(|e| Fatal::new(code::MANIFEST, e))?;

    // Executor::new has already warmed up (thread pool, the executor's lazy state)
    // before the filter goes on (the pool must not need open() for CPU counts
    // afterwards).
    drop(program);
    sandbox::install_seccomp().map_err(|e| Fatal::new(code::SANDBOX, e.to_string()))?;
    trace("seccomp installed");
    Ok(Some(Loaded {
        licence: held_licence,
        exec,
        policy,
        in_len,
        out_len,
        secmem,
    }))
}

/// Licence checks when the data key arrives (docs/key-release.md "Licences"). A bundle
/// whose authenticated manifest says `key_source: "keyserver"` needs a licence; one sent
/// with a local-key bundle is checked and enforced the same way. `pubkey` is this
/// worker's ephemeral key (None for a licence from the offline cache, issued to an
/// earlier worker). With `offline: true` and a machine id, a fresh licence is sealed
/// with the key into a KEY_CACHE frame for the host to store.
#[allow(clippy::too_many_arguments)]
fn admit_licence(
    ctl: &mut UnixStream,
    manifest: &Value,
    key_id: &str,
    data_key: &[u8],
    sent: Option<(Vec<u8>, [u8; 32])>,
    pubkey: Option<&[u8; 32]>,
    bin: &[u8; 32],
    machine_id: Option<&[u8]>,
) -> Result<Option<licence::Licence>, Fatal> {
    let required = manifest
        .get("private")
        .and_then(|p| p.get("key_source"))
        .and_then(Value::as_str)
        == Some("keyserver");
    let Some((raw, mac)) = sent else {
        if required {
            return Err(Fatal::new(
                code::LICENCE_INVALID,
                "this bundle's key comes from a key server and needs its licence, but none was sent",
            ));
        }
        return Ok(None);
    };
    let refuse = |e: licence::LicenceError| match e {
        licence::LicenceError::Expired(_) => Fatal::new(
            code::LICENCE_EXPIRED,
            format!("{e}; ask the key server for a new one"),
        ),
        _ => Fatal::new(code::LICENCE_INVALID, e.to_string()),
    };
    licence::verify_mac(data_key, key_id, &raw, &mac).map_err(refuse)?;
    let lic = licence::parse(&raw).map_err(refuse)?;
    lic.check(key_id, pubkey, bin, licence::now_unix())
        .map_err(refuse)?;
    if pubkey.is_none() && !lic.offline {
        return Err(Fatal::new(
            code::LICENCE_INVALID,
            "the cached licence does not allow offline use",
        ));
    }
    if let (Some(_), true, Some(mid)) = (pubkey, lic.offline, machine_id) {
        let blob = licence::seal_cache(mid, bin, key_id, data_key, &raw, &mac).map_err(refuse)?;
        write_msg(
            ctl,
            &Msg::KeyCache {
                key_id: key_id.to_string(),
                blob,
            },
        )?;
    }
    Ok(Some(lic))
}

// ---------------------------------------------------------------- serving

/// First non-finite value in `v`. Checks blocks branch-free (vectorised) and only
/// looks for the position inside a block that has one.
fn first_nonfinite(v: &[f32]) -> Option<usize> {
    const BLOCK: usize = 256;
    const EXP: u32 = 0x7f80_0000;
    for (b, chunk) in v.chunks(BLOCK).enumerate() {
        let bad = chunk
            .iter()
            .fold(false, |acc, x| acc | (x.to_bits() & EXP == EXP));
        if bad {
            return chunk
                .iter()
                .position(|x| !x.is_finite())
                .map(|i| b * BLOCK + i);
        }
    }
    None
}

/// Copy the input out of the shared region into private memory `dst`, one L1-sized
/// chunk at a time, and (with `check`) look for a non-finite value in each private
/// chunk while it is still in cache. Returns the index of the first non-finite value.
/// Only the private copy is ever checked: the host may rewrite the region at any time.
/// For a doorbell request (`posted`) each chunk is copied once the host says it is in
/// place.
fn copy_in_checked(
    shm: &Shm,
    offset: usize,
    dst: &mut [f32],
    check: bool,
    posted: Option<&Posted>,
) -> std::io::Result<Option<usize>> {
    const CHUNK: usize = 2048; // floats: 8 KiB
    for (c, chunk) in dst.chunks_mut(CHUNK).enumerate() {
        if let Some(p) = posted {
            if !p.wait_for_input(c * CHUNK + chunk.len()) {
                return Err(std::io::Error::other(
                    "the host sent a message before the whole input was in place",
                ));
            }
        }
        shm.read_f32(offset + c * CHUNK * 4, chunk)?;
        if check {
            if let Some(i) = first_nonfinite(chunk) {
                return Ok(Some(c * CHUNK + i));
            }
        }
    }
    Ok(None)
}

/// Whether the socket has a frame's bytes (or the host hung up): the framed read that
/// follows will not block for long. Never blocks itself; an error counts as readable,
/// so the read reports it.
fn socket_readable(sock: &UnixStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: recv into a valid one-byte buffer on our own socket; MSG_PEEK leaves
    // the byte in the socket for the framed read, MSG_DONTWAIT never blocks.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock
}

/// Spin until `done()` or for `spin_us` µs; returns whether it got done. Waking a
/// sleeping thread costs tens of µs on a VM: a host that posts within the window
/// skips that cost.
fn spin_until(spin_us: u64, done: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_micros(spin_us);
    loop {
        for _ in 0..64 {
            if done() {
                return true;
            }
            std::hint::spin_loop();
        }
        if std::time::Instant::now() >= deadline {
            return done();
        }
    }
}

/// Wait for the host's next message: spin until it posts a request (`req_seq` moves
/// off `answered`) or bumps `events` away from `seen`, then sleep on `events` (the
/// host rings it after every request and frame). Returns after at most
/// `idle_check_ms` even without a wake, so a host that died is noticed (its socket
/// reads as closed).
fn wait_for_event(events: &AtomicU32, seen: u32, req_seq: &AtomicU32, answered: u32, args: &Args) {
    let posted =
        || events.load(Ordering::Acquire) != seen || req_seq.load(Ordering::Acquire) != answered;
    if !spin_until(args.spin_us, posted) {
        futex_wait(
            events,
            seen,
            std::time::Duration::from_millis(args.idle_check_ms),
        );
    }
}

/// A request posted on the doorbell: its sequence number and the words through which
/// its input arrives (the host may still be copying it in) and its output is
/// announced.
struct Posted<'a> {
    seq: u32,
    /// `doorbell::REQ_PROGRESS`: how much input the host has put in place.
    input: &'a AtomicU64,
    /// `doorbell::ANS_PROGRESS`: how much output the worker has put in place.
    output: &'a AtomicU64,
    /// `doorbell::EVENTS`: rung by the host after it announces the whole input.
    events: &'a AtomicU32,
    ctl: &'a UnixStream,
    args: &'a Args,
}

impl Posted<'_> {
    /// Wait until the first `n` input floats are in place: poll, then sleep on
    /// `events`. False if the host hung up or sent a frame first (a host that posts a
    /// request owes its whole input before anything else).
    fn wait_for_input(&self, n: usize) -> bool {
        let ready = || {
            let p = self.input.load(Ordering::Acquire);
            p >> 32 == u64::from(self.seq) && (p & 0xffff_ffff) as usize >= n
        };
        if spin_until(self.args.spin_us, ready) {
            return true;
        }
        loop {
            // Read `events` before checking: a later announcement moves it.
            let seen = self.events.load(Ordering::Acquire);
            if ready() {
                return true;
            }
            if socket_readable(self.ctl) {
                return false;
            }
            futex_wait(
                self.events,
                seen,
                std::time::Duration::from_millis(self.args.idle_check_ms),
            );
        }
    }

    /// The first `n` output floats are in place.
    fn announce_output(&self, n: usize) {
        self.output
            .store(u64::from(self.seq) << 32 | n as u64, Ordering::Release);
    }
}

/// One INFER's answer: queries left, or the error to report (the worker keeps serving).
type Answer = Result<u64, (u16, String)>;

/// Serving state after READY.
struct Server<'a> {
    shm: &'a Shm,
    l: Loaded,
    max_batch: usize,
    /// Values per output sample after the output policy.
    pout: usize,
    in_offset: usize,
    out_offset: usize,
    /// Bytes up to which a request is evicted from the caches after its answer.
    evict_max: usize,
    budget: Option<u64>,
    used: u64,
    polbuf: Vec<f32>,
    order: Vec<usize>,
}

impl Server<'_> {
    /// Run one INFER whose input is at `in_offset`; on success the output is at
    /// `out_offset`. A doorbell request (`posted`) has its input read as the host
    /// announces it, and a full output written chunk by chunk, each announced.
    fn infer(&mut self, batch: u32, flags: u32, posted: Option<&Posted>) -> Answer {
        let b = batch as usize;
        if b == 0 || b > self.max_batch {
            return Err((
                code::BAD_INPUT_SIZE,
                format!("batch of {b} samples is outside 1..={}", self.max_batch),
            ));
        }
        if let Some(lic) = &self.l.licence {
            if licence::now_unix() >= lic.expires_at {
                return Err((
                    code::LICENCE_EXPIRED,
                    format!(
                        "the licence expired at {} (Unix time); restart to ask the key server for a new one",
                        lic.expires_at
                    ),
                ));
            }
        }
        if let Some(maxq) = self.budget {
            if self.used.saturating_add(b as u64) > maxq {
                let whose = if self.l.policy.max_queries == Some(maxq) {
                    "bundle's"
                } else {
                    "licence's"
                };
                return Err((
                    code::BUDGET_EXHAUSTED,
                    format!(
                        "the {whose} query budget of {maxq} samples is exhausted ({} used)",
                        self.used
                    ),
                ));
            }
        }
        let internal = |e: &dyn std::fmt::Display| (code::INTERNAL, e.to_string());
        // Copy the input straight into the executor's private input buffer, then
        // validate that copy (never the shared region).
        let input = self.l.exec.input_mut(b).map_err(|e| internal(&e))?;
        let check = flags & INFER_ALLOW_NONFINITE == 0;
        let in_len = self.l.in_len;
        match copy_in_checked(self.shm, self.in_offset, input, check, posted) {
            Err(e) => return Err(internal(&e)),
            Ok(Some(i)) => {
                return Err((
                    code::NONFINITE_INPUT,
                    format!(
                        "input sample {} contains NaN or infinity at position {}",
                        i / in_len,
                        i % in_len
                    ),
                ))
            }
            Ok(None) => {}
        }
        let output = self
            .l
            .exec
            .run_in_place(b)
            .map_err(|e| (code::INTERNAL, format!("inference failed: {e}")))?;
        let (out_len, pout) = (self.l.out_len, self.pout);
        let written = if self.l.policy.mode == Mode::Full {
            match posted {
                Some(p) => output
                    .chunks(doorbell::PROGRESS_CHUNK)
                    .enumerate()
                    .try_for_each(|(k, chunk)| {
                        let start = k * doorbell::PROGRESS_CHUNK;
                        self.shm.write_f32(self.out_offset + 4 * start, chunk)?;
                        p.announce_output(start + chunk.len());
                        Ok(())
                    }),
                None => self.shm.write_f32(self.out_offset, output),
            }
        } else {
            let pol = &mut self.polbuf[..b * pout];
            for s in 0..b {
                self.l.policy.apply(
                    &output[s * out_len..(s + 1) * out_len],
                    &mut pol[s * pout..(s + 1) * pout],
                    &mut self.order,
                );
            }
            self.shm.write_f32(self.out_offset, pol)
        };
        written.map_err(|e| internal(&e))?;
        self.used += b as u64;
        Ok(self.budget.map_or(u64::MAX, |m| m - self.used))
    }

    /// After an answer, while the host reads it and prepares the next request: see
    /// Shm::evict (failure is impossible here, the ranges were just used). Only small
    /// requests (a larger one has mostly left this core's caches already, and flushing
    /// costs about the same per line either way), and only where it pays
    /// (`eviction_pays`).
    fn evict(&self, batch: u32) {
        let b = (batch as usize).min(self.max_batch);
        for (offset, len) in [
            (self.in_offset, b * self.l.in_len * 4),
            (self.out_offset, b * self.pout * 4),
        ] {
            if len <= self.evict_max {
                let _ = self.shm.evict(offset, len);
            }
        }
    }
}

fn serve(
    ctl: &mut UnixStream,
    rd: &mut FrameReader,
    shm: &Shm,
    args: &Args,
    l: Loaded,
) -> Result<(), Fatal> {
    let pout = l.policy.out_len(l.out_len);
    let evict_max = if eviction_pays() { EVICT_MAX } else { 0 };
    trace(&format!(
        "cache eviction after each answer {}",
        if evict_max > 0 { "on" } else { "off" }
    ));
    let per_sample = (l.in_len + pout) * 4;
    let fit = shm.len().saturating_sub(doorbell::BYTES + 64) / per_sample.max(1);
    let max_batch = args.max_batch.min(fit);
    if max_batch == 0 {
        return Err(Fatal::new(
            code::BAD_REQUEST,
            format!(
                "the shared-memory region ({} bytes) cannot hold one sample ({per_sample} bytes)",
                shm.len()
            ),
        ));
    }
    // The doorbell block starts zeroed (sealed-program chunks went through there).
    let internal = |e: std::io::Error| Fatal::new(code::INTERNAL, e.to_string());
    shm.write_bytes(0, &[0u8; doorbell::BYTES])
        .map_err(internal)?;
    let word = |offset| shm.atomic_u32(offset).map_err(internal);
    let (req_seq, ans_seq, events) = (
        word(doorbell::REQ_SEQ)?,
        word(doorbell::ANS_SEQ)?,
        word(doorbell::EVENTS)?,
    );
    let in_progress = shm.atomic_u64(doorbell::REQ_PROGRESS).map_err(internal)?;
    let out_progress = shm.atomic_u64(doorbell::ANS_PROGRESS).map_err(internal)?;
    let in_offset = doorbell::BYTES;
    let out_offset = (in_offset + max_batch * l.in_len * 4).div_ceil(64) * 64;
    // Effective budget: the tighter of the manifest's max_queries and the licence's.
    let licence_budget = l.licence.as_ref().and_then(|x| x.query_budget);
    let budget = match (l.policy.max_queries, licence_budget) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let mut policy = l.policy.describe();
    if let Some(lic) = &l.licence {
        policy.push_str(&format!(";licence_expires_at:{}", lic.expires_at));
        if let Some(b) = lic.query_budget {
            policy.push_str(&format!(";licence_budget:{b}"));
        }
    }
    write_msg(
        ctl,
        &Msg::Ready {
            max_batch: max_batch as u32,
            in_len: l.in_len as u32,
            out_len: pout as u32,
            in_offset: in_offset as u64,
            out_offset: out_offset as u64,
            secmem: l.secmem.clone(),
            policy,
        },
    )?;
    trace("READY sent");

    let out_len = l.out_len;
    let mut srv = Server {
        shm,
        l,
        max_batch,
        pout,
        in_offset,
        out_offset,
        evict_max,
        budget,
        used: 0,
        polbuf: vec![0f32; max_batch * pout],
        order: Vec::with_capacity(out_len),
    };
    let err = |ctl: &mut UnixStream, (code, message): (u16, String)| {
        write_msg(
            ctl,
            &Msg::Error {
                code,
                fatal: false,
                message,
            },
        )
    };
    let mut answered = 0u32;
    loop {
        // Read `events` first: whatever the host posts after this read bumps it, so
        // the wait at the bottom cannot sleep through a request.
        let seen = events.load(Ordering::Acquire);

        // A request on the doorbell. Its fields are read once, here, into locals.
        let seq = req_seq.load(Ordering::Acquire);
        if seq != answered {
            answered = seq;
            let field = |at: usize| -> Result<u32, Fatal> {
                let mut raw = [0u8; 4];
                shm.read_into(at, &mut raw).map_err(internal)?;
                Ok(u32::from_le_bytes(raw))
            };
            let (batch, flags) = (field(doorbell::REQ_BATCH)?, field(doorbell::REQ_FLAGS)?);
            let posted = Posted {
                seq,
                input: in_progress,
                output: out_progress,
                events,
                ctl,
                args,
            };
            let (status, left) = match srv.infer(batch, flags, Some(&posted)) {
                Ok(left) => (doorbell::STATUS_OK, left),
                Err(e) => {
                    // The message goes as a frame, before the answer points to it.
                    err(ctl, e)?;
                    (doorbell::STATUS_ERROR, 0)
                }
            };
            // The answer's fields in one copy, laid out as in `doorbell`.
            use doorbell::{ANS_BATCH, ANS_LEFT, ANS_OUT_LEN, ANS_STATUS};
            let mut ans = [0u8; ANS_LEFT + 8 - ANS_STATUS];
            let mut put = |at: usize, bytes: &[u8]| {
                ans[at - ANS_STATUS..at - ANS_STATUS + bytes.len()].copy_from_slice(bytes)
            };
            put(ANS_STATUS, &status.to_le_bytes());
            put(ANS_BATCH, &batch.to_le_bytes());
            put(ANS_OUT_LEN, &(pout as u32).to_le_bytes());
            put(ANS_LEFT, &left.to_le_bytes());
            shm.write_bytes(ANS_STATUS, &ans).map_err(internal)?;
            ans_seq.store(seq, Ordering::Release);
            futex_wake(ans_seq);
            if status == doorbell::STATUS_OK {
                srv.evict(batch);
            }
            continue;
        }

        // A control frame (or an INFER frame, from hosts that do not use the doorbell).
        if rd.has_buffered() || socket_readable(ctl) {
            let msg = match rd.read(ctl) {
                Err(ProtoError::Closed) => return Ok(()),
                r => r?,
            };
            match msg {
                Msg::Infer { batch, flags } => match srv.infer(batch, flags, None) {
                    Ok(queries_left) => {
                        write_msg(
                            ctl,
                            &Msg::Result {
                                batch,
                                out_len: pout as u32,
                                queries_left,
                            },
                        )?;
                        srv.evict(batch);
                    }
                    Err(e) => err(ctl, e)?,
                },
                Msg::Ping { nonce } => write_msg(
                    ctl,
                    &Msg::Pong {
                        nonce,
                        queries_used: srv.used,
                    },
                )?,
                Msg::Shutdown => {
                    write_msg(ctl, &Msg::Bye)?;
                    return Ok(());
                }
                other => err(
                    ctl,
                    (
                        code::PROTOCOL,
                        format!(
                            "unexpected message type 0x{:02x} after READY",
                            other.type_byte()
                        ),
                    ),
                )?,
            }
            continue;
        }
        wait_for_event(events, seen, req_seq, answered, args);
    }
}

fn fd_is(fd: i32, kind: libc::mode_t) -> bool {
    // SAFETY: fstat into a zeroed local struct; an invalid fd yields EBADF.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    (unsafe { libc::fstat(fd, &mut st) } == 0) && (st.st_mode & libc::S_IFMT) == kind
}

fn main() -> ExitCode {
    trace("main");
    if let Err(e) = sandbox::harden_process() {
        eprintln!("ennclave-enclave: cannot harden the process: {e}");
        return ExitCode::from(3);
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(m) => {
            eprintln!("{m}");
            return ExitCode::from(2);
        }
    };
    if !fd_is(args.ctl_fd, libc::S_IFSOCK) {
        eprintln!(
            "ennclave-enclave: --ctl-fd {} is not an open socket",
            args.ctl_fd
        );
        return ExitCode::from(2);
    }
    // SAFETY: the fd was checked to be an open socket; it was handed to us by the host
    // for this purpose and nothing else in this process owns it.
    let mut ctl = unsafe { UnixStream::from_raw_fd(args.ctl_fd) };
    let shm = match Shm::map_fd(args.shm_fd) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "ennclave-enclave: cannot map the shared-memory fd {}: {e}",
                args.shm_fd
            );
            return ExitCode::from(2);
        }
    };
    let mut rd = FrameReader::new();
    let result = handshake(&mut ctl, &mut rd, &shm, &args).and_then(|l| match l {
        // Serve from inside the executor's pool: each INFER then starts on a pool
        // thread instead of being handed to the pool and back.
        Some(l) => l
            .exec
            .pool()
            .install(|| serve(&mut ctl, &mut rd, &shm, &args, l)),
        None => Ok(()),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fatal(code, message)) => {
            let _ = write_msg(
                &mut ctl,
                &Msg::Error {
                    code,
                    fatal: true,
                    message: message.clone(),
                },
            );
            eprintln!("ennclave-enclave: {message}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pol(j: &str, n: usize) -> Result<Policy, String> {
        Policy::from_manifest(&serde_json::from_str(j).unwrap(), n)
    }

    #[test]
    fn policies() {
        let full = [0.1f32, 0.7, 0.2, 0.7];
        let mut order = vec![];
        let p = pol(
            r#"{"output_policy":{"mode":"top_k","k":2,"max_queries":5}}"#,
            4,
        )
        .unwrap();
        assert_eq!(p.max_queries, Some(5));
        let mut out = [0f32; 4];
        p.apply(&full, &mut out, &mut order);
        assert_eq!(out, [1.0, 3.0, 0.7, 0.7]);
        let p = pol(r#"{"output_policy":{"mode":"label"}}"#, 4).unwrap();
        let mut out = [0f32; 1];
        p.apply(&full, &mut out, &mut order);
        assert_eq!(out, [1.0]);
        let p = pol(r#"{"output_policy":{"mode":"round","decimals":0}}"#, 4).unwrap();
        let mut out = [0f32; 4];
        p.apply(&[0.4, 0.6, -1.5, 2.49], &mut out, &mut order);
        assert_eq!(out, [0.0, 1.0, -2.0, 2.0]);
        assert!(pol(r#"{}"#, 4).unwrap().mode == Mode::Full);
        assert!(pol(r#"{"output_policy":{"mode":"top_k","k":5}}"#, 4).is_err());
        assert!(pol(r#"{"output_policy":{"mode":"nope"}}"#, 4).is_err());
        assert!(pol(r#"{"output_policy":{"mode":"full","max_queries":-1}}"#, 4).is_err());
    }

    #[test]
    fn argmax_nan_last() {
        assert_eq!(argmax(&[f32::NAN, 1.0, 3.0, 3.0]), 2);
    }
}
