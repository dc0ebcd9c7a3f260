//! Evidence from Linux configfs-tsm (`/sys/kernel/config/tsm/report`), the kernel's
//! one interface to TDX, SEV-SNP and Arm CCA guest reports inside a confidential VM.
//! Used for EVIDENCE when the host starts the worker with `--evidence tsm`
//! (`ennclave.load(..., evidence="tsm")`). **Untested on TDX, SEV-SNP or CCA
//! hardware** (docs/platforms.md): the tests drive [`report_in`] against an ordinary
//! directory laid out like configfs, so everything above the kernel's files is
//! exercised.
//!
//! One report: create an entry directory, write the 64-byte `inblob` (REPORT_DATA),
//! read `provider` and `outblob` (and, for SEV-SNP, `auxblob`: the certificate table
//! with the VCEK or VLEK), remove the entry.

use std::io;
use std::path::Path;

/// Where the kernel offers configfs-tsm.
pub const ROOT: &str = "/sys/kernel/config/tsm/report";

/// The evidence kind (docs/key-release.md) for a configfs-tsm provider name.
pub fn kind_for_provider(provider: &str) -> Option<&'static str> {
    match provider.trim() {
        "tdx_guest" => Some("tdx-dcap"),
        "sev_guest" => Some("sev-snp"),
        "arm_cca_guest" => Some("cca"),
        _ => None,
    }
}

/// Whether this machine offers configfs-tsm.
pub fn available() -> bool {
    Path::new(ROOT).is_dir()
}

/// A report over `report_data` from the configfs-tsm tree at `root`: (kind, report),
/// the report being `outblob`, followed for SEV-SNP by `auxblob` (the layout the key
/// server reads, docs/key-release.md).
pub fn report_in(root: &Path, report_data: &[u8; 64]) -> io::Result<(String, Vec<u8>)> {
    let mut nonce = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
    let entry = root.join(format!(
        "ennclave-{}-{:016x}",
        std::process::id(),
        u64::from_le_bytes(nonce)
    ));
    std::fs::create_dir(&entry)?;
    let got = read_entry(&entry, report_data);
    // configfs removes the entry's attribute files itself; a plain directory (tests)
    // needs them removed first.
    if std::fs::remove_dir(&entry).is_err() {
        let _ = std::fs::remove_dir_all(&entry);
    }
    got
}

/// Write `report_data` into the existing entry `entry` and read its report back.
pub fn read_entry(entry: &Path, report_data: &[u8; 64]) -> io::Result<(String, Vec<u8>)> {
    std::fs::write(entry.join("inblob"), report_data)?;
    let provider = std::fs::read_to_string(entry.join("provider"))?;
    let kind = kind_for_provider(&provider).ok_or_else(|| {
        io::Error::other(format!(
            "unknown configfs-tsm provider {:?}",
            provider.trim()
        ))
    })?;
    let mut report = std::fs::read(entry.join("outblob"))?;
    if report.is_empty() {
        return Err(io::Error::other("configfs-tsm returned an empty report"));
    }
    if kind == "sev-snp" {
        if let Ok(aux) = std::fs::read(entry.join("auxblob")) {
            report.extend_from_slice(&aux);
        }
    }
    Ok((kind.to_string(), report))
}

/// [`report_in`] on the kernel's tree.
pub fn report(report_data: &[u8; 64]) -> io::Result<(String, Vec<u8>)> {
    report_in(Path::new(ROOT), report_data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_names() {
        assert_eq!(kind_for_provider("tdx_guest\n"), Some("tdx-dcap"));
        assert_eq!(kind_for_provider("sev_guest"), Some("sev-snp"));
        assert_eq!(kind_for_provider("arm_cca_guest"), Some("cca"));
        assert_eq!(kind_for_provider("other"), None);
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("tsm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// An entry laid out as configfs shows it: the report data goes in, the
    /// provider's report (and SEV-SNP's certificate table) comes out.
    #[test]
    fn entry_read_as_the_kernel_lays_it_out() {
        let e = scratch("snp");
        std::fs::write(e.join("provider"), "sev_guest\n").unwrap();
        std::fs::write(e.join("outblob"), [9u8; 16]).unwrap();
        std::fs::write(e.join("auxblob"), [5u8; 4]).unwrap();
        let (kind, report) = read_entry(&e, &[1u8; 64]).unwrap();
        assert_eq!(kind, "sev-snp");
        assert_eq!(report, [[9u8; 16].as_slice(), &[5u8; 4]].concat());
        assert_eq!(std::fs::read(e.join("inblob")).unwrap(), vec![1u8; 64]);
        std::fs::write(e.join("provider"), "tdx_guest").unwrap();
        assert_eq!(read_entry(&e, &[1u8; 64]).unwrap().1, vec![9u8; 16]);
        std::fs::write(e.join("provider"), "mystery").unwrap();
        assert!(read_entry(&e, &[1u8; 64]).is_err());
        std::fs::write(e.join("provider"), "tdx_guest").unwrap();
        std::fs::write(e.join("outblob"), b"").unwrap();
        assert!(read_entry(&e, &[1u8; 64]).is_err());
        std::fs::remove_dir_all(&e).unwrap();
    }

    /// A fresh entry with no provider (not configfs) fails, and leaves nothing behind.
    #[test]
    fn plain_directory_fails_and_cleans_up() {
        let root = scratch("root");
        let err = report_in(&root, &[1u8; 64]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
