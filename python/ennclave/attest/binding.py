"""What every kind of evidence binds: the key server's nonce, the worker's key and the
protections it reports.

The worker computes the **evidence hash**

    H = SHA-256("ennclave evidence v2" ‖ 0x00 ‖ nonce ‖ worker X25519 public key ‖
                SHA-256 of the worker binary ‖ SHA-256(protections))

where `protections` is the canonical JSON the worker sends with its EVIDENCE (protocol
3; docs/key-release.md "Protections"). Workers before protocol 3 sent none and hashed

    H = SHA-256("ennclave evidence v1" ‖ 0x00 ‖ nonce ‖ public key ‖ binary SHA-256)

which a key server still accepts, as evidence with no protections.

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
EVIDENCE_DOMAIN_V2 = b"ennclave evidence v2\x00"
REPORT_DATA_SIZE = 64


def evidence_hash(
    nonce: bytes, pubkey: bytes, binary_sha256: bytes, protections: bytes | None = None
) -> bytes:
    """H for a worker that reported `protections` (v2), or for one that reported none
    (None: v1, workers before protocol 3)."""
    if protections is None:
        return hashlib.sha256(EVIDENCE_DOMAIN + nonce + pubkey + binary_sha256).digest()
    return hashlib.sha256(
        EVIDENCE_DOMAIN_V2 + nonce + pubkey + binary_sha256 + hashlib.sha256(protections).digest()
    ).digest()


def expected_report_data(h: bytes) -> bytes:
    """The REPORT_DATA a hardware report must carry for evidence hash `h`."""
    return h + bytes(REPORT_DATA_SIZE - len(h))


def check_binding(report_data: bytes, h: bytes, what: str) -> None:
    """Refuse unless `report_data` is exactly H ‖ 0³² (constant-time compare)."""
    if not hmac.compare_digest(report_data, expected_report_data(h)):
        raise EvidenceRefused(
            "binding",
            f"The {what}'s REPORT_DATA does not bind this nonce, public key, worker binary "
            "and protections.",
        )
