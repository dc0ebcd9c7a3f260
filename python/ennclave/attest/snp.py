"""AMD SEV-SNP attestation reports: layout, VCEK/VLEK chain to the pinned ARK, signature.

Layout: "SEV Secure Nested Paging Firmware ABI Specification" (AMD 56860), table
"ATTESTATION_REPORT Structure". 1184 bytes, little-endian; bytes 0x000–0x29F are
signed; the signature at 0x2A0 is ECDSA P-384 / SHA-384 with R and S as 72-byte
little-endian integers. Report versions 2, 3 and 5 share these offsets (v3 added the
CPUID fields, v5 mitigation vectors in what v2 calls reserved).

Chain (AMD "Versioned Chip Endorsement Key (VCEK) Certificate and KDS Interface
Specification" 57230, and the VLEK specification 58369): VCEK ← ASK ← ARK, or
VLEK ← ASVK ← ARK, each RSASSA-PSS SHA-384; the ARK is pinned per product (Milan,
Genoa) from `roots/`. The VCEK/VLEK's TCB extensions must equal REPORTED_TCB, and a
VCEK's hwID extension must equal CHIP_ID.

`verify_snp` checks authenticity only and returns every field; what to accept
(measurement, debug, migration agent, minimum TCB…) is `policy.check_snp`.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from . import der
from .certs import (
    SNP_PRODUCTS,
    Anchors,
    cn,
    ec_key,
    ecdsa_verify,
    extension_value,
    find,
    load_certificates,
    packaged_intermediate,
    verify_chain,
    when,
)
from .errors import EvidenceRefused

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0  # bytes 0x000..0x29F are what the signature covers

# ATTESTATION_REPORT offsets (AMD 56860).
OFF_VERSION = 0x000  # u32
OFF_GUEST_SVN = 0x004  # u32
OFF_POLICY = 0x008  # u64
OFF_FAMILY_ID = 0x010  # 16 B
OFF_IMAGE_ID = 0x020  # 16 B
OFF_VMPL = 0x030  # u32
OFF_SIGNATURE_ALGO = 0x034  # u32
OFF_CURRENT_TCB = 0x038  # u64 TCB_VERSION
OFF_PLATFORM_INFO = 0x040  # u64
OFF_FLAGS = 0x048  # u32: AUTHOR_KEY_EN bit 0, MASK_CHIP_KEY bit 1, SIGNING_KEY bits 4:2
OFF_REPORT_DATA = 0x050  # 64 B
OFF_MEASUREMENT = 0x090  # 48 B
OFF_HOST_DATA = 0x0C0  # 32 B
OFF_ID_KEY_DIGEST = 0x0E0  # 48 B
OFF_AUTHOR_KEY_DIGEST = 0x110  # 48 B
OFF_REPORT_ID = 0x140  # 32 B
OFF_REPORT_ID_MA = 0x160  # 32 B
OFF_REPORTED_TCB = 0x180  # u64 TCB_VERSION
OFF_CPUID_FAM_ID = 0x188  # u8 (v3+)
OFF_CPUID_MOD_ID = 0x189  # u8 (v3+)
OFF_CPUID_STEP = 0x18A  # u8 (v3+)
OFF_CHIP_ID = 0x1A0  # 64 B
OFF_COMMITTED_TCB = 0x1E0  # u64
OFF_CURRENT_BUILD = 0x1E8  # u8 build, u8 minor, u8 major
OFF_COMMITTED_BUILD = 0x1EC  # u8 build, u8 minor, u8 major
OFF_LAUNCH_TCB = 0x1F0  # u64
OFF_SIGNATURE_R = 0x2A0  # 72 B little-endian
OFF_SIGNATURE_S = 0x2E8  # 72 B little-endian
SIG_COMPONENT = 72

SIG_ALGO_ECDSA_P384_SHA384 = 1
SIGNING_KEY_VCEK, SIGNING_KEY_VLEK, SIGNING_KEY_NONE = 0, 1, 7
SUPPORTED_VERSIONS = (2, 3, 5)

# GUEST POLICY bits (AMD 56860, "GUEST_POLICY Structure").
POLICY_SMT = 1 << 16
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19
POLICY_SINGLE_SOCKET = 1 << 20

# VCEK/VLEK extensions (AMD 57230 table "VCEK Certificate Extensions").
OID_PRODUCT_NAME = "1.3.6.1.4.1.3704.1.2"
OID_BL_SPL = "1.3.6.1.4.1.3704.1.3.1"
OID_TEE_SPL = "1.3.6.1.4.1.3704.1.3.2"
OID_SNP_SPL = "1.3.6.1.4.1.3704.1.3.3"
OID_UCODE_SPL = "1.3.6.1.4.1.3704.1.3.8"
OID_HWID = "1.3.6.1.4.1.3704.1.4"

# Certificate table of the extended guest request / configfs-tsm auxblob (GHCB spec 56421).
GUID_ARK = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
GUID_ASK = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
GUID_VCEK = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
GUID_VLEK = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
CERT_TABLE_ENTRY = 24  # GUID 16 B, u32 offset, u32 length


@dataclass(frozen=True)
class TcbVersion:
    """TCB_VERSION for Milan and Genoa: byte 0 boot loader, 1 TEE, 6 SNP, 7 microcode."""

    raw: int
    bootloader: int
    tee: int
    snp: int
    microcode: int

    @classmethod
    def parse(cls, b: bytes) -> TcbVersion:
        return cls(int.from_bytes(b, "little"), b[0], b[1], b[6], b[7])

    def to_json(self) -> dict[str, int]:
        return {
            "bootloader": self.bootloader,
            "tee": self.tee,
            "snp": self.snp,
            "microcode": self.microcode,
        }


@dataclass(frozen=True)
class SnpReport:
    """Every field of an ATTESTATION_REPORT, named as in the ABI specification."""

    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: int
    author_key_en: bool
    mask_chip_key: bool
    signing_key: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    cpuid: tuple[int, int, int] | None  # family, model, stepping (v3+)
    chip_id: bytes
    committed_tcb: TcbVersion
    current_version: tuple[int, int, int]  # major, minor, build
    committed_version: tuple[int, int, int]
    launch_tcb: TcbVersion
    signed: bytes
    sig_r: int
    sig_s: int

    @property
    def debug(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)

    @property
    def migrate_ma(self) -> bool:
        return bool(self.policy & POLICY_MIGRATE_MA)

    @classmethod
    def parse(cls, b: bytes) -> SnpReport:
        if len(b) < REPORT_SIZE:
            raise EvidenceRefused(
                "truncated", f"An SEV-SNP report is {REPORT_SIZE} bytes; this one has {len(b)}."
            )
        if len(b) > REPORT_SIZE:
            raise EvidenceRefused(
                "malformed", f"An SEV-SNP report is {REPORT_SIZE} bytes; this one has {len(b)}."
            )
        u32 = lambda o: struct.unpack_from("<I", b, o)[0]
        u64 = lambda o: struct.unpack_from("<Q", b, o)[0]
        tcb = lambda o: TcbVersion.parse(b[o : o + 8])
        version = u32(OFF_VERSION)
        if version not in SUPPORTED_VERSIONS:
            raise EvidenceRefused(
                "unsupported", f"SEV-SNP report version {version} is not supported (2, 3 or 5)."
            )
        flags = u32(OFF_FLAGS)
        cur = b[OFF_CURRENT_BUILD : OFF_CURRENT_BUILD + 3]
        com = b[OFF_COMMITTED_BUILD : OFF_COMMITTED_BUILD + 3]
        return cls(
            version=version,
            guest_svn=u32(OFF_GUEST_SVN),
            policy=u64(OFF_POLICY),
            family_id=b[OFF_FAMILY_ID : OFF_FAMILY_ID + 16],
            image_id=b[OFF_IMAGE_ID : OFF_IMAGE_ID + 16],
            vmpl=u32(OFF_VMPL),
            signature_algo=u32(OFF_SIGNATURE_ALGO),
            current_tcb=tcb(OFF_CURRENT_TCB),
            platform_info=u64(OFF_PLATFORM_INFO),
            author_key_en=bool(flags & 1),
            mask_chip_key=bool(flags & 2),
            signing_key=(flags >> 2) & 7,
            report_data=b[OFF_REPORT_DATA : OFF_REPORT_DATA + 64],
            measurement=b[OFF_MEASUREMENT : OFF_MEASUREMENT + 48],
            host_data=b[OFF_HOST_DATA : OFF_HOST_DATA + 32],
            id_key_digest=b[OFF_ID_KEY_DIGEST : OFF_ID_KEY_DIGEST + 48],
            author_key_digest=b[OFF_AUTHOR_KEY_DIGEST : OFF_AUTHOR_KEY_DIGEST + 48],
            report_id=b[OFF_REPORT_ID : OFF_REPORT_ID + 32],
            report_id_ma=b[OFF_REPORT_ID_MA : OFF_REPORT_ID_MA + 32],
            reported_tcb=tcb(OFF_REPORTED_TCB),
            cpuid=(b[OFF_CPUID_FAM_ID], b[OFF_CPUID_MOD_ID], b[OFF_CPUID_STEP])
            if version >= 3
            else None,
            chip_id=b[OFF_CHIP_ID : OFF_CHIP_ID + 64],
            committed_tcb=tcb(OFF_COMMITTED_TCB),
            current_version=(cur[2], cur[1], cur[0]),
            committed_version=(com[2], com[1], com[0]),
            launch_tcb=tcb(OFF_LAUNCH_TCB),
            signed=b[:SIGNED_SIZE],
            sig_r=int.from_bytes(b[OFF_SIGNATURE_R : OFF_SIGNATURE_R + SIG_COMPONENT], "little"),
            sig_s=int.from_bytes(b[OFF_SIGNATURE_S : OFF_SIGNATURE_S + SIG_COMPONENT], "little"),
        )


@dataclass(frozen=True)
class SnpEvidence:
    """A verified SEV-SNP report: the fields a policy may look at."""

    report: SnpReport
    product: str  # Milan | Genoa
    signing_key: str  # vcek | vlek
    signer: x509.Certificate
    chip_id_checked: bool  # False for a VLEK or a masked (all-zero) CHIP_ID

    kind = "snp"

    @property
    def report_data(self) -> bytes:
        return self.report.report_data

    @property
    def debug(self) -> bool:
        return self.report.debug

    @property
    def tcb_status(self) -> str:
        """SEV-SNP has no TCB status: the VCEK/VLEK is for REPORTED_TCB, which this names."""
        t = self.report.reported_tcb
        return f"bl {t.bootloader} tee {t.tee} snp {t.snp} ucode {t.microcode}"

    def measurements(self) -> dict[str, str]:
        r = self.report
        return {
            "measurement": r.measurement.hex(),
            "host_data": r.host_data.hex(),
            "id_key_digest": r.id_key_digest.hex(),
            "author_key_digest": r.author_key_digest.hex(),
        }

    def to_json(self) -> dict[str, Any]:
        r = self.report
        return {
            "kind": "snp",
            "version": r.version,
            "product": self.product,
            "signing_key": self.signing_key,
            **self.measurements(),
            "report_data": r.report_data.hex(),
            "family_id": r.family_id.hex(),
            "image_id": r.image_id.hex(),
            "guest_svn": r.guest_svn,
            "policy": f"{r.policy:#x}",
            "debug": r.debug,
            "migrate_ma": r.migrate_ma,
            "vmpl": r.vmpl,
            "reported_tcb": r.reported_tcb.to_json(),
            "current_tcb": r.current_tcb.to_json(),
            "committed_tcb": r.committed_tcb.to_json(),
            "launch_tcb": r.launch_tcb.to_json(),
            "firmware": "{}.{} build {}".format(*r.current_version),
            "platform_info": f"{r.platform_info:#x}",
            "cpuid": None
            if r.cpuid is None
            else "family {:#x} model {:#x} stepping {}".format(*r.cpuid),
            "chip_id": r.chip_id.hex(),
            "chip_id_checked": self.chip_id_checked,
            "report_id": r.report_id.hex(),
            "signer": f"{cn(self.signer)} ({cn(self.signer.issuer)}), valid until {when(self.signer.not_valid_after_utc)}",
        }


def parse_cert_table(blob: bytes) -> list[x509.Certificate]:
    """The certificates in an SNP certificate table (extended report / configfs-tsm
    auxblob): entries of GUID ‖ u32 offset ‖ u32 length, ended by an all-zero entry."""
    out, off = [], 0
    known = {GUID_ARK, GUID_ASK, GUID_VCEK, GUID_VLEK}
    while True:
        if off + CERT_TABLE_ENTRY > len(blob):
            raise EvidenceRefused("truncated", "The SNP certificate table has no end entry.")
        guid = uuid.UUID(bytes=blob[off : off + 16])
        start, length = struct.unpack_from("<II", blob, off + 16)
        off += CERT_TABLE_ENTRY
        if guid.int == 0 and start == 0 and length == 0:
            return out
        if start + length > len(blob) or start < off:
            raise EvidenceRefused("malformed", "An SNP certificate table entry points outside it.")
        if guid in known:  # other entries (e.g. a CRL GUID) are not used here
            out.extend(load_certificates(blob[start : start + length], f"SNP table entry {guid}"))


def split_evidence(data: bytes) -> tuple[bytes, list[x509.Certificate]]:
    """Report ‖ optional certificate table (the key server's `sev-snp` evidence)."""
    if len(data) <= REPORT_SIZE:
        return data, []
    return data[:REPORT_SIZE], parse_cert_table(data[REPORT_SIZE:])


def _ext_int(cert: x509.Certificate, oid: str, name: str) -> int:
    raw = extension_value(cert, oid)
    if raw is None:
        raise EvidenceRefused(
            "bad_certificate", f"The {cn(cert)} certificate has no {name} extension."
        )
    try:
        return der.integer(der.read_one(raw))
    except der.DerError:
        raise EvidenceRefused(
            "bad_certificate", f"The {cn(cert)} certificate's {name} extension is not an integer."
        ) from None


def _hwid(cert: x509.Certificate) -> bytes | None:
    raw = extension_value(cert, OID_HWID)
    if raw is None:
        return None
    if len(raw) == 64:  # KDS puts the 64 raw bytes in the extension value
        return raw
    try:
        return der.octets(der.read_one(raw))
    except der.DerError:
        raise EvidenceRefused(
            "bad_certificate", "The VCEK's hwID extension is malformed."
        ) from None


def _product_of(signer: x509.Certificate, r: SnpReport, product: str | None) -> str:
    issuer = cn(signer.issuer)  # SEV-Milan, SEV-Genoa, SEV-VLEK-Milan, …
    from_chain = next((p for p in SNP_PRODUCTS if issuer.endswith("-" + p)), None)
    if from_chain is None:
        raise EvidenceRefused(
            "unsupported", f"The signing certificate's issuer {issuer} is not a Milan or Genoa CA."
        )
    if product is not None and product != from_chain:
        raise EvidenceRefused(
            "product_mismatch", f"The report is signed for {from_chain}, not {product}."
        )
    if r.cpuid is not None:
        fam, model, _ = r.cpuid
        # Family 19h: models 00-0F Milan, 10-1F Genoa, A0-AF Bergamo/Siena (Genoa chain).
        by_cpu = (
            "Milan"
            if fam == 0x19 and model <= 0x0F
            else "Genoa"
            if fam == 0x19 and (0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF)
            else None
        )
        if by_cpu != from_chain:
            raise EvidenceRefused(
                "product_mismatch",
                f"The report's CPUID (family {fam:#x}, model {model:#x}) is not a {from_chain} CPU.",
            )
    return from_chain


def verify_snp(
    report: bytes,
    certs: Iterable[x509.Certificate] = (),
    *,
    at: datetime,
    product: str | None = None,
    anchors: Anchors | None = None,
) -> SnpEvidence:
    """Verify an SEV-SNP report at time `at`. `certs`: the VCEK or VLEK (required) and
    optionally the ASK/ASVK and ARK (the packaged ones are used otherwise; a given ARK
    must be the pinned one). Raises `EvidenceRefused`."""
    anchors = anchors or Anchors.pinned()
    r = SnpReport.parse(report)
    certs = list(certs)
    if r.signature_algo != SIG_ALGO_ECDSA_P384_SHA384:
        raise EvidenceRefused(
            "unsupported",
            f"Signature algorithm {r.signature_algo} is not ECDSA P-384 with SHA-384.",
        )
    if r.mask_chip_key or r.signing_key == SIGNING_KEY_NONE:
        raise EvidenceRefused(
            "bad_signature", "The SEV-SNP report is not signed (chip key masked)."
        )
    if r.signing_key not in (SIGNING_KEY_VCEK, SIGNING_KEY_VLEK):
        raise EvidenceRefused("malformed", f"Unknown SIGNING_KEY value {r.signing_key}.")
    key_name = "vcek" if r.signing_key == SIGNING_KEY_VCEK else "vlek"
    signer = find(certs, f"SEV-{key_name.upper()}")
    if signer is None:
        raise EvidenceRefused(
            "collateral_missing",
            f"No {key_name.upper()} certificate was given; fetch it from AMD's KDS for this "
            "chip and TCB.",
        )
    prod = _product_of(signer, r, product)
    ca_cn = f"SEV-{prod}" if key_name == "vcek" else f"SEV-VLEK-{prod}"
    ca = find(certs, ca_cn) or packaged_intermediate(
        f"amd-{'ask' if key_name == 'vcek' else 'asvk'}-{prod.lower()}.pem"
    )
    if ca is None:
        raise EvidenceRefused("collateral_missing", f"No {ca_cn} certificate was given.")
    ark = anchors.amd_arks.get(prod)
    if ark is None:
        raise EvidenceRefused("untrusted_root", f"No ARK is pinned for {prod}.")
    given_ark = find(certs, f"ARK-{prod}")
    verify_chain([signer, ca] + ([given_ark] if given_ark else []), ark, at)

    key = ec_key(signer, ec.SECP384R1)
    if not ecdsa_verify(key, r.sig_r, r.sig_s, r.signed, hashes.SHA384()):
        raise EvidenceRefused(
            "bad_signature",
            f"The SEV-SNP report's signature does not verify under the {key_name.upper()}.",
        )
    got = TcbVersion(
        0,
        _ext_int(signer, OID_BL_SPL, "blSPL"),
        _ext_int(signer, OID_TEE_SPL, "teeSPL"),
        _ext_int(signer, OID_SNP_SPL, "snpSPL"),
        _ext_int(signer, OID_UCODE_SPL, "ucodeSPL"),
    )
    rt = r.reported_tcb
    if (got.bootloader, got.tee, got.snp, got.microcode) != (
        rt.bootloader,
        rt.tee,
        rt.snp,
        rt.microcode,
    ):
        raise EvidenceRefused(
            "tcb_mismatch",
            f"The {key_name.upper()} is for TCB {got.to_json()}, the report says {rt.to_json()}.",
        )
    chip_checked = False
    if key_name == "vcek" and any(r.chip_id):  # an all-zero CHIP_ID is masked by the host
        hwid = _hwid(signer)
        if hwid != r.chip_id:
            raise EvidenceRefused(
                "chip_id_mismatch", "The VCEK belongs to another chip than CHIP_ID."
            )
        chip_checked = True
    return SnpEvidence(r, prod, key_name, signer, chip_checked)
