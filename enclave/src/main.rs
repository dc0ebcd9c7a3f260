//! `ennclave-enclave` — the worker process that holds the private part of a model.
//!
//! ```text
//! ennclave-enclave --ctl-fd N --shm-fd M [--threads T] [--max-batch B] [--spin-us U]
//!                  [--idle-check-ms I]
//! ennclave-enclave --platform gramine --ctl-port P --shm-path /dev/shm/NAME --shm-bytes S [...]
//! ```
//!
//! `N` is an inherited AF_UNIX stream socket (control frames), `M` an inherited memfd
//! (tensors, the sealed program and, after READY, the doorbell). Under Gramine
//! (src/platform/gramine.rs) there are no inherited fds: the worker connects to the
//! host on 127.0.0.1:P, sends the token the host wrote to its stdin, and maps the
//! host's /dev/shm file. The message flow is in
//! docs/worker-protocol.md: HELLO → [CHALLENGE/EVIDENCE] → MANIFEST, SEALED_BEGIN,
//! SEALED_CHUNK…, KEY (any order after MANIFEST) → unseal → program → executor →
//! seccomp → READY → INFER (on the doorbell or as a frame)/PING… → SHUTDOWN.
//!
//! This file is start-up only (arguments, the inherited fds, the exit code); the
//! handshake is in `handshake.rs`, the serve loop in `serve.rs`.

use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

use ennclave_enclave::platform::{self, gramine, Platform};
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
     [--idle-check-ms I] [--evidence software|tsm]\n\
     \x20      ennclave-enclave --platform gramine --ctl-port P --shm-path /dev/shm/NAME --shm-bytes S [...] \
     (token on stdin)\n\
     (started by the ennclave Python runtime; not meant to be run by hand)"
        .to_string()
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        ctl_fd: -1,
        shm_fd: -1,
        ctl_port: 0,
        shm_path: None,
        shm_bytes: 0,
        platform: Platform::Native,
        tsm_evidence: false,
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
        match k.as_str() {
            "--platform" => {
                a.platform = match v.as_str() {
                    "native" => Platform::Native,
                    // gramine-direct or gramine-sgx: `gramine::detect` tells them apart.
                    "gramine" => Platform::Gramine { sgx: false },
                    _ => return Err(format!("--platform expects native or gramine, got {v:?}")),
                };
                continue;
            }
            "--shm-path" => {
                a.shm_path = Some(v);
                continue;
            }
            "--evidence" => {
                a.tsm_evidence = match v.as_str() {
                    "software" => false,
                    "tsm" => true,
                    _ => return Err(format!("--evidence expects software or tsm, got {v:?}")),
                };
                continue;
            }
            _ => {}
        }
        let n: i64 = v
            .parse()
            .map_err(|_| format!("{k} expects an integer, got {v:?}"))?;
        match k.as_str() {
            "--ctl-fd" => a.ctl_fd = n as i32,
            "--shm-fd" => a.shm_fd = n as i32,
            "--ctl-port" => {
                a.ctl_port = u16::try_from(n)
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("--ctl-port expects a TCP port, got {v:?}"))?
            }
            "--shm-bytes" => a.shm_bytes = n.clamp(0, 1 << 40) as usize,
            "--threads" => a.threads = n.max(0) as usize,
            "--max-batch" => a.max_batch = n.max(1) as usize,
            "--spin-us" => a.spin_us = n.clamp(0, 10_000) as u64,
            "--idle-check-ms" => a.idle_check_ms = n.clamp(1, 3_600_000) as u64,
            _ => return Err(format!("unknown argument {k}\n{}", usage())),
        }
    }
    if a.platform.is_gramine() {
        if a.ctl_port == 0
            || a.shm_path.is_none()
            || a.shm_bytes == 0
            || a.ctl_fd != -1
            || a.shm_fd != -1
        {
            return Err(format!(
                "--platform gramine needs --ctl-port, --shm-path and --shm-bytes (and no \
                 inherited fds)\n{}",
                usage()
            ));
        }
        return Ok(a);
    }
    if a.ctl_port != 0 || a.shm_path.is_some() || a.shm_bytes != 0 {
        return Err(format!(
            "--ctl-port, --shm-path and --shm-bytes are for --platform gramine\n{}",
            usage()
        ));
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
    let mut args = match parse_args() {
        Ok(a) => a,
        Err(m) => {
            eprintln!("{m}");
            return ExitCode::from(2);
        }
    };
    if args.platform.is_gramine() {
        match gramine::detect() {
            Ok(sgx) => args.platform = Platform::Gramine { sgx },
            Err(m) => {
                eprintln!("ennclave-enclave: {m}");
                return ExitCode::from(2);
            }
        }
    }
    platform::set(args.platform);
    if args.tsm_evidence {
        if args.platform.is_gramine() || !platform::tsm::available() {
            eprintln!(
                "ennclave-enclave: --evidence tsm needs Linux configfs-tsm ({}) inside a TDX, \
                 SEV-SNP or CCA confidential VM, natively; this machine has none, so use \
                 software evidence",
                platform::tsm::ROOT
            );
            return ExitCode::from(2);
        }
        platform::use_tsm_evidence();
    }
    if let Err(e) = platform::harden() {
        eprintln!("ennclave-enclave: cannot harden the process: {e}");
        return ExitCode::from(3);
    }
    // Before the seccomp filter (which refuses arch_prctl): AMX needs permission.
    ennclave_enclave::ops::qdense::enable_amx();
    let (mut ctl, shm) = match channels(&args) {
        Ok(c) => c,
        Err(m) => {
            eprintln!("ennclave-enclave: {m}");
            return ExitCode::from(2);
        }
    };
    // Refuse to run compromised (issue #14, item 3), before HELLO and long before any
    // key: the refusal goes to the host as a fatal SANDBOX error.
    if let Err(message) = refuse_if_compromised(&args) {
        let _ = write_msg(
            &mut ctl,
            &Msg::Error {
                code: ennclave_enclave::protocol::code::SANDBOX,
                fatal: true,
                message: message.clone(),
            },
        );
        eprintln!("ennclave-enclave: {message}");
        return ExitCode::from(1);
    }
    trace("environment, mappings and tracer checked");
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

/// The start-up checks: no dynamic-loader variable in the environment, no foreign
/// code mapped (native only: Gramine's loader maps its own libraries into the
/// process), no tracer (after `harden`, so none can attach later as the same user).
/// What they did is recorded for the protections in the evidence (`sandbox::startup`).
fn refuse_if_compromised(args: &Args) -> Result<(), String> {
    let native = !args.platform.is_gramine();
    let mut done = sandbox::StartupChecks {
        non_dumpable: native,
        // Asked here, not in the library: the default build passes
        // `-C target-feature=+crt-static` to this binary crate only (pyproject.toml
        // `rustc-args`, `cargo rustc`), and it is this crate's link that it makes static.
        static_binary: cfg!(target_feature = "crt-static"),
        ..Default::default()
    };
    // Under Gramine the environment is the measured manifest's (it sets LD_LIBRARY_PATH).
    let allowed: &[&str] = if native { &[] } else { &["LD_LIBRARY_PATH"] };
    sandbox::check_environment(std::env::vars_os().map(|(k, _)| k), allowed)?;
    done.environment = true;
    if native {
        let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| {
            format!("the enclave worker cannot read /proc/self/maps ({e}); it refuses to run")
        })?;
        let exe = std::fs::read_link("/proc/self/exe").map_err(|e| {
            format!("the enclave worker cannot read /proc/self/exe ({e}); it refuses to run")
        })?;
        sandbox::check_mappings(&maps, &exe.to_string_lossy(), done.static_binary)?;
        done.mappings = true;
    }
    done.tracer = sandbox::check_no_tracer(native)?;
    sandbox::record_startup(done);
    Ok(())
}

/// The control stream and the shared region: inherited fds (native), or a TCP
/// connection to the host and its /dev/shm file (Gramine).
fn channels(args: &Args) -> Result<(UnixStream, Shm), String> {
    if let Some(path) = &args.shm_path {
        // Map first: once the host has the token, it may unlink the file.
        let shm = gramine::map_shm(path, args.shm_bytes)
            .map_err(|e| format!("cannot map the shared-memory file {path}: {e}"))?;
        let token =
            gramine::read_token().map_err(|e| format!("cannot read the connection token: {e}"))?;
        let ctl = gramine::connect(args.ctl_port, &token).map_err(|e| {
            format!(
                "cannot connect to the host on 127.0.0.1:{}: {e}",
                args.ctl_port
            )
        })?;
        return Ok((ctl, shm));
    }
    if !fd_is(args.ctl_fd, libc::S_IFSOCK) {
        return Err(format!("--ctl-fd {} is not an open socket", args.ctl_fd));
    }
    // SAFETY: the fd was checked to be an open socket; it was handed to us by the host
    // for this purpose and nothing else in this process owns it.
    let ctl = unsafe { UnixStream::from_raw_fd(args.ctl_fd) };
    let shm = Shm::map_fd(args.shm_fd)
        .map_err(|e| format!("cannot map the shared-memory fd {}: {e}", args.shm_fd))?;
    Ok((ctl, shm))
}
