"""Evidence that a key request comes from an enclave worker, and the release policy.

Every kind of evidence binds the same **evidence hash**

    H = SHA-256("ennclave evidence v1" ‖ 0x00 ‖ nonce ‖ worker X25519 public key ‖
                SHA-256 of the worker binary)

(the worker's EVIDENCE report, docs/worker-protocol.md) to the key server's single-use
nonce. What vouches for H differs:

* ``software`` — nothing but the worker itself: anyone can compute H. It proves
  freshness (the nonce) and lets the server bind the release to one public key and a
  claimed binary hash and manifest digest; it does **not** prove that the key pair
  lives in an unmodified worker. Accepted only where the bundle's policy sets
  ``allow_software`` (default off); every such release is recorded as software.
* ``sgx-dcap-v3`` — an SGX ECDSA quote (Gramine: written to
  ``/dev/attestation/user_report_data``, read from ``/dev/attestation/quote``) whose
  report_data is H ‖ 32 zero bytes; MRENCLAVE / MRSIGNER / ISV SVN / debug checked
  against the policy. The last step — the PCK certificate chain to Intel's root and the
  TCB status — needs a DCAP verifier (`CollateralVerifier`); without one configured the
  server refuses SGX evidence. **Untested on hardware** (no SGX here); tested with
  synthetic quotes.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from . import sgx

EVIDENCE_DOMAIN = b"ennclave evidence v1\x00"
KIND_SOFTWARE = "software"
KIND_SGX = "sgx-dcap-v3"
KINDS = (KIND_SOFTWARE, KIND_SGX)
HEX64 = 64


class EvidenceRefused(Exception):
    """Evidence does not verify or the policy does not accept it. `code` is a short
    machine-readable reason, `str()` one sentence for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def evidence_hash(nonce: bytes, pubkey: bytes, binary_sha256: bytes) -> bytes:
    return hashlib.sha256(EVIDENCE_DOMAIN + nonce + pubkey + binary_sha256).digest()


@dataclass
class Policy:
    """What a bundle's key may be released to. Integers only (no floats): times are
    Unix seconds."""

    allow_software: bool = False
    allowed_binaries: list[str] = field(default_factory=list)  # worker SHA-256 hex; [] = any
    mrenclaves: list[str] = field(default_factory=list)  # SGX: [] = none accepted
    mrsigners: list[str] = field(default_factory=list)
    isv_prod_id: int | None = None
    min_isv_svn: int = 0
    allow_debug: bool = False
    expires_at: int | None = None  # no release after this time
    max_clients: int | None = None  # distinct client ids ever granted
    licence_ttl: int = 24 * 3600  # seconds a licence stays valid
    query_budget: int | None = None  # samples per licence (enforced in the worker)
    offline: bool = False  # licence allows an offline key cache until expiry

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Policy:
        data = dict(data or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown policy field(s): {', '.join(unknown)}")
        p = cls(**data)
        p.validate()
        return p

    def merged(self, changes: dict[str, Any]) -> Policy:
        d = asdict(self)
        d.update(changes)
        return Policy.from_json(d)

    def validate(self) -> None:
        for name in ("allow_software", "allow_debug", "offline"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"policy.{name} must be true or false")
        for name in ("allowed_binaries", "mrenclaves", "mrsigners"):
            v = getattr(self, name)
            if not isinstance(v, list) or not all(_is_hex(x, HEX64) for x in v):
                raise ValueError(f"policy.{name} must be a list of 64-digit hex digests")
            setattr(self, name, [x.lower() for x in v])
        for name, lo in (
            ("isv_prod_id", 0),
            ("expires_at", 0),
            ("max_clients", 1),
            ("query_budget", 1),
        ):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < lo):
                raise ValueError(f"policy.{name} must be an integer ≥ {lo} or null")
        if not _is_int(self.min_isv_svn) or self.min_isv_svn < 0:
            raise ValueError("policy.min_isv_svn must be a non-negative integer")
        if not _is_int(self.licence_ttl) or not 1 <= self.licence_ttl <= 366 * 86400:
            raise ValueError(
                "policy.licence_ttl must be an integer number of seconds, 1 s to 1 year"
            )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_hex(v: object, n: int) -> bool:
    if not isinstance(v, str) or len(v) != n:
        return False
    try:
        bytes.fromhex(v)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Claim:
    """What the host relays: the worker's HELLO fields, its EVIDENCE and the digest of
    the manifest it will be given."""

    nonce: bytes
    pubkey: bytes
    binary_sha256: bytes
    manifest_sha256: str
    kind: str
    report: bytes


@dataclass(frozen=True)
class Verified:
    kind: str
    hardware: bool
    binary_sha256: str
    mrenclave: str | None = None
    mrsigner: str | None = None


CollateralVerifier = Callable[[sgx.QuoteV3], bytes]
"""Given a parsed quote, verify its PCK certificate chain to Intel's root CA and its
TCB status, and return the PCK public key (64 B x‖y) — or raise. Not provided by
ennclave (needs Intel collateral); tests inject one that trusts a synthetic PCK key."""


def verify(
    claim: Claim,
    policy: Policy,
    *,
    registered_manifest: str | None,
    collateral: CollateralVerifier | None = None,
) -> Verified:
    """Check `claim` (whose nonce the caller has already consumed) against `policy`."""
    if len(claim.pubkey) != 32 or len(claim.binary_sha256) != 32 or len(claim.nonce) != 32:
        raise EvidenceRefused("malformed", "The evidence has fields of the wrong size.")
    if registered_manifest is not None and not hmac.compare_digest(
        claim.manifest_sha256.lower(), registered_manifest
    ):
        raise EvidenceRefused(
            "manifest_mismatch", "The manifest digest differs from the registered bundle's."
        )
    h = evidence_hash(claim.nonce, claim.pubkey, claim.binary_sha256)
    binhex = claim.binary_sha256.hex()
    if claim.kind == KIND_SOFTWARE:
        if not hmac.compare_digest(claim.report, h):
            raise EvidenceRefused(
                "evidence_invalid",
                "The software evidence does not bind this nonce, key and binary.",
            )
        if not policy.allow_software:
            raise EvidenceRefused(
                "software_not_allowed", "The bundle's policy does not allow software enclaves."
            )
        if policy.allowed_binaries and binhex not in policy.allowed_binaries:
            raise EvidenceRefused(
                "binary_not_allowed", "The worker binary's hash is not in the bundle's policy."
            )
        return Verified(KIND_SOFTWARE, False, binhex)
    if claim.kind == KIND_SGX:
        return _verify_sgx(claim, policy, h, binhex, collateral)
    raise EvidenceRefused("unknown_kind", "Unknown evidence kind.")


def _verify_sgx(
    claim: Claim,
    policy: Policy,
    h: bytes,
    binhex: str,
    collateral: CollateralVerifier | None,
) -> Verified:
    try:
        q = sgx.parse_quote_v3(claim.report)
    except sgx.QuoteError as e:
        raise EvidenceRefused("quote_malformed", f"The SGX quote is malformed: {e}.") from None
    if not hmac.compare_digest(q.body.report_data, h + bytes(32)):
        raise EvidenceRefused(
            "quote_binding", "The SGX quote's report data does not bind this nonce and key."
        )
    mre, mrs = q.body.mr_enclave.hex(), q.body.mr_signer.hex()
    if q.body.debug and not policy.allow_debug:
        raise EvidenceRefused("debug_enclave", "The SGX enclave runs in debug mode.")
    if mre not in policy.mrenclaves and mrs not in policy.mrsigners:
        raise EvidenceRefused(
            "measurement_not_allowed", "Neither MRENCLAVE nor MRSIGNER is in the bundle's policy."
        )
    if mre not in policy.mrenclaves:  # accepted by signer: check product and version
        if policy.isv_prod_id is not None and q.body.isv_prod_id != policy.isv_prod_id:
            raise EvidenceRefused("isv_prod_id", "The SGX enclave's product id is not allowed.")
        if q.body.isv_svn < policy.min_isv_svn:
            raise EvidenceRefused("isv_svn", "The SGX enclave's security version is too old.")
    if collateral is None:
        raise EvidenceRefused(
            "no_collateral_verifier",
            "This key server has no DCAP collateral verifier configured, so it cannot "
            "verify SGX quotes.",
        )
    try:
        pck = collateral(q)
        sgx.verify_quote_signatures(q, pck)
    except (sgx.QuoteError, ValueError) as e:
        raise EvidenceRefused("quote_signature", f"The SGX quote does not verify: {e}.") from None
    return Verified(KIND_SGX, True, binhex, mre, mrs)
