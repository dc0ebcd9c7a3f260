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
//!
//! This file is start-up only (arguments, the inherited fds, the exit code); the
//! handshake is in `handshake.rs`, the serve loop in `serve.rs`.

use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

use ennclave_enclave::protocol::{write_msg, FrameReader, Msg, Shm, PROTOCOL_VERSION};
use ennclave_enclave::sandbox;
use ennclave_enclave::worker::{self, trace, Args, Fatal};

const DEFAULT_MAX_BATCH: usize = 1024;
/// After answering, poll the doorbell this long before sleeping on it. Waking a
/// sleeping thread costs tens of µs on a VM (scheduler + IPI); a host that sends its
/// next request within the window skips that cost. Bounded, so an idle worker sleeps.
const DEFAULT_SPIN_US: u64 = 200;
/// The longest an idle worker sleeps before it checks whether the host hung up.
const DEFAULT_IDLE_CHECK_MS: u64 = 100;

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

/// Whether `fd` is open and of file type `kind` (`libc::S_IFSOCK`, ...).
fn fd_is(fd: i32, kind: libc::mode_t) -> bool {
    // SAFETY: `stat` is a plain C struct, for which all zero bytes is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat into a zeroed local struct; an invalid fd yields EBADF.
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
    let result = worker::run(&mut ctl, &mut rd, &shm, &args);
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
