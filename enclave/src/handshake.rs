//! The worker's handshake (docs/worker-protocol.md): HELLO → [CHALLENGE/EVIDENCE] →
//! MANIFEST, SEALED_BEGIN, SEALED_CHUNK…, KEY or CACHED_KEY (any order after
//! MANIFEST; LICENCE before KEY) → unseal → program → executor → seccomp.
//!
//! The stages, in order: `Identity::new` and `hello` (key pair, binary hash,
//! HELLO), `receive` (the host's messages until manifest, sealed program and key are
//! all in; the data key is admitted with its licence by `admit_licence`, which refuses
//! it without one when the manifest requires one: `licence_required`),
//! `open_program` (unseal and parse), `load` (executor, manifest checks, output
//! policy), then the seccomp filter.

use std::os::unix::net::UnixStream;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::exec::Executor;
use crate::keys::EphemeralKey;
use crate::licence;
use crate::platform;
use crate::policy::Policy;
use crate::program::Program;
use crate::protocol::{code, write_msg, FrameReader, Msg, ProtoError, Shm, PROTOCOL_VERSION};
use crate::seal;
use crate::secmem::{Backing, SecretBuf};
use crate::worker::{trace, Args, Fatal};

/// Sealed programs larger than this are refused before allocating.
const MAX_SEALED: u64 = 64 << 30;

fn binary_sha256() -> [u8; 32] {
    use std::io::Read;
    let mut h = Sha256::new();
    // Streamed through a small buffer that stays in cache: reading the whole binary
    // into one Vec costs a page fault per 4 KiB on the start's critical path.
    if let Ok(mut f) = std::fs::File::open("/proc/self/exe") {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n @ 1..) = f.read(&mut buf) {
            h.update(&buf[..n]);
        }
    }
    h.finalize().into()
}

fn backing_name(b: Backing) -> String {
    b.as_str().to_string()
}

/// The evidence hash (docs/attestation.md): the nonce bound to this worker's key, its
/// binary and the protections it reports. The software report is this hash itself
/// (anyone can compute it); a hardware report carries it in its REPORT_DATA, so there
/// neither the key nor the protections can be rewritten by the host.
fn evidence_report(
    nonce: &[u8; 32],
    pubkey: &[u8; 32],
    bin: &[u8; 32],
    protections: &[u8],
) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(b"ennclave evidence v2\0");
    h.update(nonce);
    h.update(pubkey);
    h.update(bin);
    h.update(Sha256::digest(protections));
    h.finalize().to_vec()
}

/// What protects this worker's secrets, as EVIDENCE reports it (issue #14, item 3;
/// docs/key-release.md "Protections"): canonical JSON (keys sorted, no spaces), so
/// that the key server can check it byte for byte against the evidence hash.
///
/// * `secret_memory` — the backing every secret buffer has had and will have
///   (`secmem::commit`, which also makes the worker refuse anything weaker from now
///   on): `memfd_secret`, `mlock` or `anonymous`;
/// * `seccomp` — the filter goes on before the first INFER (or the worker exits):
///   native only;
/// * `tracer_check` — TracerPid was read as 0 at start, and is checked again before
///   the key is unwrapped;
/// * `environment_check`, `mapping_check`, `non_dumpable` — the start-up checks of
///   main.rs and `sandbox::harden_process`;
/// * `static_binary` — linked without a dynamic loader;
/// * `platform` — `native`, `gramine-direct` or `gramine-sgx`.
fn protections() -> Result<String, Fatal> {
    let mem = crate::secmem::commit().map_err(|e| Fatal::new(code::INTERNAL, e.to_string()))?;
    Ok(protections_json(
        crate::sandbox::startup(),
        mem,
        platform::current(),
    ))
}

fn protections_json(
    s: crate::sandbox::StartupChecks,
    mem: Backing,
    p: platform::Platform,
) -> String {
    // Fixed key order (alphabetical), values are booleans and fixed ASCII names only.
    format!(
        "{{\"environment_check\":{},\"mapping_check\":{},\"non_dumpable\":{},\
         \"platform\":\"{}\",\"seccomp\":{},\"secret_memory\":\"{}\",\
         \"static_binary\":{},\"tracer_check\":{}}}",
        s.environment,
        s.mappings,
        s.non_dumpable,
        p.name(),
        !p.is_gramine(),
        mem.as_str(),
        s.static_binary,
        s.tracer,
    )
}

/// Product of the non-batch dims of the single tensor spec in `specs` (manifest).
fn manifest_len(m: &Value, part: &str, which: &str) -> Option<usize> {
    manifest_lens(m, part, which)?.first().copied()
}

/// Values per sample of every spec in `m[part][which]` (None if any is malformed).
fn manifest_lens(m: &Value, part: &str, which: &str) -> Option<Vec<usize>> {
    let specs = m.get(part)?.get(which)?.as_array()?;
    specs
        .iter()
        .map(|spec| {
            spec.get("shape")?
                .as_array()?
                .iter()
                .skip(1)
                .try_fold(1usize, |acc, d| acc.checked_mul(d.as_u64()? as usize))
        })
        .collect()
}

/// A loaded program, ready to serve.
pub struct Loaded {
    /// The key server's licence, checked at start; enforced at every INFER (with,
    /// when metered, what signs its usage report at SHUTDOWN).
    pub(crate) licence: Option<licence::Held>,
    pub(crate) exec: Executor,
    pub(crate) policy: Policy,
    pub(crate) in_len: usize,
    pub(crate) out_len: usize,
    pub(crate) secmem: String,
}

/// Run the handshake on the control socket `ctl` (sealed-program chunks arrive in
/// `shm`). `None`: the host hung up or sent SHUTDOWN before the program was loaded.
/// On success the seccomp filter is on.
pub fn handshake(
    ctl: &mut UnixStream,
    rd: &mut FrameReader,
    shm: &Shm,
    args: &Args,
) -> Result<Option<Loaded>, Fatal> {
    trace("handshake start");
    let me = Identity::new();
    hello(ctl, &me)?;
    let Some(inbox) = receive(ctl, rd, shm, &me)? else {
        return Ok(None);
    };

    // Everything is here: unseal, build, then lock down.
    trace("manifest, sealed program and key received");
    let (manifest, aad) = inbox.manifest.expect("checked above");
    let sealed = inbox.sealed.expect("checked above");
    let key = inbox.key.expect("checked above");
    let program = open_program(sealed, &aad, key)?;
    let loaded = load(program, &manifest, inbox.held_licence, args)?;
    // Executor::new has already warmed up (thread pool, the executor's lazy state)
    // before the filter goes on (the pool must not need open() for CPU counts
    // afterwards).
    platform::lock_down()?;
    Ok(Some(loaded))
}

/// This worker as the host and the key server see it.
struct Identity {
    ek: EphemeralKey,
    pubkey: [u8; 32],
    /// SHA-256 of this worker's binary.
    bin: [u8; 32],
    /// The offline key cache is bound to it (none without it).
    machine_id: Option<Vec<u8>>,
}

impl Identity {
    fn new() -> Identity {
        let ek = EphemeralKey::generate();
        let pubkey = ek.public_bytes();
        let bin = binary_sha256();
        // Read before seccomp: the offline key cache is bound to it (none without it).
        let machine_id = licence::read_machine_id();
        trace("binary hashed");
        Identity {
            ek,
            pubkey,
            bin,
            machine_id,
        }
    }
}

/// Send HELLO (with the kind of secret memory this process gets).
fn hello(ctl: &mut UnixStream, me: &Identity) -> Result<(), Fatal> {
    let secmem = backing_name(
        SecretBuf::<u8>::probe().map_err(|e| Fatal::new(code::INTERNAL, e.to_string()))?,
    );
    write_msg(
        ctl,
        &Msg::Hello {
            version: PROTOCOL_VERSION,
            pubkey: me.pubkey,
            binary_sha256: me.bin,
            secmem,
            platform: platform::current().name().into(),
        },
    )?;
    trace("HELLO sent");
    Ok(())
}

/// What the host has sent so far.
#[derive(Default)]
struct Inbox {
    /// The canonical manifest and its bytes (the AAD of the sealed program).
    manifest: Option<(Value, Vec<u8>)>,
    sealed: Option<seal::Incoming>,
    /// Sealed-program bytes received so far.
    received: u64,
    key: Option<SecretBuf<u8>>,
    /// A LICENCE waiting for its KEY.
    licence_msg: Option<(Vec<u8>, [u8; 32])>,
    /// The licence admitted with the key.
    held_licence: Option<licence::Held>,
}

/// Answer the host's messages until the manifest, the whole sealed program and the
/// data key are in. `None`: the host hung up or sent SHUTDOWN.
fn receive(
    ctl: &mut UnixStream,
    rd: &mut FrameReader,
    shm: &Shm,
    me: &Identity,
) -> Result<Option<Inbox>, Fatal> {
    let mut inbox = Inbox::default();
    loop {
        let msg = match rd.read(ctl) {
            Err(ProtoError::Closed) => return Ok(None),
            r => r?,
        };
        match msg {
            Msg::Challenge { nonce } => {
                let protections = protections()?;
                let h = evidence_report(&nonce, &me.pubkey, &me.bin, protections.as_bytes());
                let (kind, report) = platform::evidence(&h)?;
                write_msg(
                    ctl,
                    &Msg::Evidence {
                        nonce,
                        kind,
                        report,
                        protections,
                    },
                )?
            }
            Msg::Manifest { bytes } => inbox.manifest(&bytes)?,
            Msg::SealedBegin { total_len } => inbox.sealed_begin(total_len)?,
            Msg::SealedChunk { len } => inbox.sealed_chunk(ctl, shm, len)?,
            Msg::Key {
                key_id,
                enc,
                wrapped,
            } => inbox.key(ctl, me, &key_id, &enc, &wrapped)?,
            Msg::Licence { licence: raw, mac } => inbox.licence(raw, mac)?,
            Msg::CachedKey { key_id, blob } => inbox.cached_key(ctl, me, &key_id, &blob)?,
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
        if inbox.complete() {
            return Ok(Some(inbox));
        }
    }
}

impl Inbox {
    /// Manifest, the whole sealed program and the key are in.
    fn complete(&self) -> bool {
        let sealed = matches!(&self.sealed, Some(b) if self.received as usize == b.len());
        self.manifest.is_some() && sealed && self.key.is_some()
    }

    fn manifest(&mut self, bytes: &[u8]) -> Result<(), Fatal> {
        if self.manifest.is_some() {
            return Err(Fatal::new(code::PROTOCOL, "MANIFEST sent twice"));
        }
        let (m, aad) = seal::canonical_manifest(bytes)
            .map_err(|e| Fatal::new(code::MANIFEST, e.to_string()))?;
        // Whether secrets may live in unlocked memory (issue #14, item 4). Read before
        // SEALED_BEGIN allocates; a forged value cannot help: the manifest is the AAD,
        // so unsealing fails (the GCM tag is checked before anything is decrypted).
        crate::secmem::allow_unlocked(unlocked_memory_allowed(&m)?);
        self.manifest = Some((m, aad));
        Ok(())
    }

    fn sealed_begin(&mut self, total_len: u64) -> Result<(), Fatal> {
        if self.sealed.is_some() {
            return Err(Fatal::new(code::PROTOCOL, "SEALED_BEGIN sent twice"));
        }
        if total_len < seal::MIN_SEALED_LEN as u64 || total_len > MAX_SEALED {
            return Err(Fatal::new(
                code::BAD_REQUEST,
                format!("sealed program size {total_len} is out of range"),
            ));
        }
        // A refusal of unlocked memory is the SANDBOX error with its one sentence.
        self.sealed = Some(seal::Incoming::new(total_len as usize).map_err(|e| {
            memory_fatal(
                code::INTERNAL,
                format!("cannot allocate secret memory: {e}"),
            )
        })?);
        trace("SEALED_BEGIN: the program's secret memory allocated, its pages faulting in");
        Ok(())
    }

    /// The next `len` bytes of the sealed program, at the start of `shm`.
    fn sealed_chunk(&mut self, ctl: &mut UnixStream, shm: &Shm, len: u32) -> Result<(), Fatal> {
        let buf = self
            .sealed
            .as_mut()
            .ok_or_else(|| Fatal::new(code::PROTOCOL, "SEALED_CHUNK before SEALED_BEGIN"))?;
        let len = len as usize;
        let start = self.received as usize;
        if len == 0 || len > shm.len() || start + len > buf.len() {
            return Err(Fatal::new(
                code::BAD_REQUEST,
                "SEALED_CHUNK length out of range",
            ));
        }
        shm.read_into(0, buf.chunk_mut(start..start + len))
            .map_err(|e| Fatal::new(code::INTERNAL, e.to_string()))?;
        self.received += len as u64;
        write_msg(
            ctl,
            &Msg::ChunkOk {
                received: self.received,
            },
        )?;
        Ok(())
    }

    /// KEY: the data key wrapped to this worker's key pair, with the LICENCE sent
    /// before it (if any).
    fn key(
        &mut self,
        ctl: &mut UnixStream,
        me: &Identity,
        key_id: &str,
        enc: &[u8],
        wrapped: &[u8],
    ) -> Result<(), Fatal> {
        if self.key.is_some() {
            return Err(Fatal::new(code::PROTOCOL, "the data key was sent twice"));
        }
        let (m, _) = self
            .manifest
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
        no_tracer()?;
        let k = me
            .ek
            .unwrap_data_key(enc, wrapped, key_id)
            .map_err(|e| memory_fatal(code::KEY, e.to_string()))?;
        self.held_licence = admit_licence(
            ctl,
            m,
            key_id,
            &k,
            self.licence_msg.take(),
            Some(&me.pubkey),
            &me.bin,
            me.machine_id.as_deref(),
        )?;
        self.key = Some(k);
        Ok(())
    }

    fn licence(&mut self, raw: Vec<u8>, mac: [u8; 32]) -> Result<(), Fatal> {
        if self.key.is_some() {
            return Err(Fatal::new(
                code::PROTOCOL,
                "LICENCE after KEY (it must come before)",
            ));
        }
        if self.licence_msg.is_some() || raw.len() > licence::MAX_LICENCE {
            return Err(Fatal::new(
                code::LICENCE_INVALID,
                "LICENCE sent twice or too large",
            ));
        }
        self.licence_msg = Some((raw, mac));
        Ok(())
    }

    /// CACHED_KEY: the data key and licence from an offline key cache, instead of KEY
    /// and LICENCE.
    fn cached_key(
        &mut self,
        ctl: &mut UnixStream,
        me: &Identity,
        key_id: &str,
        blob: &[u8],
    ) -> Result<(), Fatal> {
        if self.key.is_some() || self.licence_msg.is_some() {
            return Err(Fatal::new(
                code::PROTOCOL,
                "CACHED_KEY replaces KEY and LICENCE; it cannot come with them",
            ));
        }
        let (m, _) = self
            .manifest
            .as_ref()
            .ok_or_else(|| Fatal::new(code::PROTOCOL, "CACHED_KEY before MANIFEST"))?;
        let want = m.get("private").and_then(|p| p.get("key_id"));
        if want.and_then(Value::as_str) != Some(key_id) {
            return Err(Fatal::new(
                code::KEY,
                format!("CACHED_KEY is for key id {key_id:?}, not this manifest's"),
            ));
        }
        let mid = me.machine_id.as_deref().ok_or_else(|| {
            Fatal::new(
                code::LICENCE_INVALID,
                "this machine has no /etc/machine-id, so an offline key cache cannot be opened",
            )
        })?;
        no_tracer()?;
        let c = licence::open_cache(mid, &me.bin, key_id, blob)
            .map_err(|e| Fatal::new(code::LICENCE_INVALID, e.to_string()))?;
        self.held_licence = admit_licence(
            ctl,
            m,
            key_id,
            &c.data_key,
            Some((c.licence_raw, c.mac)),
            None,
            &me.bin,
            None,
        )?;
        self.key = Some(c.data_key);
        Ok(())
    }
}

/// Whether the authenticated manifest requires a licence with the data key:
/// `private.licence: "required"` or `private.key_source: "keyserver"`. `licence` absent
/// or `"none"` requires none; any other value is refused (MANIFEST), so that a value
/// this worker does not know is never taken to mean "no licence".
fn licence_required(manifest: &Value) -> Result<bool, Fatal> {
    let private = manifest.get("private");
    let by_source = private
        .and_then(|p| p.get("key_source"))
        .and_then(Value::as_str)
        == Some("keyserver");
    let by_field = match private.and_then(|p| p.get("licence")) {
        None => false,
        Some(v) => match v.as_str() {
            Some("required") => true,
            Some("none") => false,
            _ => {
                return Err(Fatal::new(
                    code::MANIFEST,
                    format!(
                        "manifest private.licence is {v}, which this worker does not know \
                         (\"required\" or \"none\")"
                    ),
                ))
            }
        },
    };
    Ok(by_source || by_field)
}

/// Just before the data key is unwrapped: no tracer attached (checked at start too;
/// main.rs). Gramine's /proc may lack TracerPid: only natively, or where the start-up
/// check could read it (and the evidence says `tracer_check`), is that a refusal.
fn no_tracer() -> Result<(), Fatal> {
    let required = !platform::current().is_gramine() || crate::sandbox::startup().tracer;
    crate::sandbox::check_no_tracer(required)
        .map(|_| ())
        .map_err(|m| Fatal::new(code::SANDBOX, m))
}

/// `private.memory` in the manifest: absent (locked secret memory required) or
/// `"unlocked-ok"` (the owner allows plain memory where nothing can be locked, e.g.
/// `split --allow-unlocked-memory`); any other value is refused (MANIFEST), never read
/// as either.
fn unlocked_memory_allowed(manifest: &Value) -> Result<bool, Fatal> {
    match manifest.get("private").and_then(|p| p.get("memory")) {
        None => Ok(false),
        Some(v) if v.as_str() == Some("unlocked-ok") => Ok(true),
        Some(v) => Err(Fatal::new(
            code::MANIFEST,
            format!(
                "manifest private.memory is {v}, which this worker does not know \
                 (\"unlocked-ok\" or absent)"
            ),
        )),
    }
}

/// A failure to get secret memory becomes the SANDBOX refusal with its one sentence
/// (`secmem::UNLOCKED_REFUSED`); anything else keeps `code` and `msg`.
fn memory_fatal(code: u16, msg: String) -> Fatal {
    if msg.contains(crate::secmem::UNLOCKED_REFUSED) {
        Fatal::new(code::SANDBOX, crate::secmem::UNLOCKED_REFUSED)
    } else if msg.contains(crate::secmem::SECRET_REFUSED) {
        Fatal::new(code::SANDBOX, crate::secmem::SECRET_REFUSED)
    } else {
        Fatal::new(code, msg)
    }
}

/// Licence checks when the data key arrives (docs/key-release.md "Licences"). A bundle
/// whose authenticated manifest requires a licence (`licence_required`) gets no key
/// without a valid one; one sent with a local-key bundle is checked and enforced the
/// same way. `pubkey` is this worker's ephemeral key (None for a licence from the
/// offline cache, issued to an earlier worker). With `offline: true` and a machine id,
/// a fresh licence is sealed with the key into a KEY_CACHE frame for the host to store.
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
) -> Result<Option<licence::Held>, Fatal> {
    let required = licence_required(manifest)?;
    let Some((raw, mac)) = sent else {
        if required {
            return Err(Fatal::new(
                code::LICENCE_INVALID,
                "this bundle needs its licence from the key server (its manifest requires one), \
                 but only the key was sent",
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
    // A metered licence (a slice of the key's total budget) is for one worker: a cache
    // would restart it with a fresh allowance each time (docs/key-release.md).
    let metered = lic.query_budget.is_some();
    if pubkey.is_none() && metered {
        return Err(Fatal::new(
            code::LICENCE_INVALID,
            "the cached licence carries a query budget, which an offline key cache cannot \
             meter",
        ));
    }
    if let (Some(_), true, false, Some(mid)) = (pubkey, lic.offline, metered, machine_id) {
        let blob = licence::seal_cache(mid, bin, key_id, data_key, &raw, &mac).map_err(refuse)?;
        write_msg(
            ctl,
            &Msg::KeyCache {
                key_id: key_id.to_string(),
                blob,
            },
        )?;
    }
    licence::Held::new(lic, data_key).map(Some).map_err(refuse)
}

/// Unseal the program with the data key (which is zeroed as soon as it has been used)
/// and parse it. The plaintext container goes into secret memory and stays there: the
/// program uses the weights in place, and dropping it zeroes it.
fn open_program(sealed: seal::Incoming, aad: &[u8], key: SecretBuf<u8>) -> Result<Program, Fatal> {
    let (container, range) = sealed.unseal(aad, &key).map_err(|e| match e {
        seal::SealError::Authentication => Fatal::new(code::AUTHENTICATION, e.to_string()),
        seal::SealError::Memory(_) => memory_fatal(code::INTERNAL, e.to_string()),
        _ => Fatal::new(code::BAD_REQUEST, e.to_string()),
    })?;
    drop(key);
    trace("unsealed");
    let program = Program::from_secret(container, range).map_err(|e| {
        memory_fatal(
            code::PROGRAM,
            format!("the enclave program is invalid: {e}"),
        )
    })?;
    trace("program parsed");
    Ok(program)
}

/// Plan and warm up the executor, check the program against the manifest's tensor
/// specs and read the output policy. The program itself is dropped at the end: the
/// executor holds the weights.
fn load(
    program: Program,
    manifest: &Value,
    licence: Option<licence::Held>,
    args: &Args,
) -> Result<Loaded, Fatal> {
    let secmem = backing_name(program.weights_backing());
    let threads = if args.threads > 0 {
        args.threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    };
    let exec = Executor::new(&program, args.max_batch, threads)
        .map_err(|e| memory_fatal(code::PROGRAM, format!("cannot prepare the program: {e}")))?;
    exec.set_spin_us(args.spin_us);
    trace("executor ready (buffers, thread pool, warm-up)");
    let in_len = exec.input_len_per_sample();
    let out_len = exec.output_len_per_sample();
    let in_lens: Vec<usize> = exec
        .input_shapes()
        .iter()
        .map(|d| d.iter().product())
        .collect();
    if let Some(want) = manifest_lens(manifest, "private", "inputs") {
        if want != in_lens {
            return Err(Fatal::new(
                code::MANIFEST,
                format!(
                    "manifest private.inputs has {want:?} values per sample but the program's inputs have {in_lens:?}"
                ),
            ));
        }
    }
    for (part, which, have) in [("private", "outputs", out_len)] {
        if let Some(want) = manifest_len(manifest, part, which) {
            if want != have {
                return Err(Fatal::new(
                    code::MANIFEST,
                    format!("manifest {part}.{which} has {want} values per sample but the program has {have}"),
                ));
            }
        }
    }
    let policy =
        Policy::from_manifest(manifest, out_len).map_err(|e| Fatal::new(code::MANIFEST, e))?;
    drop(program);
    Ok(Loaded {
        licence,
        exec,
        policy,
        in_len,
        out_len,
        secmem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_len_of_specs() {
        let m: Value = serde_json::from_str(
            r#"{"private":{"inputs":[{"shape":[null,4,3]}],"outputs":[{"shape":[null]}],
                "bad":[{"shape":[null,-1]}],"huge":[{"shape":[null,4294967296,4294967296]}]}}"#,
        )
        .unwrap();
        assert_eq!(manifest_len(&m, "private", "inputs"), Some(12));
        assert_eq!(manifest_len(&m, "private", "outputs"), Some(1));
        assert_eq!(manifest_len(&m, "private", "bad"), None);
        assert_eq!(manifest_len(&m, "private", "huge"), None);
        assert_eq!(manifest_len(&m, "private", "missing"), None);
        assert_eq!(manifest_len(&m, "public", "inputs"), None);
        let two: Value = serde_json::from_str(
            r#"{"private":{"inputs":[{"shape":[null,8,16]},{"shape":[null,8]}],
                "bad":[{"shape":[null,8]},{"shape":[null,-1]}]}}"#,
        )
        .unwrap();
        assert_eq!(manifest_lens(&two, "private", "inputs"), Some(vec![128, 8]));
        assert_eq!(manifest_lens(&two, "private", "bad"), None);
    }

    #[test]
    fn licence_required_by_field_or_key_source_and_unknown_values_refused() {
        let req = |j: &str| licence_required(&serde_json::from_str(j).unwrap()).map_err(|e| e.0);
        assert!(!req(r#"{"private":{"key_source":"local"}}"#).unwrap());
        assert!(!req(r#"{"private":{"key_source":"local","licence":"none"}}"#).unwrap());
        assert!(req(r#"{"private":{"key_source":"local","licence":"required"}}"#).unwrap());
        assert!(req(r#"{"private":{"key_source":"keyserver"}}"#).unwrap());
        assert!(req(r#"{"private":{"key_source":"keyserver","licence":"none"}}"#).unwrap());
        for bad in [
            r#""optional""#,
            "null",
            "true",
            r#"{"v":1}"#,
            r#""Required""#,
        ] {
            let j = format!(r#"{{"private":{{"key_source":"local","licence":{bad}}}}}"#);
            assert_eq!(req(&j), Err(code::MANIFEST), "{bad}");
        }
    }

    #[test]
    fn evidence_binds_nonce_key_binary_and_protections() {
        let p = br#"{"seccomp":true}"#;
        let r = evidence_report(&[1; 32], &[2; 32], &[3; 32], p);
        assert_eq!(r.len(), 32);
        assert_ne!(r, evidence_report(&[0; 32], &[2; 32], &[3; 32], p));
        assert_ne!(r, evidence_report(&[1; 32], &[0; 32], &[3; 32], p));
        assert_ne!(r, evidence_report(&[1; 32], &[2; 32], &[0; 32], p));
        assert_ne!(r, evidence_report(&[1; 32], &[2; 32], &[3; 32], b"{}"));
        // The test vector of docs/attestation.md (tests/test_attest.py checks it too).
        let v = evidence_report(&[1; 32], &[2; 32], &[3; 32], b"{}");
        let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "986fc2c37b97e2c57ea8f218b423012490f09a0506d731882795e03976ebbb8f"
        );
    }

    #[test]
    fn protections_are_canonical_json() {
        let checks = crate::sandbox::StartupChecks {
            environment: true,
            ..Default::default()
        };
        let p = protections_json(checks, Backing::Mlocked, platform::Platform::Native);
        let v: Value = serde_json::from_str(&p).unwrap();
        let o = v.as_object().unwrap();
        let keys: Vec<&String> = o.keys().collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert_eq!(o.len(), 8);
        assert!(!p.contains(' '));
        assert!(
            ["memfd_secret", "mlock", "anonymous"].contains(&o["secret_memory"].as_str().unwrap())
        );
        assert_eq!(o["platform"], "native");
        assert_eq!(o["seccomp"], true);
        // No start-up checks ran in this test process.
        assert_eq!(o["tracer_check"], false);
    }

    /// Metered licences (a `query_budget`): never sealed into an offline key cache, and
    /// refused from one; an admitted one carries its usage signer.
    #[test]
    fn metered_licences_are_never_cached_and_sign_their_usage() {
        use std::io::Read;
        let dk = [7u8; 32];
        let (pk, bin) = ([1u8; 32], [2u8; 32]);
        let m: Value = serde_json::from_str(r#"{"private":{"licence":"required"}}"#).unwrap();
        let lic = |budget: &str| {
            let raw = format!(
                r#"{{"binary_sha256":"{}","client_id":"ab","evidence":"software","expires_at":4000000000,"issued_at":1,"key_id":"k1","licence_id":"0a","offline":true,"pubkey":"{}","query_budget":{budget},"v":1}}"#,
                licence::hex(&bin),
                licence::hex(&pk)
            )
            .into_bytes();
            let mac = licence::compute_mac(&dk, "k1", &raw).unwrap();
            (raw, mac)
        };
        let (mut ctl, mut host) = UnixStream::pair().unwrap();
        host.set_nonblocking(true).unwrap();
        let mut sent = Vec::new();
        // fresh, offline, metered: admitted with a signer, and no KEY_CACHE
        let held = admit_licence(
            &mut ctl,
            &m,
            "k1",
            &dk,
            Some(lic("5")),
            Some(&pk),
            &bin,
            Some(b"mid"),
        )
        .unwrap_or_else(|e| panic!("{}", e.1))
        .unwrap();
        assert!(held.usage.is_some() && held.licence.licence_id == "0a");
        assert!(host.read_to_end(&mut sent).is_err() && sent.is_empty());
        // the same licence from a cache: refused
        let e = admit_licence(&mut ctl, &m, "k1", &dk, Some(lic("5")), None, &bin, None)
            .err()
            .unwrap();
        assert_eq!(e.0, code::LICENCE_INVALID);
        assert!(e.1.contains("query budget"), "{}", e.1);
        // unmetered and offline: cached (KEY_CACHE sent), no signer
        let held = admit_licence(
            &mut ctl,
            &m,
            "k1",
            &dk,
            Some(lic("null")),
            Some(&pk),
            &bin,
            Some(b"mid"),
        )
        .unwrap_or_else(|e| panic!("{}", e.1))
        .unwrap();
        assert!(held.usage.is_none());
        let _ = host.read_to_end(&mut sent);
        assert_eq!(sent.get(4), Some(&crate::protocol::ty::KEY_CACHE));
    }
}
