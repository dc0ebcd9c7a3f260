"""Evidence that a key request comes from an enclave worker, and the release policy.

Every kind of evidence binds the same **evidence hash** (`attest.binding`)

    H = SHA-256("ennclave evidence v2" ‖ 0x00 ‖ nonce ‖ worker X25519 public key ‖
                SHA-256 of the worker binary ‖ SHA-256(protections))

(the worker's EVIDENCE report, docs/worker-protocol.md) to the key server's single-use
nonce; `protections` is what the worker says protects its secrets (secret memory
kind, seccomp, tracer check, …), which a policy can require (`require_protections`).
A request without protections (a worker before protocol 3) is checked against the v1
hash, without them, and meets no requirement. What vouches for H differs:

* ``software`` — nothing but the worker itself: anyone can compute H. It proves
  freshness (the nonce) and lets the server bind the release to one public key and a
  claimed binary hash and manifest digest; it does **not** prove that the key pair
  lives in an unmodified worker. Accepted only where the bundle's policy sets
  ``allow_software`` (default off); every such release is recorded as software.
  Its protections are only as true as the worker binary is unmodified: pin it with
  ``allowed_binaries``; a host that runs its own code can claim anything.
* ``sgx-dcap-v3`` (SGX quote v3), ``tdx-dcap`` (TDX quote v4/v5), ``sev-snp`` (SEV-SNP
  report ‖ optional certificate table) — vendor-signed hardware evidence whose
  REPORT_DATA is H ‖ 32 zero bytes, verified by `ennclave.attest` (vendor chain to the
  pinned root, signatures, TCB) and accepted per the policy's `sgx` / `tdx` / `snp`
  section. **Verified against real vendor samples; never run on SGX, TDX or SEV-SNP
  hardware here.**
"""

from __future__ import annotations

import hmac
import json
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from ..attest import binding, dcap, sgx, snp, software, tdx
from ..attest import policy as ap
from ..attest.binding import EVIDENCE_DOMAIN, evidence_hash
from ..attest.certs import Anchors
from ..attest.errors import EvidenceRefused

__all__ = [
    "EVIDENCE_DOMAIN",
    "KINDS",
    "Claim",
    "CollateralVerifier",
    "EvidenceRefused",
    "Policy",
    "Verified",
    "evidence_hash",
    "verify",
]

KIND_SOFTWARE = "software"
KIND_SGX = "sgx-dcap-v3"
KIND_TDX = "tdx-dcap"
KIND_SNP = "sev-snp"
KINDS = (KIND_SOFTWARE, KIND_SGX, KIND_TDX, KIND_SNP)
HEX64 = 64
# Flat SGX fields of policies written before the per-kind sections; read into `sgx`.
LEGACY_SGX_FIELDS = ("mrenclaves", "mrsigners", "isv_prod_id", "min_isv_svn", "allow_debug")
# What a policy can require of the worker's protections (`require_protections`), and
# how each is read from the protections it reports (docs/key-release.md "Protections").
REQUIREMENTS: dict[str, Any] = {
    "memfd_secret": lambda p: p.get("secret_memory") == "memfd_secret",
    "locked_memory": lambda p: p.get("secret_memory") in ("memfd_secret", "mlock"),
    "seccomp": lambda p: p.get("seccomp") is True,
    "no_tracer": lambda p: p.get("tracer_check") is True,
    "environment_check": lambda p: p.get("environment_check") is True,
    "mapping_check": lambda p: p.get("mapping_check") is True,
    "non_dumpable": lambda p: p.get("non_dumpable") is True,
    "static_binary": lambda p: p.get("static_binary") is True,
}
MAX_PROTECTIONS_BYTES = 1024
# Samples in one release's slice of a metered budget unless the policy sets
# `budget_slice` (never more than remains): what a crashed worker can lose at most.
DEFAULT_SLICE = 1000
SECTIONS: dict[str, type[ap.SgxPolicy] | type[ap.TdxPolicy] | type[ap.SnpPolicy]] = {
    "sgx": ap.SgxPolicy,
    "tdx": ap.TdxPolicy,
    "snp": ap.SnpPolicy,
}


@dataclass
class Policy:
    """What a bundle's key may be released to. Integers only (no floats): times are
    Unix seconds. Hardware kinds are configured in their sections (`attest.policy`)."""

    allow_software: bool = False
    allowed_binaries: list[str] = field(default_factory=list)  # worker SHA-256 hex; [] = any
    expires_at: int | None = None  # no release after this time
    max_clients: int | None = None  # distinct client ids ever granted
    licence_ttl: int = 24 * 3600  # seconds a licence stays valid
    query_budget: int | None = None  # the key's total samples over all releases (metered)
    client_budget: int | None = None  # each client's total samples (metered)
    budget_slice: int | None = None  # samples per release of a metered key (DEFAULT_SLICE)
    offline: bool = False  # licence allows an offline key cache until expiry
    # protections the worker's evidence must report (names of REQUIREMENTS)
    require_protections: list[str] = field(default_factory=list)
    sgx: ap.SgxPolicy = field(default_factory=ap.SgxPolicy)
    tdx: ap.TdxPolicy = field(default_factory=ap.TdxPolicy)
    snp: ap.SnpPolicy = field(default_factory=ap.SnpPolicy)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Policy:
        data = dict(data or {})
        legacy = {k: data.pop(k) for k in LEGACY_SGX_FIELDS if k in data}
        if legacy:
            data["sgx"] = {**(data.get("sgx") or {}), **legacy}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown policy field(s): {', '.join(unknown)}")
        for name, section in SECTIONS.items():
            v = data.get(name)
            if v is not None and not isinstance(v, dict):
                raise ValueError(f"policy.{name} must be an object")
            data[name] = section.from_json(v, f"{name}.")
        p = cls(**data)
        p.validate()
        return p

    def merged(self, changes: dict[str, Any]) -> Policy:
        """This policy with `changes` applied; a section given as an object is merged
        field by field, so `{"tdx": {"mrtds": [...]}}` keeps the other TDX settings."""
        d = asdict(self)
        for k, v in changes.items():
            d[k] = {**d[k], **v} if k in SECTIONS and isinstance(v, dict) else v
        return Policy.from_json(d)

    def validate(self) -> None:
        for name in ("allow_software", "offline"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"policy.{name} must be true or false")
        v = self.allowed_binaries
        if not isinstance(v, list) or not all(_is_hex(x, HEX64) for x in v):
            raise ValueError("policy.allowed_binaries must be a list of 64-digit hex digests")
        self.allowed_binaries = [x.lower() for x in v]
        v = self.require_protections
        if (
            not isinstance(v, list)
            or not all(isinstance(x, str) and x in REQUIREMENTS for x in v)
            or len(set(v)) != len(v)
        ):
            raise ValueError(
                "policy.require_protections must be a list of distinct names among "
                + ", ".join(REQUIREMENTS)
            )
        budgets = (("query_budget", 1), ("client_budget", 1), ("budget_slice", 1))
        for name, lo in (("expires_at", 0), ("max_clients", 1), *budgets):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < lo):
                raise ValueError(f"policy.{name} must be an integer ≥ {lo} or null")
        if not _is_int(self.licence_ttl) or not 1 <= self.licence_ttl <= 366 * 86400:
            raise ValueError(
                "policy.licence_ttl must be an integer number of seconds, 1 s to 1 year"
            )

    @property
    def metered(self) -> bool:
        """Whether releases hand out slices of a total budget (docs/key-release.md)."""
        return self.query_budget is not None or self.client_budget is not None

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
    # the worker's protections (canonical JSON) exactly as it hashed them; None: a
    # worker before protocol 3, which reported none
    protections: bytes | None = None


@dataclass(frozen=True)
class Verified:
    """An accepted claim: for hardware kinds, the measurements and TCB status that the
    policy accepted; the protections the worker reported (for the audit log)."""

    kind: str
    hardware: bool
    binary_sha256: str
    measurements: dict[str, str] = field(default_factory=dict)
    tcb_status: str | None = None
    protections: dict[str, Any] | None = None

    @property
    def mrenclave(self) -> str | None:
        return self.measurements.get("mrenclave")

    @property
    def mrsigner(self) -> str | None:
        return self.measurements.get("mrsigner")


CollateralVerifier = dcap.CollateralSource
"""The key server's DCAP collateral (`ServerSettings.collateral`): a fixed
`attest.dcap.Collateral` — e.g. `load_collateral([dir])`, which the operator keeps
current — or a function FMSPC (hex) → collateral. None: no collateral, so SGX/TDX
evidence is refused unless a policy sets `allow_missing_collateral`."""


def verify(
    claim: Claim,
    policy: Policy,
    *,
    registered_manifest: str | None,
    collateral: CollateralVerifier | None = None,
    at: datetime | None = None,
    anchors: Anchors | None = None,
) -> Verified:
    """Check `claim` (whose nonce the caller has already consumed) against `policy` at
    time `at` (default now). `anchors` replaces the pinned vendor roots (tests)."""
    if len(claim.pubkey) != 32 or len(claim.binary_sha256) != 32 or len(claim.nonce) != 32:
        raise EvidenceRefused("malformed", "The evidence has fields of the wrong size.")
    if registered_manifest is not None and not hmac.compare_digest(
        claim.manifest_sha256.lower(), registered_manifest
    ):
        raise EvidenceRefused(
            "manifest_mismatch", "The manifest digest differs from the registered bundle's."
        )
    prot = parse_protections(claim.protections)
    h = evidence_hash(claim.nonce, claim.pubkey, claim.binary_sha256, claim.protections)
    binhex = claim.binary_sha256.hex()
    if claim.kind == KIND_SOFTWARE:
        software.verify_software(claim.report, h)
        if not policy.allow_software:
            raise EvidenceRefused(
                "software_not_allowed", "The bundle's policy does not allow software enclaves."
            )
        if policy.allowed_binaries and binhex not in policy.allowed_binaries:
            raise EvidenceRefused(
                "binary_not_allowed", "The worker binary's hash is not in the bundle's policy."
            )
        check_protections(prot, policy)
        return Verified(KIND_SOFTWARE, False, binhex, protections=prot)
    if claim.kind not in HARDWARE:
        raise EvidenceRefused("unknown_kind", "Unknown evidence kind.")
    # Hardware: authenticity first, then the binding, then the policy's section.
    e = _verify_hardware(claim.kind, claim.report, at or datetime.now(UTC), collateral, anchors)
    binding.check_binding(e.report_data, h, HARDWARE[claim.kind])
    if isinstance(e, snp.SnpEvidence):
        ap.check_snp(e, policy.snp)
    elif isinstance(e, tdx.TdxEvidence):
        ap.check_tdx(e, policy.tdx)
    else:
        ap.check_sgx(e, policy.sgx)
    check_protections(prot, policy)
    return Verified(claim.kind, True, binhex, e.measurements(), e.tcb_status, prot)


def parse_protections(raw: bytes | None) -> dict[str, Any] | None:
    """The worker's protections: a small JSON object of booleans and short names, in
    canonical form (keys sorted, no spaces: the bytes it hashed have one reading)."""
    if raw is None:
        return None
    bad = EvidenceRefused(
        "protections_malformed",
        "The worker's protections are not the small canonical JSON object it sends; "
        "reinstall ennclave on the client.",
    )
    if len(raw) > MAX_PROTECTIONS_BYTES:
        raise bad
    try:
        p = json.loads(raw)
    except ValueError:
        raise bad from None
    if (
        not isinstance(p, dict)
        or len(p) > 32
        or not all(
            isinstance(k, str)
            and len(k) <= 32
            and (isinstance(v, bool) or (isinstance(v, str) and len(v) <= 32))
            for k, v in p.items()
        )
        or canonical_json(p) != raw
    ):
        raise bad
    return p


def canonical_json(p: dict[str, Any]) -> bytes:
    return json.dumps(p, sort_keys=True, separators=(",", ":")).encode()


def check_protections(prot: dict[str, Any] | None, policy: Policy) -> None:
    """Refuse unless the worker reports every protection the policy requires."""
    need = policy.require_protections
    if not need:
        return
    if prot is None:
        raise EvidenceRefused(
            "protections_missing",
            "The worker reports no protections (an ennclave before protocol 3), but this "
            f"key's policy requires {', '.join(need)}; upgrade ennclave on the client.",
        )
    missing = [n for n in need if not REQUIREMENTS[n](prot)]
    if missing:
        raise EvidenceRefused(
            "protections_missing",
            f"The worker lacks protection(s) this key's policy requires ({', '.join(missing)}; "
            f"it reports {canonical_json(prot).decode()}), so its key is not released.",
        )


HARDWARE = {  # kind -> what its refusals call it
    KIND_SGX: "SGX quote",
    KIND_TDX: "TDX quote",
    KIND_SNP: "SEV-SNP report",
}


def _verify_hardware(
    kind: str,
    report: bytes,
    at: datetime,
    collateral: CollateralVerifier | None,
    anchors: Anchors | None,
) -> snp.SnpEvidence | tdx.TdxEvidence | sgx.SgxEvidence:
    """Authenticity only (`ennclave.attest`); the key server wants the exact quote."""
    if kind == KIND_SNP:
        raw, certs = snp.split_evidence(report)  # report ‖ its certificate table
        return snp.verify_snp(raw, certs, at=at, anchors=anchors)
    if kind == KIND_TDX:
        return tdx.verify_tdx_quote(report, at=at, collateral=collateral, anchors=anchors)
    return sgx.verify_sgx_quote(
        report, at=at, collateral=collateral, anchors=anchors, versions=(3,)
    )
