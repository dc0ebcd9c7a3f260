"""The one exception every verifier and policy check raises."""

from __future__ import annotations


class EvidenceRefused(Exception):
    """Evidence does not verify, or a policy does not accept it.

    `code` is a short machine-readable reason (``bad_signature``, ``bad_chain``,
    ``collateral_stale``, …; docs/attestation.md lists them all), `str()` / `reason`
    one sentence for people."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
