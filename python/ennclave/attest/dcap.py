"""Intel DCAP (ECDSA) quotes: the parts SGX and TDX share.

Layouts: "Intel SGX ECDSA Quote Library API" (quote v3, appendix A) and "Intel TDX DCAP
Quoting Library API" (quote v4 and v5, appendix A). Little-endian throughout.

```
header       48 B  u16 version · u16 att_key_type (2 = ECDSA-256 P-256) · u32 tee_type
                   (0x00 SGX, 0x81 TDX) · u16 qe_svn · u16 pce_svn (v4/v5: reserved) ·
                   16 B qe_vendor_id · 20 B user_data
v5 only            u16 body_type (1 SGX, 2 TD 1.0, 3 TD 1.5) · u32 body_size
body               384 B SGX enclave report | 584 B TD 1.0 report | 648 B TD 1.5 report
u32 signature data length, then the signature data:
  64 B  ECDSA signature (r‖s) over header ‖ [v5 type ‖ size] ‖ body, by the attestation key
  64 B  attestation public key (P-256 x‖y)
  v3:   QE report (384) · QE report signature (64) · u16 + QE auth data ·
        u16 cert type · u32 size · cert data (type 5: PEM PCK chain)
  v4/5: u16 cert type (6) · u32 size · QE report certification data =
        QE report (384) · QE report signature (64) · u16 + QE auth data ·
        u16 cert type (5) · u32 size · PEM PCK chain
```

Verification (`verify_quote`): PCK chain to the pinned Intel SGX Root CA · CRLs when
given · the QE report's signature by the PCK key · the QE report binding
(REPORT_DATA = SHA-256(attestation key ‖ QE auth data) ‖ 0³²) · the attestation key's
signature over header and body · when TCB Info and QE Identity are given (Intel PCS
"TCB Info" v3 and "Enclave Identity" v2), their signatures by the Intel SGX TCB
Signing key (chained to the same root), their validity at the verification time, the
QE identity, and the TCB level from the PCK certificate's SGX extensions (and, for
TDX, the TEE TCB SVN and the TDX module identity), as Intel's Quote Verification
Library computes it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from . import der
from .certs import (
    Anchors,
    check_crl,
    cn,
    ec_key,
    ecdsa_verify,
    extension_value,
    load_certificates,
    load_crl,
    order_chain,
    p256_key,
    packaged_intermediate,
    verify_chain,
    when,
)
from .errors import EvidenceRefused

HEADER_SIZE = 48
ENCLAVE_REPORT_SIZE = 384
TD10_REPORT_SIZE = 584
TD15_REPORT_SIZE = 648
ATT_KEY_ECDSA_P256 = 2
TEE_SGX = 0x00
TEE_TDX = 0x81
BODY_SGX, BODY_TD10, BODY_TD15 = 1, 2, 3
BODY_SIZES = {
    BODY_SGX: ENCLAVE_REPORT_SIZE,
    BODY_TD10: TD10_REPORT_SIZE,
    BODY_TD15: TD15_REPORT_SIZE,
}
CERT_PCK_CHAIN = 5  # PEM: PCK leaf, intermediate CA, root CA
CERT_QE_REPORT = 6  # QE report certification data (v4/v5)
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
MAX_QUOTE = 64 * 1024

# Intel "SGX PCK Certificate and CRL Profile": the SGX extension tree.
OID_SGX_EXTENSIONS = "1.2.840.113741.1.13.1"
OID_PPID = OID_SGX_EXTENSIONS + ".1"
OID_TCB = OID_SGX_EXTENSIONS + ".2"  # .1 … .16 component SVNs, .17 PCESVN, .18 CPUSVN
OID_PCEID = OID_SGX_EXTENSIONS + ".3"
OID_FMSPC = OID_SGX_EXTENSIONS + ".4"
OID_SGX_TYPE = OID_SGX_EXTENSIONS + ".5"

TCB_SIGNING_CN = "Intel SGX TCB Signing"

# TCB statuses (Intel PCS TCB Info v3) and the one this module adds when no level matches.
UP_TO_DATE = "UpToDate"
SW_HARDENING = "SWHardeningNeeded"
CONFIG_NEEDED = "ConfigurationNeeded"
CONFIG_AND_SW = "ConfigurationAndSWHardeningNeeded"
OUT_OF_DATE = "OutOfDate"
OUT_OF_DATE_CONFIG = "OutOfDateConfigurationNeeded"
REVOKED = "Revoked"
NO_MATCH = "NoMatchingTcbLevel"  # Intel's QVL: "TCB level not supported"
TCB_STATUSES = (
    UP_TO_DATE,
    SW_HARDENING,
    CONFIG_NEEDED,
    CONFIG_AND_SW,
    OUT_OF_DATE,
    OUT_OF_DATE_CONFIG,
    REVOKED,
    NO_MATCH,
)


def _u16(b: bytes, o: int) -> int:
    return struct.unpack_from("<H", b, o)[0]


def _u32(b: bytes, o: int) -> int:
    return struct.unpack_from("<I", b, o)[0]


@dataclass(frozen=True)
class EnclaveReport:
    """The 384-byte SGX REPORT body: an SGX quote's body and every QE report.

    Offsets: 0 CPUSVN 16 · 16 MISCSELECT u32 · 20 reserved 12 · 32 ISVEXTPRODID 16 ·
    48 ATTRIBUTES 16 · 64 MRENCLAVE 32 · 96 reserved 32 · 128 MRSIGNER 32 ·
    160 reserved 32 · 192 CONFIGID 64 · 256 ISVPRODID u16 · 258 ISVSVN u16 ·
    260 CONFIGSVN u16 · 262 reserved 42 · 304 ISVFAMILYID 16 · 320 REPORTDATA 64."""

    cpu_svn: bytes
    misc_select: int
    isv_ext_prod_id: bytes
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    config_id: bytes
    isv_prod_id: int
    isv_svn: int
    config_svn: int
    isv_family_id: bytes
    report_data: bytes

    ATTR_DEBUG = 0x02  # ATTRIBUTES.FLAGS bit 1

    @property
    def debug(self) -> bool:
        return bool(self.attributes[0] & self.ATTR_DEBUG)

    @classmethod
    def parse(cls, b: bytes) -> EnclaveReport:
        if len(b) != ENCLAVE_REPORT_SIZE:
            raise EvidenceRefused("malformed", "An SGX enclave report is 384 bytes.")
        return cls(
            cpu_svn=b[0:16],
            misc_select=_u32(b, 16),
            isv_ext_prod_id=b[32:48],
            attributes=b[48:64],
            mr_enclave=b[64:96],
            mr_signer=b[128:160],
            config_id=b[192:256],
            isv_prod_id=_u16(b, 256),
            isv_svn=_u16(b, 258),
            config_svn=_u16(b, 260),
            isv_family_id=b[304:320],
            report_data=b[320:384],
        )


@dataclass(frozen=True)
class Quote:
    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes
    body_type: int
    body: bytes
    signed: bytes  # header ‖ [v5 body type ‖ size] ‖ body: what the attestation key signed
    signature: bytes  # 64 B r‖s
    attest_key: bytes  # 64 B x‖y
    qe_report_raw: bytes
    qe_report: EnclaveReport
    qe_report_sig: bytes
    qe_auth_data: bytes
    cert_type: int
    cert_data: bytes
    trailing: int  # bytes after the signature data (ignored when allowed)


class _Reader:
    def __init__(self, data: bytes, off: int, end: int, what: str) -> None:
        self.data, self.off, self.end, self.what = data, off, end, what

    def take(self, n: int, field_name: str) -> bytes:
        if self.off + n > self.end:
            raise EvidenceRefused("truncated", f"The {self.what} ends inside its {field_name}.")
        v = self.data[self.off : self.off + n]
        self.off += n
        return v

    def u16(self, name: str) -> int:
        return _u16(self.take(2, name), 0)

    def u32(self, name: str) -> int:
        return _u32(self.take(4, name), 0)


def parse_quote(data: bytes, *, allow_trailing: bool = False) -> Quote:
    """Parse a DCAP quote (v3 SGX, v4/v5 TDX or SGX). Lengths are read from the quote;
    bytes after its signature data are refused unless `allow_trailing` (sample files
    carry padding; the key server wants the exact quote)."""
    q = bytes(data)
    if len(q) > MAX_QUOTE:
        raise EvidenceRefused("malformed", "The quote is larger than 64 KiB.")
    rd = _Reader(q, 0, len(q), "quote")
    hdr = rd.take(HEADER_SIZE, "header")
    version, akt, tee = _u16(hdr, 0), _u16(hdr, 2), _u32(hdr, 4)
    if version not in (3, 4, 5):
        raise EvidenceRefused("unsupported", f"Quote version {version} is not 3, 4 or 5.")
    if akt != ATT_KEY_ECDSA_P256:
        raise EvidenceRefused(
            "unsupported", f"Attestation key type {akt} is not ECDSA-256 with P-256."
        )
    if tee not in (TEE_SGX, TEE_TDX) or (version == 3 and tee != TEE_SGX):
        raise EvidenceRefused(
            "unsupported", f"TEE type {tee:#x} is not valid in a v{version} quote."
        )
    if hdr[12:28] != INTEL_QE_VENDOR_ID:
        raise EvidenceRefused("unsupported", "The quote was not made by Intel's quoting enclave.")
    if version == 5:
        body_type, body_size = rd.u16("body type"), rd.u32("body size")
        if BODY_SIZES.get(body_type) != body_size:
            raise EvidenceRefused(
                "malformed", f"Body type {body_type} with size {body_size} is not a known report."
            )
        if (body_type == BODY_SGX) != (tee == TEE_SGX):
            raise EvidenceRefused("malformed", "The body type does not match the TEE type.")
    else:
        body_type = BODY_SGX if tee == TEE_SGX else BODY_TD10
    body = rd.take(BODY_SIZES[body_type], "report body")
    signed = q[: rd.off]
    sig_len = rd.u32("signature data length")
    sd = _Reader(q, rd.off, rd.off + sig_len, "quote's signature data")
    if sd.end > len(q):
        raise EvidenceRefused("truncated", "The quote is shorter than its signature data length.")
    signature, attest_key = sd.take(64, "signature"), sd.take(64, "attestation key")
    if version == 3:
        inner = sd
    else:
        outer_type, outer_len = sd.u16("certification data type"), sd.u32("certification data size")
        if outer_type != CERT_QE_REPORT:
            raise EvidenceRefused(
                "unsupported", f"Certification data type {outer_type} is not the QE report (6)."
            )
        inner = _Reader(q, sd.off, sd.off + outer_len, "QE report certification data")
        if inner.end > sd.end:
            raise EvidenceRefused("truncated", "The QE report certification data is truncated.")
    qe_raw = inner.take(ENCLAVE_REPORT_SIZE, "QE report")
    qe_sig = inner.take(64, "QE report signature")
    auth = inner.take(inner.u16("QE auth data size"), "QE auth data")
    cert_type = inner.u16("PCK certification data type")
    cert = inner.take(inner.u32("PCK certification data size"), "PCK certification data")
    if inner.off != inner.end:
        raise EvidenceRefused("malformed", "The QE report certification data has trailing bytes.")
    if version != 3:
        sd.off = inner.end
    if sd.off != sd.end:
        raise EvidenceRefused("malformed", "The signature data has trailing bytes.")
    trailing = len(q) - sd.end
    if trailing and not allow_trailing:
        raise EvidenceRefused(
            "malformed", f"The quote has {trailing} bytes after its signature data."
        )
    return Quote(
        version=version,
        att_key_type=akt,
        tee_type=tee,
        qe_svn=_u16(hdr, 8),
        pce_svn=_u16(hdr, 10),
        qe_vendor_id=hdr[12:28],
        user_data=hdr[28:48],
        body_type=body_type,
        body=body,
        signed=signed,
        signature=signature,
        attest_key=attest_key,
        qe_report_raw=qe_raw,
        qe_report=EnclaveReport.parse(qe_raw),
        qe_report_sig=qe_sig,
        qe_auth_data=auth,
        cert_type=cert_type,
        cert_data=cert,
        trailing=trailing,
    )


# ------------------------------------------------------------------ PCK certificate


@dataclass(frozen=True)
class PckInfo:
    """The SGX extensions of a PCK certificate."""

    ppid: bytes
    tcb_components: tuple[int, ...]  # 16 SGX TCB component SVNs
    pce_svn: int
    cpu_svn: bytes
    pce_id: bytes
    fmspc: bytes
    sgx_type: int


def pck_info(cert: x509.Certificate) -> PckInfo:
    raw = extension_value(cert, OID_SGX_EXTENSIONS)
    if raw is None:
        raise EvidenceRefused(
            "bad_certificate", f"The {cn(cert)} certificate has no SGX extensions."
        )
    try:
        items: dict[str, der.Tlv] = {}
        for entry in der.read_all(der.read_one(raw, der.SEQUENCE).value):
            k, v = der.read_all(entry.value)
            items[der.oid(k)] = v
        comps: dict[int, int] = {}
        pce_svn, cpu_svn = None, None
        for entry in der.read_all(items[OID_TCB].value):
            k, v = der.read_all(entry.value)
            n = int(der.oid(k).rsplit(".", 1)[1])
            if 1 <= n <= 16:
                comps[n] = der.integer(v)
            elif n == 17:
                pce_svn = der.integer(v)
            elif n == 18:
                cpu_svn = der.octets(v)
        if sorted(comps) != list(range(1, 17)) or pce_svn is None or cpu_svn is None:
            raise der.DerError("incomplete TCB")
        return PckInfo(
            ppid=der.octets(items[OID_PPID]),
            tcb_components=tuple(comps[i] for i in range(1, 17)),
            pce_svn=pce_svn,
            cpu_svn=cpu_svn,
            pce_id=der.octets(items[OID_PCEID]),
            fmspc=der.octets(items[OID_FMSPC]),
            sgx_type=der.integer(items[OID_SGX_TYPE]),
        )
    except (der.DerError, KeyError, ValueError):
        raise EvidenceRefused(
            "bad_certificate", "The PCK certificate's SGX extensions are malformed."
        ) from None


# ------------------------------------------------------------------ collateral


@dataclass(frozen=True)
class SignedJson:
    """A TCB Info or QE Identity: its exact signed bytes, parsed body and signature."""

    body: dict[str, Any]
    raw: bytes
    signature: bytes
    chain: tuple[x509.Certificate, ...]  # issuer chain shipped with it, if any
    source: str

    @property
    def issue_date(self) -> datetime:
        return _time(self.body.get("issueDate"), self.source)

    @property
    def next_update(self) -> datetime:
        return _time(self.body.get("nextUpdate"), self.source)


def _time(v: object, source: str) -> datetime:
    try:
        if isinstance(v, str):
            return datetime.fromisoformat(v)
    except ValueError:
        pass
    raise EvidenceRefused("bad_collateral", f"{source} has no valid date.")


@dataclass
class Collateral:
    """DCAP collateral an owner supplies: TCB Infos, QE Identities, CRLs and the
    certificates that sign them. `load_collateral` reads it from files; the right TCB
    Info and QE Identity are picked per quote (by id and FMSPC)."""

    tcb_infos: list[SignedJson] = field(default_factory=list)
    qe_identities: list[SignedJson] = field(default_factory=list)
    crls: list[x509.CertificateRevocationList] = field(default_factory=list)
    certs: list[x509.Certificate] = field(default_factory=list)

    def add(self, other: Collateral) -> None:
        self.tcb_infos += other.tcb_infos
        self.qe_identities += other.qe_identities
        self.crls += other.crls
        self.certs += other.certs

    def pick_tcb_info(self, tee: str, fmspc: bytes) -> SignedJson | None:
        c = [
            t
            for t in self.tcb_infos
            if t.body.get("id", "SGX") == tee
            and str(t.body.get("fmspc", "")).lower() == fmspc.hex()
        ]
        return max(c, key=lambda t: str(t.body.get("issueDate", ""))) if c else None

    def pick_qe_identity(self, qe_id: str) -> SignedJson | None:
        c = [q for q in self.qe_identities if q.body.get("id") == qe_id]
        return max(c, key=lambda q: str(q.body.get("issueDate", ""))) if c else None


CollateralSource = Collateral | Callable[[str], Collateral | None]
"""What a verifier is given: a fixed `Collateral`, or a function FMSPC (hex) → collateral
(for example a cache of Intel PCS / PCCS answers)."""


def _raw_member(text: str, key: str, source: str) -> tuple[bytes, Any]:
    """The exact bytes of a top-level member's value: Intel signs them as they appear."""
    dec = json.JSONDecoder()
    at = text.find(f'"{key}"')
    i = text.index(":", at) + 1
    while text[i].isspace():
        i += 1
    value, end = dec.raw_decode(text, i)
    if json.loads(text)[key] != value:  # the first occurrence was not the top-level one
        raise EvidenceRefused("bad_collateral", f"{source} has an ambiguous {key} member.")
    return text[i:end].encode(), value


def _sig(hexsig: object, source: str) -> bytes:
    try:
        sig = bytes.fromhex(hexsig) if isinstance(hexsig, str) else b""
    except ValueError:
        sig = b""
    if len(sig) != 64:
        raise EvidenceRefused("bad_collateral", f"{source} has no 64-byte signature.")
    return sig


def parse_collateral(data: bytes, source: str) -> Collateral:
    """One collateral file: Intel PCS JSON (`{"tcbInfo": …, "signature": …}` or
    `{"enclaveIdentity": …}`), a combined QuoteCollateralV3 JSON (the fields of Intel's
    `sgx_ql_qve_collateral_t`, as dcap-qvl writes them), a CRL (DER or PEM) or PEM
    certificates. Anything else gives an empty `Collateral` (directories also hold quotes)."""
    out = Collateral()
    head = data.lstrip()[:1]
    if head == b"{":
        try:
            text = data.decode()
            doc = json.loads(text)
        except (UnicodeDecodeError, ValueError):
            raise EvidenceRefused("bad_collateral", f"{source} is not valid JSON.") from None
        if not isinstance(doc, dict):
            return out
        for key, bucket, what in (
            ("tcbInfo", out.tcb_infos, "TCB Info"),
            ("enclaveIdentity", out.qe_identities, "QE Identity"),
        ):
            if key in doc:
                raw, body = _raw_member(text, key, source)
                if not isinstance(body, dict):
                    raise EvidenceRefused("bad_collateral", f"{source}: {key} is not an object.")
                bucket.append(
                    SignedJson(
                        body, raw, _sig(doc.get("signature"), source), (), f"{what} in {source}"
                    )
                )
        for key, bucket, what in (
            ("tcb_info", out.tcb_infos, "TCB Info"),
            ("qe_identity", out.qe_identities, "QE Identity"),
        ):
            if isinstance(doc.get(key), str):
                raw = doc[key].encode()
                try:
                    body = json.loads(raw)
                except ValueError:
                    raise EvidenceRefused(
                        "bad_collateral", f"{source}: {key} is not JSON."
                    ) from None
                chain = (
                    tuple(
                        load_certificates(
                            doc.get(f"{key}_issuer_chain", "").encode(), f"{key} issuer chain"
                        )
                    )
                    if doc.get(f"{key}_issuer_chain")
                    else ()
                )
                bucket.append(
                    SignedJson(
                        body,
                        raw,
                        _sig(doc.get(f"{key}_signature"), source),
                        chain,
                        f"{what} in {source}",
                    )
                )
        for key in ("pck_crl", "root_ca_crl"):
            if isinstance(doc.get(key), str):
                try:
                    blob = bytes.fromhex(doc[key])
                except ValueError:
                    blob = doc[key].encode()  # some tools store the PEM text
                out.crls.append(load_crl(blob, f"{key} in {source}"))
        if isinstance(doc.get("pck_crl_issuer_chain"), str):
            out.certs += load_certificates(doc["pck_crl_issuer_chain"].encode(), source)
        return out
    if b"-----BEGIN X509 CRL-----" in data:
        out.crls.append(load_crl(data, source))
    elif b"-----BEGIN CERTIFICATE-----" in data:
        out.certs += load_certificates(data, source)
    elif head == b"\x30":  # DER: a CRL, or a certificate
        try:
            out.crls.append(x509.load_der_x509_crl(data))
        except ValueError:
            try:
                out.certs += load_certificates(data, source)
            except EvidenceRefused:
                pass
    return out


def load_collateral(paths: Iterable[str | Path]) -> Collateral:
    """Collateral from files and directories (not recursive); unrecognised files are skipped."""
    out = Collateral()
    for p in map(Path, paths):
        files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
        for f in files:
            out.add(parse_collateral(f.read_bytes(), f.name))
    return out


# ------------------------------------------------------------------ verification


@dataclass(frozen=True)
class TcbResult:
    """The TCB evaluation against TCB Info and QE Identity."""

    status: str
    advisory_ids: tuple[str, ...]
    tcb_date: str | None
    platform_status: str
    qe_status: str
    module_status: str | None  # TDX module identity (TDX 1.5+), if evaluated


@dataclass(frozen=True)
class DcapResult:
    quote: Quote
    pck: PckInfo
    pck_chain: tuple[x509.Certificate, ...]
    tcb: TcbResult | None  # None: no TCB Info / QE Identity for this quote
    missing: str | None  # why `tcb` is None
    stale: tuple[str, ...]  # collateral past its next update at the verification time
    crls_checked: tuple[str, ...]

    @property
    def collateral_state(self) -> str:
        return "missing" if self.tcb is None else "stale" if self.stale else "fresh"

    def to_json(self) -> dict[str, Any]:
        t = self.tcb
        return {
            "fmspc": self.pck.fmspc.hex(),
            "pce_svn": self.pck.pce_svn,
            "pck_issuer": cn(self.pck_chain[0].issuer),
            "tcb_status": None if t is None else t.status,
            "advisory_ids": [] if t is None else list(t.advisory_ids),
            "tcb_date": None if t is None else t.tcb_date,
            "qe_tcb_status": None if t is None else t.qe_status,
            "tdx_module_tcb_status": None if t is None else t.module_status,
            "collateral": self.collateral_state,
            "collateral_missing": self.missing,
            "collateral_stale": list(self.stale),
            "crls_checked": list(self.crls_checked),
            "trailing_bytes": self.quote.trailing,
        }


class QuoteEvidence:
    """What a verified SGX or TDX quote offers a policy: its body and the DCAP result."""

    body: Any  # EnclaveReport (SGX) or tdx.TdReport
    dcap: DcapResult

    @property
    def report_data(self) -> bytes:
        return bytes(self.body.report_data)

    @property
    def debug(self) -> bool:
        return bool(self.body.debug)

    @property
    def tcb_status(self) -> str | None:
        """The DCAP TCB status; None when no collateral was given."""
        return self.dcap.tcb.status if self.dcap.tcb else None


def pck_chain_of(q: Quote, certs: Sequence[x509.Certificate] | None) -> list[x509.Certificate]:
    if certs:
        return order_chain(certs)
    if q.cert_type != CERT_PCK_CHAIN:
        raise EvidenceRefused(
            "collateral_missing",
            f"The quote carries no PCK certificate chain (certification data type {q.cert_type}); "
            "supply the PCK certificates.",
        )
    return order_chain(load_certificates(q.cert_data.rstrip(b"\0"), "PCK certificate chain"))


def _verify_signed_json(
    sj: SignedJson, coll: Collateral, root: x509.Certificate, at: datetime
) -> None:
    signer = next(
        (c for c in (*sj.chain, *coll.certs) if cn(c) == TCB_SIGNING_CN),
        None,
    ) or packaged_intermediate("intel-sgx-tcb-signing.pem")
    if signer is None:
        raise EvidenceRefused(
            "collateral_missing", f"No {TCB_SIGNING_CN} certificate for {sj.source}."
        )
    verify_chain([signer, *[c for c in sj.chain if c is not signer]], root, at)
    key = ec_key(signer, ec.SECP256R1)
    r, s = int.from_bytes(sj.signature[:32], "big"), int.from_bytes(sj.signature[32:], "big")
    if not ecdsa_verify(key, r, s, sj.raw, hashes.SHA256()):
        raise EvidenceRefused(
            "bad_collateral",
            f"The signature of the {sj.source} does not verify under {TCB_SIGNING_CN}.",
        )
    if sj.issue_date > at:
        raise EvidenceRefused(
            "bad_collateral",
            f"The {sj.source} was issued at {when(sj.issue_date)}, after the verification time {when(at)}.",
        )


def _hexfield(body: dict[str, Any], key: str, source: str) -> bytes:
    try:
        return bytes.fromhex(body[key])
    except (KeyError, TypeError, ValueError):
        raise EvidenceRefused("bad_collateral", f"The {source} has no valid {key}.") from None


def _masked_equal(value: bytes, want: bytes, mask: bytes) -> bool:
    return len(value) == len(want) == len(mask) and all(
        (v & m) == (w & m) for v, w, m in zip(value, want, mask, strict=True)
    )


def _qe_status(qe: SignedJson, report: EnclaveReport) -> str:
    b, src = qe.body, qe.source
    if (
        _hexfield(b, "mrsigner", src) != report.mr_signer
        or b.get("isvprodid") != report.isv_prod_id
    ):
        raise EvidenceRefused(
            "qe_identity_mismatch", "The quoting enclave is not the one Intel's QE Identity names."
        )
    misc = report.misc_select.to_bytes(4, "big")
    if not _masked_equal(
        misc, _hexfield(b, "miscselect", src), _hexfield(b, "miscselectMask", src)
    ):
        raise EvidenceRefused(
            "qe_identity_mismatch", "The QE's MISCSELECT does not match its QE Identity."
        )
    if not _masked_equal(
        report.attributes, _hexfield(b, "attributes", src), _hexfield(b, "attributesMask", src)
    ):
        raise EvidenceRefused(
            "qe_identity_mismatch", "The QE's ATTRIBUTES do not match its QE Identity."
        )
    for level in b.get("tcbLevels", []):
        if report.isv_svn >= level.get("tcb", {}).get("isvsvn", 1 << 16):
            return str(level.get("tcbStatus"))
    return NO_MATCH


def _converge(platform: str, other: str | None) -> str:
    """Fold the QE's (or TDX module's) status into the platform's, as Intel's QVL does."""
    if other == OUT_OF_DATE:
        if platform in (UP_TO_DATE, SW_HARDENING):
            return OUT_OF_DATE
        if platform in (CONFIG_NEEDED, CONFIG_AND_SW):
            return OUT_OF_DATE_CONFIG
    if other == REVOKED:
        return REVOKED
    if other == NO_MATCH:
        return NO_MATCH
    return platform


@dataclass(frozen=True)
class TdxTcbInput:
    tee_tcb_svn: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes


def evaluate_tcb(
    tcb_info: SignedJson, qe: SignedJson, q: Quote, pck: PckInfo, tdx: TdxTcbInput | None
) -> TcbResult:
    b, src = tcb_info.body, tcb_info.source
    if b.get("version") != 3:
        raise EvidenceRefused(
            "bad_collateral", f"The {src} is version {b.get('version')}; version 3 is needed."
        )
    if _hexfield(b, "fmspc", src) != pck.fmspc or _hexfield(b, "pceId", src) != pck.pce_id:
        raise EvidenceRefused(
            "bad_collateral",
            f"The {src} is for FMSPC {b.get('fmspc')}, the PCK's is {pck.fmspc.hex()}.",
        )
    qe_status = _qe_status(qe, q.qe_report)
    chosen: dict[str, Any] | None = None
    for level in b.get("tcbLevels", []):
        t = level.get("tcb", {})
        sgx = [c.get("svn", 0) for c in t.get("sgxtcbcomponents", [])]
        if len(sgx) != 16:
            raise EvidenceRefused(
                "bad_collateral", f"The {src} has a level without 16 SGX components."
            )
        if any(have < need for have, need in zip(pck.tcb_components, sgx, strict=True)):
            continue
        if pck.pce_svn < t.get("pcesvn", 1 << 16):
            continue
        if tdx is not None:
            comps = [c.get("svn", 0) for c in t.get("tdxtcbcomponents", [])]
            if len(comps) != 16:
                raise EvidenceRefused(
                    "bad_collateral", f"The {src} has a level without TDX components."
                )
            # From TDX module 1.x on, bytes 0 and 1 are the module's SVN and version,
            # judged by the module identity below instead.
            start = 2 if tdx.tee_tcb_svn[1] > 0 else 0
            if any(tdx.tee_tcb_svn[i] < comps[i] for i in range(start, 16)):
                continue
        chosen = level
        break
    if chosen is None:
        return TcbResult(NO_MATCH, (), None, NO_MATCH, qe_status, None)
    platform = str(chosen.get("tcbStatus"))
    if platform not in TCB_STATUSES:
        raise EvidenceRefused("bad_collateral", f"The {src} has an unknown status {platform}.")
    advisories = list(chosen.get("advisoryIDs", []))
    module_status = None
    status = platform
    if tdx is not None:
        module_status = _tdx_module_status(b, src, tdx, advisories)
        status = _converge(status, module_status)
    status = _converge(status, qe_status)
    return TcbResult(
        status,
        tuple(dict.fromkeys(advisories)),
        chosen.get("tcbDate"),
        platform,
        qe_status,
        module_status,
    )


def _tdx_module_status(
    b: dict[str, Any], src: str, tdx: TdxTcbInput, advisories: list[str]
) -> str | None:
    isv_svn, version = tdx.tee_tcb_svn[0], tdx.tee_tcb_svn[1]
    if version == 0:  # TDX 1.0 module: checked against the TCB Info's tdxModule
        mod = b.get("tdxModule")
        if mod is not None:
            _check_module(mod, src, tdx, "tdxModule")
        return None
    want = f"TDX_{version:02X}"
    ident = next(
        (m for m in b.get("tdxModuleIdentities", []) if str(m.get("id", "")).upper() == want), None
    )
    if ident is None:
        return NO_MATCH
    _check_module(ident, src, tdx, want)
    for level in ident.get("tcbLevels", []):
        if isv_svn >= level.get("tcb", {}).get("isvsvn", 1 << 16):
            advisories += level.get("advisoryIDs", [])
            return str(level.get("tcbStatus"))
    return NO_MATCH


def _check_module(mod: dict[str, Any], src: str, tdx: TdxTcbInput, name: str) -> None:
    if _hexfield(mod, "mrsigner", src) != tdx.mr_signer_seam or not _masked_equal(
        tdx.seam_attributes,
        _hexfield(mod, "attributes", src),
        _hexfield(mod, "attributesMask", src),
    ):
        raise EvidenceRefused(
            "tcb_mismatch", f"The TDX module's signer or attributes differ from the {src}'s {name}."
        )


def verify_quote(
    q: Quote,
    *,
    at: datetime,
    certs: Sequence[x509.Certificate] | None = None,
    collateral: CollateralSource | None = None,
    anchors: Anchors | None = None,
    tdx: TdxTcbInput | None = None,
) -> DcapResult:
    """Everything about a parsed quote except its body's meaning. Raises `EvidenceRefused`."""
    root = (anchors or Anchors.pinned()).intel_root
    chain = verify_chain(pck_chain_of(q, certs), root, at)
    leaf = chain[0]
    pck = pck_info(leaf)
    coll: Collateral | None = collateral(pck.fmspc.hex()) if callable(collateral) else collateral
    stale: list[str] = []
    crls: list[str] = []
    for crl in coll.crls if coll else []:  # revocation, when CRLs were supplied
        for child, parent in itertools.pairwise(chain):
            if crl.issuer == parent.subject:
                note = check_crl(crl, parent, child, at)
                crls.append(cn(parent))
                if note:
                    stale.append(note)

    pck_key = ec_key(leaf, ec.SECP256R1)
    half = lambda s: (int.from_bytes(s[:32], "big"), int.from_bytes(s[32:], "big"))
    if not ecdsa_verify(pck_key, *half(q.qe_report_sig), q.qe_report_raw, hashes.SHA256()):
        raise EvidenceRefused(
            "bad_qe_report", "The QE report is not signed by the PCK certificate."
        )
    want = hashlib.sha256(q.attest_key + q.qe_auth_data).digest() + bytes(32)
    if q.qe_report.report_data != want:
        raise EvidenceRefused(
            "qe_binding", "The QE report does not bind the attestation key and QE auth data."
        )
    ak = p256_key(q.attest_key, "attestation key")
    if not ecdsa_verify(ak, *half(q.signature), q.signed, hashes.SHA256()):
        raise EvidenceRefused(
            "bad_signature", "The quote's signature does not verify under its attestation key."
        )

    tee = "TDX" if q.tee_type == TEE_TDX else "SGX"
    coll = coll or Collateral()
    tcb_info = coll.pick_tcb_info(tee, pck.fmspc)
    qe_ident = coll.pick_qe_identity("TD_QE" if tee == "TDX" else "QE")
    if tcb_info is None or qe_ident is None:
        missing = (
            f"no {tee} TCB Info for FMSPC {pck.fmspc.hex()}"
            if tcb_info is None
            else "no QE Identity"
        )
        return DcapResult(q, pck, tuple(chain), None, missing, tuple(stale), tuple(crls))
    for sj in (tcb_info, qe_ident):
        _verify_signed_json(sj, coll, root, at)
        if at > sj.next_update:
            stale.append(f"the {sj.source} (next update {when(sj.next_update)})")
    tcb = evaluate_tcb(tcb_info, qe_ident, q, pck, tdx)
    return DcapResult(q, pck, tuple(chain), tcb, None, tuple(stale), tuple(crls))
