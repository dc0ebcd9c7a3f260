"""Parser for Intel SGX ECDSA (DCAP) quotes, version 3.

Layout (Intel "SGX ECDSA Quote Library API", appendix A; all integers little-endian):

```
header        48 B   u16 version (3) · u16 att_key_type (2 = ECDSA-256-P256) · u32 tee_type
                     (0 = SGX) · u16 qe_svn · u16 pce_svn · 16 B qe_vendor_id · 20 B user_data
report body  384 B   16 B cpu_svn · u32 misc_select · 28 B reserved · 16 B attributes ·
                     32 B MRENCLAVE · 32 B reserved · 32 B MRSIGNER · 96 B reserved ·
                     u16 isv_prod_id · u16 isv_svn · 60 B reserved · 64 B report_data
u32 signature data length
signature data       64 B ECDSA signature (r‖s) over header‖report body, by the attestation key
                     64 B attestation public key (P-256 x‖y)
                     384 B QE report body · 64 B QE report signature (by the PCK key)
                     u16 size + QE authentication data
                     u16 certification data type · u32 size + certification data
                     (type 5: PEM PCK certificate chain)
```

`parse_quote_v3` checks the structure strictly (sizes, versions, no trailing bytes).
`verify_quote_signatures` checks what can be checked without Intel's collateral: the
attestation key's signature over header‖body, and that the QE report binds the
attestation key (QE report_data[:32] = SHA-256(attestation key ‖ QE auth data)) and is
signed by a PCK public key given by the caller. Verifying the PCK certificate chain up
to Intel's root CA and the TCB status (the "collateral") is the job of a DCAP
verification library and is **not implemented here** (see docs/key-release.md).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

HEADER_LEN = 48
REPORT_BODY_LEN = 384
QUOTE_VERSION = 3
ATT_KEY_ECDSA_P256 = 2
TEE_SGX = 0
ATTR_DEBUG = 0x02  # attributes.flags bit 1
MAX_QUOTE = 64 * 1024


class QuoteError(ValueError):
    """A quote is malformed or fails a check."""


@dataclass(frozen=True)
class ReportBody:
    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes

    @property
    def debug(self) -> bool:
        return bool(self.attributes[0] & ATTR_DEBUG)

    @classmethod
    def parse(cls, b: bytes) -> ReportBody:
        if len(b) != REPORT_BODY_LEN:
            raise QuoteError("an SGX report body is 384 bytes")
        return cls(
            cpu_svn=b[0:16],
            misc_select=struct.unpack_from("<I", b, 16)[0],
            attributes=b[48:64],
            mr_enclave=b[64:96],
            mr_signer=b[128:160],
            isv_prod_id=struct.unpack_from("<H", b, 256)[0],
            isv_svn=struct.unpack_from("<H", b, 258)[0],
            report_data=b[320:384],
        )


@dataclass(frozen=True)
class QuoteV3:
    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes
    body: ReportBody
    signed: bytes  # header ‖ report body, what the attestation key signed
    signature: bytes  # 64 B r‖s
    attest_key: bytes  # 64 B x‖y
    qe_report_raw: bytes
    qe_report: ReportBody
    qe_report_sig: bytes
    qe_auth_data: bytes
    cert_type: int
    cert_data: bytes


def parse_quote_v3(quote: bytes) -> QuoteV3:
    """Parse a v3 ECDSA quote; `QuoteError` on any structural problem."""
    if not isinstance(quote, (bytes, bytearray)):
        raise QuoteError("a quote is bytes")
    q = bytes(quote)
    if len(q) > MAX_QUOTE:
        raise QuoteError("the quote is larger than 64 KiB")
    if len(q) < HEADER_LEN + REPORT_BODY_LEN + 4:
        raise QuoteError("the quote is too short for a header and a report body")
    version, akt, tee, qe_svn, pce_svn = struct.unpack_from("<HHIHH", q, 0)
    if version != QUOTE_VERSION:
        raise QuoteError(f"quote version {version} is not 3")
    if akt != ATT_KEY_ECDSA_P256:
        raise QuoteError(f"attestation key type {akt} is not ECDSA-256 P-256")
    if tee != TEE_SGX:
        raise QuoteError(f"TEE type {tee:#x} is not SGX")
    body_raw = q[HEADER_LEN : HEADER_LEN + REPORT_BODY_LEN]
    off = HEADER_LEN + REPORT_BODY_LEN
    (sig_len,) = struct.unpack_from("<I", q, off)
    off += 4
    if off + sig_len != len(q):
        raise QuoteError("the signature data length does not match the quote size")
    p = off

    def take(n: int) -> bytes:
        nonlocal p
        if p + n > len(q):
            raise QuoteError("the quote's signature data is truncated")
        v = q[p : p + n]
        p += n
        return v

    signature, attest_key = take(64), take(64)
    qe_raw = take(REPORT_BODY_LEN)
    qe_sig = take(64)
    (auth_len,) = struct.unpack("<H", take(2))
    auth = take(auth_len)
    cert_type, cert_len = struct.unpack("<HI", take(6))
    cert = take(cert_len)
    if p != len(q):
        raise QuoteError("the quote has trailing bytes")
    return QuoteV3(
        version=version,
        att_key_type=akt,
        tee_type=tee,
        qe_svn=qe_svn,
        pce_svn=pce_svn,
        qe_vendor_id=q[12:28],
        user_data=q[28:48],
        body=ReportBody.parse(body_raw),
        signed=q[: HEADER_LEN + REPORT_BODY_LEN],
        signature=signature,
        attest_key=attest_key,
        qe_report_raw=qe_raw,
        qe_report=ReportBody.parse(qe_raw),
        qe_report_sig=qe_sig,
        qe_auth_data=auth,
        cert_type=cert_type,
        cert_data=cert,
    )


def _p256_pub(xy: bytes):  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + xy)
    except ValueError:
        raise QuoteError("a P-256 public key in the quote is not on the curve") from None


def _verify_raw_sig(pub, sig: bytes, data: bytes) -> bool:  # type: ignore[no-untyped-def]
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    try:
        pub.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
        return True
    except InvalidSignature:
        return False


def verify_quote_signatures(q: QuoteV3, pck_public_key_xy: bytes) -> None:
    """Check the quote's signature chain below the PCK key (which the caller must have
    verified up to Intel's root — not done here). `QuoteError` on failure."""
    if not _verify_raw_sig(_p256_pub(q.attest_key), q.signature, q.signed):
        raise QuoteError("the attestation key's signature over the quote does not verify")
    want = hashlib.sha256(q.attest_key + q.qe_auth_data).digest()
    if q.qe_report.report_data[:32] != want:
        raise QuoteError("the QE report does not bind the attestation key")
    if not _verify_raw_sig(_p256_pub(pck_public_key_xy), q.qe_report_sig, q.qe_report_raw):
        raise QuoteError("the QE report signature does not verify under the PCK key")
