//! What the handshake and the serve loop share: the worker's settings ([`Args`]), the
//! error that ends the worker ([`Fatal`]), start-up tracing, and [`run`] (handshake,
//! then serve until the host is done).

use std::os::unix::net::UnixStream;

use crate::handshake::handshake;
use crate::protocol::{code, FrameReader, ProtoError, Shm};
use crate::serve::serve;

/// `ENNCLAVE_TRACE=1`: start-up phase timings (no secrets) on stderr.
static TRACE: std::sync::OnceLock<Option<std::time::Instant>> = std::sync::OnceLock::new();

/// Print a start-up phase's time since the first call, with `ENNCLAVE_TRACE=1`.
pub fn trace(phase: &str) {
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

/// The worker's command line (parsed by the binary).
pub struct Args {
    pub ctl_fd: i32,
    pub shm_fd: i32,
    /// `--platform gramine`: the host's TCP port on 127.0.0.1 (else 0).
    pub ctl_port: u16,
    /// `--platform gramine`: the shared-memory file under /dev/shm.
    pub shm_path: Option<String>,
    /// `--platform gramine`: the size of that file.
    pub shm_bytes: usize,
    /// Where the worker runs (`--platform`, checked at start).
    pub platform: crate::platform::Platform,
    /// `--evidence tsm`: answer challenges with a hardware report from configfs-tsm
    /// (inside a TDX / SEV-SNP / CCA confidential VM) instead of software evidence.
    pub tsm_evidence: bool,
    /// Executor threads; 0: one per available CPU.
    pub threads: usize,
    pub max_batch: usize,
    /// After answering, poll the doorbell this long (µs) before sleeping on it.
    pub spin_us: u64,
    /// The longest an idle worker sleeps (ms) before it checks whether the host hung up.
    pub idle_check_ms: u64,
}

/// A failure that ends the worker (sent as a fatal ERROR frame).
pub struct Fatal(pub u16, pub String);

impl Fatal {
    pub fn new(code: u16, msg: impl Into<String>) -> Self {
        Fatal(code, msg.into())
    }
}

impl From<ProtoError> for Fatal {
    fn from(e: ProtoError) -> Self {
        Fatal(code::PROTOCOL, e.to_string())
    }
}

/// The worker's life after start-up: the handshake, then (unless the host left during
/// it) the serve loop until SHUTDOWN or hang-up.
pub fn run(
    ctl: &mut UnixStream,
    rd: &mut FrameReader,
    shm: &Shm,
    args: &Args,
) -> Result<(), Fatal> {
    handshake(ctl, rd, shm, args).and_then(|l| match l {
        // Serve from inside the executor's pool: each INFER then starts on a pool
        // thread instead of being handed to the pool and back.
        Some(l) => l.exec.pool().install(|| serve(ctl, rd, shm, args, l)),
        None => Ok(()),
    })
}
