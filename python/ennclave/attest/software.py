"""Software evidence: the worker's own statement of the evidence hash, nothing more.

It proves freshness (the nonce) and binds the release to one public key; anyone can
compute it, so it proves nothing about the worker (docs/key-release.md).
"""

from __future__ import annotations

import hmac

from .errors import EvidenceRefused


def verify_software(report: bytes, h: bytes) -> None:
    """The software report must be the evidence hash `h` itself."""
    if not hmac.compare_digest(report, h):
        raise EvidenceRefused(
            "evidence_invalid",
            "The software evidence does not bind this nonce, key, binary and protections.",
        )
