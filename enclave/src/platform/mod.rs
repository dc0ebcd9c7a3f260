//! Where the worker runs, and what that changes (docs/platforms.md).
//!
//! * [`Platform::Native`] — plain Linux, today's behaviour, byte for byte: control
//!   frames on an inherited `AF_UNIX` socket, tensors in an inherited memfd, the
//!   doorbell's futexes, `memfd_secret`, `prctl` hardening and the seccomp filter
//!   (`sandbox`).
//! * [`Platform::Gramine`] — inside Gramine (`gramine-direct`, or `gramine-sgx` in an
//!   SGX enclave), which offers none of those (see `gramine`): control frames over TCP
//!   to the host on 127.0.0.1, tensors in a `/dev/shm` file mapped through the
//!   manifest's `untrusted_shm` mount, requests as INFER frames (no doorbell: Gramine
//!   has no futexes shared with the host), no seccomp or `prctl` (under SGX the
//!   enclave's memory is the protection; under `gramine-direct` there is none, see
//!   docs/platforms.md).
//!
//! The platform is set once at start-up from the command line (`--platform`), after
//! `gramine::detect` has confirmed that Gramine is really there; the handshake reports
//! it in HELLO, and under `gramine-sgx` the evidence is an SGX quote from Gramine's
//! `/dev/attestation` (`evidence`).

pub mod gramine;
pub mod tsm;

use std::sync::OnceLock;

use crate::protocol::code;
use crate::sandbox;
use crate::worker::{trace, Fatal};

/// Where this worker runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Platform {
    Native,
    /// Inside Gramine; `sgx`: in an SGX enclave (Gramine's attestation type is not
    /// `none`), else `gramine-direct` (an ordinary process, no protection).
    Gramine {
        sgx: bool,
    },
}

impl Platform {
    /// The name in HELLO and in docs/platforms.md.
    pub fn name(self) -> &'static str {
        match self {
            Platform::Native => "native",
            Platform::Gramine { sgx: false } => "gramine-direct",
            Platform::Gramine { sgx: true } => "gramine-sgx",
        }
    }

    pub fn is_gramine(self) -> bool {
        matches!(self, Platform::Gramine { .. })
    }
}

static CURRENT: OnceLock<Platform> = OnceLock::new();
static TSM_EVIDENCE: OnceLock<()> = OnceLock::new();

/// Answer challenges with configfs-tsm reports (`--evidence tsm`, checked at start:
/// native only, and only where configfs-tsm exists). Set once; untested on hardware.
pub fn use_tsm_evidence() {
    let _ = TSM_EVIDENCE.set(());
}

/// Record the platform (once, at start-up). Later calls are ignored.
pub fn set(p: Platform) {
    let _ = CURRENT.set(p);
}

/// The platform set at start-up (native until then, e.g. in unit tests).
pub fn current() -> Platform {
    CURRENT.get().copied().unwrap_or(Platform::Native)
}

/// Process hardening before any secret exists: native only (`prctl` and `setrlimit`
/// are not implemented by Gramine).
pub fn harden() -> std::io::Result<()> {
    match current() {
        Platform::Native => sandbox::harden_process(),
        Platform::Gramine { .. } => Ok(()),
    }
}

/// After the program is loaded, before the first INFER: the seccomp filter, native
/// only (Gramine answers `seccomp` with ENOSYS; inside SGX the enclave boundary, not a
/// syscall filter, keeps the host out).
pub fn lock_down() -> Result<(), Fatal> {
    match current() {
        Platform::Native => {
            sandbox::install_seccomp().map_err(|e| Fatal::new(code::SANDBOX, e.to_string()))?;
            trace("seccomp installed");
        }
        Platform::Gramine { .. } => trace("no seccomp filter under Gramine"),
    }
    Ok(())
}

/// The EVIDENCE answer (kind, report) for evidence hash `h` (handshake.rs
/// `evidence_report`; docs/key-release.md). Native and `gramine-direct`: the software
/// report, `h` itself (kind `none`); native with `--evidence tsm`: the confidential
/// VM's report from configfs-tsm (`tsm`, **untested on hardware**). `gramine-sgx`: an SGX DCAP quote whose
/// REPORT_DATA is `h ‖ 32 zero bytes` (kind `sgx-dcap-v3`) — **untested on SGX
/// hardware**; a failure to get one is fatal rather than a silent downgrade.
pub fn evidence(h: &[u8]) -> Result<(String, Vec<u8>), Fatal> {
    match current() {
        Platform::Gramine { sgx: true } => {
            let rd = report_data(h);
            let quote = gramine::sgx_quote(&rd).map_err(|e| {
                Fatal::new(
                    code::INTERNAL,
                    format!("cannot get an SGX quote from /dev/attestation: {e}"),
                )
            })?;
            Ok(("sgx-dcap-v3".into(), quote))
        }
        Platform::Native if TSM_EVIDENCE.get().is_some() => {
            // A confidential VM's report over h ‖ zeros (TDX quote, SEV-SNP report +
            // certificate table); a failure is fatal, never a silent downgrade.
            tsm::report(&report_data(h)).map_err(|e| {
                Fatal::new(
                    code::INTERNAL,
                    format!("cannot get a report from configfs-tsm ({}): {e}", tsm::ROOT),
                )
            })
        }
        _ => Ok(("none".into(), h.to_vec())),
    }
}

/// A hardware report's 64-byte REPORT_DATA for evidence hash `h`: `h ‖ zeros`.
pub fn report_data(h: &[u8]) -> [u8; 64] {
    let mut rd = [0u8; 64];
    let n = h.len().min(32);
    rd[..n].copy_from_slice(&h[..n]);
    rd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_report_data() {
        assert_eq!(Platform::Native.name(), "native");
        assert_eq!(Platform::Gramine { sgx: false }.name(), "gramine-direct");
        assert_eq!(Platform::Gramine { sgx: true }.name(), "gramine-sgx");
        let rd = report_data(&[7u8; 32]);
        assert_eq!(&rd[..32], &[7u8; 32]);
        assert_eq!(&rd[32..], &[0u8; 32]);
        // Unit tests run natively: the software report is the hash itself.
        assert_eq!(
            evidence(&[1, 2, 3]).ok(),
            Some(("none".into(), vec![1, 2, 3]))
        );
    }
}
