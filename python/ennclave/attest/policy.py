"""What an owner accepts, per kind of hardware evidence, and the checks.

Each section is a JSON object inside a bundle's key-release policy (`sgx`, `tdx`,
`snp`; docs/attestation.md). Defaults are strict: a kind with no pinned measurement is
refused, debug is forbidden, only the ``UpToDate`` TCB status is accepted, and DCAP
collateral (TCB Info + QE Identity) must be supplied and current. The checks take a
*verified* evidence object (`snp.verify_snp`, `sgx.verify_sgx_quote`,
`tdx.verify_tdx_quote`); they never look at unauthenticated bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from .dcap import NO_MATCH, REVOKED, TCB_STATUSES, UP_TO_DATE, DcapResult
from .errors import EvidenceRefused
from .sgx import SgxEvidence
from .snp import SnpEvidence
from .tdx import TdxEvidence

ACCEPTABLE_TCB = tuple(s for s in TCB_STATUSES if s != REVOKED)
SNP_TCB_PARTS = ("bootloader", "tee", "snp", "microcode")
SNP_PRODUCT_NAMES = ("Milan", "Genoa")

S = TypeVar("S", bound="_Section")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _hex_list(name: str, v: object, nbytes: int) -> list[str]:
    ok = isinstance(v, list) and all(isinstance(x, str) and len(x) == 2 * nbytes for x in v)
    try:
        out = [bytes.fromhex(x).hex() for x in v] if ok else []  # type: ignore[union-attr]
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"policy.{name} must be a list of {2 * nbytes}-digit hex values")
    return out


def _bool(name: str, v: object) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"policy.{name} must be true or false")


def _int(name: str, v: object, lo: int, hi: int, none_ok: bool = False) -> None:
    if v is None and none_ok:
        return
    if not _is_int(v) or not lo <= v <= hi:  # type: ignore[operator]
        raise ValueError(f"policy.{name} must be an integer from {lo} to {hi}")


@dataclass
class _Section:
    @classmethod
    def from_json(cls: type[S], data: dict[str, Any] | None, prefix: str) -> S:
        data = dict(data or {})
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown policy field(s): {', '.join(prefix + u for u in unknown)}")
        s = cls(**data)
        s.validate(prefix)
        return s

    def validate(self, prefix: str) -> None:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _TcbPolicy(_Section):
    """DCAP collateral and TCB status (SGX and TDX)."""

    accepted_tcb_statuses: list[str] = field(default_factory=lambda: [UP_TO_DATE])
    allow_missing_collateral: bool = False  # no TCB Info / QE Identity supplied: TCB unknown
    allow_stale_collateral: bool = False  # collateral or CRL past its nextUpdate

    def _validate_tcb(self, p: str) -> None:
        v = self.accepted_tcb_statuses
        if not isinstance(v, list) or not all(x in ACCEPTABLE_TCB for x in v):
            raise ValueError(
                f"policy.{p}accepted_tcb_statuses must list statuses from {', '.join(ACCEPTABLE_TCB)}"
            )
        _bool(p + "allow_missing_collateral", self.allow_missing_collateral)
        _bool(p + "allow_stale_collateral", self.allow_stale_collateral)


@dataclass
class SgxPolicy(_TcbPolicy):
    mrenclaves: list[str] = field(default_factory=list)  # [] and no mrsigners: SGX refused
    mrsigners: list[str] = field(default_factory=list)
    isv_prod_id: int | None = None  # checked when accepted by MRSIGNER
    min_isv_svn: int = 0  # checked when accepted by MRSIGNER
    allow_debug: bool = False

    def validate(self, p: str) -> None:
        self.mrenclaves = _hex_list(p + "mrenclaves", self.mrenclaves, 32)
        self.mrsigners = _hex_list(p + "mrsigners", self.mrsigners, 32)
        _int(p + "isv_prod_id", self.isv_prod_id, 0, 0xFFFF, none_ok=True)
        _int(p + "min_isv_svn", self.min_isv_svn, 0, 0xFFFF)
        _bool(p + "allow_debug", self.allow_debug)
        self._validate_tcb(p)


@dataclass
class TdxPolicy(_TcbPolicy):
    mrtds: list[str] = field(default_factory=list)  # [] = TDX refused
    rtmrs: dict[str, str] = field(default_factory=dict)  # {"0".."3": hex}: must equal
    mrconfigids: list[str] = field(default_factory=list)  # [] = any
    mrseams: list[str] = field(default_factory=list)  # [] = any TDX module Intel signed
    allow_debug: bool = False

    def validate(self, p: str) -> None:
        self.mrtds = _hex_list(p + "mrtds", self.mrtds, 48)
        self.mrconfigids = _hex_list(p + "mrconfigids", self.mrconfigids, 48)
        self.mrseams = _hex_list(p + "mrseams", self.mrseams, 48)
        r = self.rtmrs
        if not isinstance(r, dict) or not set(r) <= {"0", "1", "2", "3"}:
            raise ValueError(f"policy.{p}rtmrs must map RTMR indices 0-3 to 96-digit hex values")
        self.rtmrs = {k: _hex_list(f"{p}rtmrs.{k}", [v], 48)[0] for k, v in sorted(r.items())}
        _bool(p + "allow_debug", self.allow_debug)
        self._validate_tcb(p)


@dataclass
class SnpPolicy(_Section):
    measurements: list[str] = field(default_factory=list)  # [] = SEV-SNP refused
    host_data: list[str] = field(default_factory=list)  # [] = any
    id_key_digests: list[str] = field(default_factory=list)  # [] = any
    min_guest_svn: int = 0
    min_tcb: dict[str, int] = field(default_factory=dict)  # REPORTED_TCB minimums
    products: list[str] = field(default_factory=list)  # [] = Milan or Genoa
    max_vmpl: int | None = None
    allow_vlek: bool = True
    allow_debug: bool = False
    allow_migration_agent: bool = False

    def validate(self, p: str) -> None:
        self.measurements = _hex_list(p + "measurements", self.measurements, 48)
        self.host_data = _hex_list(p + "host_data", self.host_data, 32)
        self.id_key_digests = _hex_list(p + "id_key_digests", self.id_key_digests, 48)
        _int(p + "min_guest_svn", self.min_guest_svn, 0, 0xFFFFFFFF)
        t = self.min_tcb
        if not isinstance(t, dict) or not set(t) <= set(SNP_TCB_PARTS):
            raise ValueError(f"policy.{p}min_tcb keys must be among {', '.join(SNP_TCB_PARTS)}")
        for k, v in t.items():
            _int(f"{p}min_tcb.{k}", v, 0, 255)
        if not isinstance(self.products, list) or not set(self.products) <= set(SNP_PRODUCT_NAMES):
            raise ValueError(f"policy.{p}products must list products from Milan, Genoa")
        _int(p + "max_vmpl", self.max_vmpl, 0, 3, none_ok=True)
        for name in ("allow_vlek", "allow_debug", "allow_migration_agent"):
            _bool(p + name, getattr(self, name))


# ------------------------------------------------------------------ checks


def _check_tcb(res: DcapResult, p: _TcbPolicy, label: str) -> None:
    if res.tcb is None and not p.allow_missing_collateral:
        raise EvidenceRefused(
            "collateral_missing",
            f"The {label} quote's TCB cannot be judged ({res.missing}), and the policy requires "
            "TCB Info and QE Identity collateral.",
        )
    if res.stale and not p.allow_stale_collateral:
        raise EvidenceRefused(
            "collateral_stale",
            f"The collateral is past its next update at the verification time "
            f"({'; '.join(res.stale)}), and the policy refuses stale collateral.",
        )
    if res.tcb is not None and res.tcb.status not in p.accepted_tcb_statuses:
        adv = f" ({', '.join(res.tcb.advisory_ids)})" if res.tcb.advisory_ids else ""
        what = (
            "matches no TCB level of its TCB Info"
            if res.tcb.status == NO_MATCH
            else f"is {res.tcb.status}{adv}"
        )
        raise EvidenceRefused(
            "tcb_not_accepted",
            f"The {label} platform's TCB {what}; the policy accepts "
            f"{', '.join(p.accepted_tcb_statuses) or 'no status'}.",
        )


def check_sgx(ev: SgxEvidence, p: SgxPolicy) -> None:
    b = ev.body
    if b.debug and not p.allow_debug:
        raise EvidenceRefused(
            "debug_forbidden", "The SGX enclave runs in debug mode, which the policy forbids."
        )
    mre, mrs = b.mr_enclave.hex(), b.mr_signer.hex()
    if mre not in p.mrenclaves and mrs not in p.mrsigners:
        raise EvidenceRefused(
            "measurement_not_allowed", "Neither MRENCLAVE nor MRSIGNER is in the policy."
        )
    if mre not in p.mrenclaves:  # accepted by signer: product and version matter
        if p.isv_prod_id is not None and b.isv_prod_id != p.isv_prod_id:
            raise EvidenceRefused(
                "product_not_allowed",
                f"The SGX enclave's ISVPRODID {b.isv_prod_id} is not allowed.",
            )
        if b.isv_svn < p.min_isv_svn:
            raise EvidenceRefused(
                "svn_too_low", f"The SGX enclave's ISVSVN {b.isv_svn} is below {p.min_isv_svn}."
            )
    _check_tcb(ev.dcap, p, "SGX")


def check_tdx(ev: TdxEvidence, p: TdxPolicy) -> None:
    b = ev.body
    if b.debug and not p.allow_debug:
        raise EvidenceRefused(
            "debug_forbidden",
            "The TD runs in debug mode (TDATTRIBUTES.DEBUG), which the policy forbids.",
        )
    if b.mr_td.hex() not in p.mrtds:
        raise EvidenceRefused(
            "measurement_not_allowed",
            "The TD's MRTD is not in the policy." if p.mrtds else "The policy pins no TDX MRTD.",
        )
    for i, want in p.rtmrs.items():
        if b.rtmrs[int(i)].hex() != want:
            raise EvidenceRefused(
                "measurement_not_allowed", f"The TD's RTMR{i} is not the pinned value."
            )
    if p.mrconfigids and b.mr_config_id.hex() not in p.mrconfigids:
        raise EvidenceRefused(
            "measurement_not_allowed", "The TD's MRCONFIGID is not in the policy."
        )
    if p.mrseams and b.mr_seam.hex() not in p.mrseams:
        raise EvidenceRefused(
            "measurement_not_allowed", "The TDX module's MRSEAM is not in the policy."
        )
    _check_tcb(ev.dcap, p, "TDX")


def check_snp(ev: SnpEvidence, p: SnpPolicy) -> None:
    r = ev.report
    if r.debug and not p.allow_debug:
        raise EvidenceRefused(
            "debug_forbidden",
            "The SEV-SNP guest policy allows debugging, which the policy forbids.",
        )
    if r.migrate_ma and not p.allow_migration_agent:
        raise EvidenceRefused(
            "migration_forbidden",
            "The SEV-SNP guest policy allows a migration agent, which the policy forbids.",
        )
    if r.measurement.hex() not in p.measurements:
        raise EvidenceRefused(
            "measurement_not_allowed",
            "The SEV-SNP MEASUREMENT is not in the policy."
            if p.measurements
            else "The policy pins no SEV-SNP measurement.",
        )
    if p.host_data and r.host_data.hex() not in p.host_data:
        raise EvidenceRefused(
            "measurement_not_allowed", "The SEV-SNP HOST_DATA is not in the policy."
        )
    if p.id_key_digests and r.id_key_digest.hex() not in p.id_key_digests:
        raise EvidenceRefused(
            "measurement_not_allowed", "The SEV-SNP ID_KEY_DIGEST is not in the policy."
        )
    if r.guest_svn < p.min_guest_svn:
        raise EvidenceRefused(
            "svn_too_low", f"The SEV-SNP GUEST_SVN {r.guest_svn} is below {p.min_guest_svn}."
        )
    have = r.reported_tcb.to_json()
    for part, lo in p.min_tcb.items():
        if have[part] < lo:
            raise EvidenceRefused(
                "tcb_too_low", f"The SEV-SNP REPORTED_TCB {part} SVN {have[part]} is below {lo}."
            )
    if p.products and ev.product not in p.products:
        raise EvidenceRefused("product_not_allowed", f"SEV-SNP on {ev.product} is not allowed.")
    if p.max_vmpl is not None and r.vmpl > p.max_vmpl:
        raise EvidenceRefused(
            "vmpl_not_allowed", f"The report comes from VMPL {r.vmpl}, above {p.max_vmpl}."
        )
    if ev.signing_key == "vlek" and not p.allow_vlek:
        raise EvidenceRefused(
            "signing_key_not_allowed", "The report is signed by a VLEK, which the policy refuses."
        )
