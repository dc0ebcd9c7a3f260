//! The worker inside Gramine (v1.9; docs/platforms.md, /work/shared/gramine/README.md).
//!
//! Gramine passes only stdin, stdout and stderr to the process (no inherited socket or
//! memfd), has no `memfd_create`, `memfd_secret`, `prctl` or seccomp, keeps `AF_UNIX`
//! sockets in its own namespace, and treats every futex as private. What it does
//! offer, and what the worker uses:
//!
//! * **control frames over TCP to 127.0.0.1:PORT.** The host listens; the worker
//!   connects and first sends the 32-byte token the host wrote to its stdin (never on
//!   the command line, which other local users can read in /proc), so the host accepts
//!   only its own worker's connection ([`connect`], [`read_token`]);
//! * **tensors in a host-created `/dev/shm` file**, mapped `MAP_SHARED` through the
//!   manifest's `untrusted_shm` mount of /dev/shm ([`map_shm`]);
//! * **waiting by `poll` on the socket** instead of the doorbell's futex
//!   ([`wait_readable`]): requests come as INFER frames.
//!
//! Under `gramine-sgx`, `/dev/attestation` gives an SGX quote over 64 bytes of
//! report data ([`sgx_quote`]; untested on SGX hardware).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::protocol::Shm;

/// Bytes of the connection token.
pub const TOKEN_LEN: usize = 32;

const ATTESTATION_TYPE: &str = "/dev/attestation/attestation_type";

/// The environment variable the worker's manifest template sets (`loader.env`, part
/// of the measured manifest): a second sign, next to /dev/attestation, that the
/// process runs under the manifest `ennclave gramine` wrote.
pub const MANIFEST_ENV: &str = "ENNCLAVE_GRAMINE_MANIFEST";

/// Whether this process runs inside Gramine, and if so whether in SGX. Gramine's
/// pseudo-filesystem `/dev/attestation` (with its `keys` folder) is there under both
/// PALs; in an SGX enclave with attestation it also has `attestation_type` (`dcap`,
/// `epid`), under gramine-direct it has not (measured with v1.9). The manifest's
/// [`MANIFEST_ENV`] must be set too. `Err`: not under ennclave's Gramine manifest.
pub fn detect() -> Result<bool, String> {
    if !std::path::Path::new("/dev/attestation/keys").is_dir() {
        return Err(
            "--platform gramine, but this process is not running under Gramine (no /dev/attestation)"
                .into(),
        );
    }
    if std::env::var_os(MANIFEST_ENV).is_none_or(|v| v != "1") {
        return Err(format!(
            "--platform gramine, but the Gramine manifest is not ennclave's (no {MANIFEST_ENV}=1); \
             write it with `ennclave gramine`"
        ));
    }
    let kind = std::fs::read_to_string(ATTESTATION_TYPE).unwrap_or_default();
    Ok(!kind.trim().is_empty() && kind.trim() != "none")
}

/// The connection token: 64 hex digits on the first line of stdin.
pub fn read_token() -> io::Result<[u8; TOKEN_LEN]> {
    let mut line = [0u8; 2 * TOKEN_LEN];
    io::stdin().lock().read_exact(&mut line)?;
    let mut token = [0u8; TOKEN_LEN];
    for (i, pair) in line.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).map_err(|_| bad_token())?;
        token[i] = u8::from_str_radix(s, 16).map_err(|_| bad_token())?;
    }
    Ok(token)
}

fn bad_token() -> io::Error {
    io::Error::other("the connection token on stdin is not 64 hex digits")
}

/// Connect to the host's control port on 127.0.0.1 and send the token. The stream is
/// returned as a `UnixStream` so that the handshake and serve loop run unchanged:
/// they only read, write and `recv`/`poll` it, which are the same calls on any
/// connected stream socket.
pub fn connect(port: u16, token: &[u8; TOKEN_LEN]) -> io::Result<UnixStream> {
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(30))?;
    s.set_nodelay(true)?;
    s.write_all(token)?;
    Ok(UnixStream::from(OwnedFd::from(s)))
}

/// Map the first `len` bytes of the host's shared-memory file (under /dev/shm, the
/// manifest's `untrusted_shm` mount; Gramine reports no size for it, so the host passes
/// it). Only plain names directly under /dev/shm are accepted.
pub fn map_shm(path: &str, len: usize) -> io::Result<Shm> {
    let name = path
        .strip_prefix("/dev/shm/")
        .filter(|n| !n.is_empty() && !n.contains('/') && *n != "." && *n != "..")
        .ok_or_else(|| io::Error::other("--shm-path must be a file directly under /dev/shm"))?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/dev/shm/{name}"))?;
    Shm::map_fd_len(f.into_raw_fd(), len)
}

/// Sleep until `sock` is readable (a frame, or the host hung up), at most `timeout`.
pub fn wait_readable(sock: &UnixStream, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd on the stack for the duration of the call; any result
    // (ready, timeout, EINTR) is fine, the caller checks the socket again.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

/// An SGX quote over `report_data` from Gramine's /dev/attestation (write
/// `user_report_data`, read `quote`). **Untested on SGX hardware.**
pub fn sgx_quote(report_data: &[u8; 64]) -> io::Result<Vec<u8>> {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/attestation/user_report_data")?
        .write_all(report_data)?;
    let quote = std::fs::read("/dev/attestation/quote")?;
    if quote.is_empty() {
        return Err(io::Error::other("empty quote"));
    }
    Ok(quote)
}
