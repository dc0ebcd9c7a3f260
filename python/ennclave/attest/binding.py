"""What every kind of evidence binds: the key server's nonce and the worker's key.

The worker computes the **evidence hash**

    H = SHA-256("ennclave evidence v1" ‖ 0x00 ‖ nonce ‖ worker X25519 public key ‖
                SHA-256 of the worker binary)

and puts it where its kind of evidence carries caller data: the software report *is*
H; a hardware report's 64-byte REPORT_DATA is H ‖ 32 zero bytes (SGX
`user_report_data`, TDX `REPORTDATA`, SEV-SNP `REPORT_DATA`). The zero half is checked
too, so no other data can ride along. docs/attestation.md shows the bytes.
"""

from __future__ import annotations

import hashlib
import hmac

from .errors import EvidenceRefused

EVIDENCE_DOMAIN = b"ennclave evidence v1\x00"
REPORT_DATA_SIZE = 64


def evidence_hash(nonce: bytes, pubkey: bytes, binary_sha256: bytes) -> bytes:
    return hashlib.sha256(EVIDENCE_DOMAIN + nonce + pubkey + binary_sha256).digest()


def expected_report_data(h: bytes) -> bytes:
    """The REPORT_DATA a hardware report must carry for evidence hash `h`."""
    return h + bytes(REPORT_DATA_SIZE - len(h))


def check_binding(report_data: bytes, h: bytes, what: str) -> None:
    """Refuse unless `report_data` is exactly H ‖ 0³² (constant-time compare)."""
    if not hmac.compare_digest(report_data, expected_report_data(h)):
        raise EvidenceRefused(
            "binding",
            f"The {what}'s REPORT_DATA does not bind this nonce, public key and worker binary.",
        )
