"""`ennclave attest verify`: check one piece of evidence the way the key server does.

    ennclave attest verify EVIDENCE_FILE [--kind snp|tdx|sgx] [--certs FILE_OR_DIR]
        [--collateral FILE_OR_DIR] [--at ISO_TIME] [--policy JSON_FILE] [--json]

Reads the raw formats vendors and tools write: an SEV-SNP report (1184 bytes, optionally
followed by its certificate table; the VCEK/VLEK as DER or PEM with `--certs`), a DCAP
quote (SGX v3, TDX v4/v5; padding after the quote is reported, not refused), or either as
hex text. Prints the verified fields, or the one-sentence refusal, and exits 0 or 2.
Without `--policy` it checks authenticity only (and reports debug, TCB status and
collateral state); with `--policy` (a JSON object: the `snp`, `tdx` or `sgx` section of a
key-release policy) it also applies the policy.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from ..errors import InputError
from . import dcap, policy, sgx, snp, tdx
from .certs import load_certificates
from .errors import EvidenceRefused

KINDS = ("snp", "tdx", "sgx")


def detect_kind(data: bytes) -> str:
    """snp | tdx | sgx from the first bytes: an SNP report starts with a u32 version
    (2, 3, 5), a DCAP quote with u16 version and u16 attestation key type 2."""
    if len(data) >= 8 and data[2:4] == b"\0\0" and data[0] in snp.SUPPORTED_VERSIONS:
        return "snp"
    if len(data) >= 8 and data[2:4] == b"\x02\x00":
        return "tdx" if data[4] == dcap.TEE_TDX else "sgx"
    raise InputError("Cannot tell the evidence kind from the file; give --kind snp, tdx or sgx.")


def read_evidence(path: Path) -> bytes:
    data = path.read_bytes()
    text = data.strip()
    try:  # hex text, as some tools and repositories store reports
        if text and len(text) % 2 == 0 and all(c in b"0123456789abcdefABCDEF" for c in text):
            return bytes.fromhex(text.decode())
    except ValueError:
        pass
    return data


def _paths_certs(items: list[str]) -> list[x509.Certificate]:
    out: list[x509.Certificate] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            for f in sorted(x for x in p.iterdir() if x.is_file()):
                try:
                    out += load_certificates(f.read_bytes(), f.name)
                except EvidenceRefused:
                    continue  # a directory may hold reports and keys too
        elif p.is_file():
            out += load_certificates(p.read_bytes(), p.name)
        else:
            raise InputError(f"--certs {item}: no such file or directory.")
    return out


def parse_time(s: str | None) -> datetime:
    if s is None:
        return datetime.now(UTC)
    try:
        t = datetime.fromisoformat(s)
    except ValueError:
        raise InputError(
            f"--at {s!r} is not an ISO 8601 time (e.g. 2025-06-20T12:00:00Z)."
        ) from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def verify_evidence(
    data: bytes,
    kind: str,
    *,
    at: datetime,
    certs: list[x509.Certificate] | None = None,
    collateral: dcap.Collateral | None = None,
    section: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Verify (and, given a policy section, judge) evidence; the fields as JSON."""
    if kind == "snp":
        raw, table = snp.split_evidence(data)
        ev: Any = snp.verify_snp(raw, [*table, *(certs or [])], at=at)
        if section is not None:
            policy.check_snp(ev, policy.SnpPolicy.from_json(section, "snp."))
    elif kind == "tdx":
        ev = tdx.verify_tdx_quote(
            data, at=at, certs=certs or None, collateral=collateral, allow_trailing=True
        )
        if section is not None:
            policy.check_tdx(ev, policy.TdxPolicy.from_json(section, "tdx."))
    elif kind == "sgx":
        ev = sgx.verify_sgx_quote(
            data, at=at, certs=certs or None, collateral=collateral, allow_trailing=True
        )
        if section is not None:
            policy.check_sgx(ev, policy.SgxPolicy.from_json(section, "sgx."))
    else:
        raise InputError(f"Unknown evidence kind {kind!r}; use snp, tdx or sgx.")
    return {"verified_at": at.isoformat(), "policy_applied": section is not None, **ev.to_json()}


def cmd_attest_verify(args: argparse.Namespace) -> int:
    path = Path(args.evidence)
    if not path.is_file():
        raise InputError(f"{path}: no such file.")
    data = read_evidence(path)
    kind = args.kind or detect_kind(data)
    at = parse_time(args.at)
    section = None
    if args.policy:
        try:
            section = json.loads(Path(args.policy).read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"--policy {args.policy}: not a readable JSON object ({e}).") from None
    try:
        certs = _paths_certs(args.certs or [])
        coll = dcap.load_collateral(args.collateral) if args.collateral else None
        if section is not None and not isinstance(section, dict):
            raise InputError(f"--policy {args.policy}: expected a JSON object.")
        out = verify_evidence(data, kind, at=at, certs=certs, collateral=coll, section=section)
    except EvidenceRefused as e:
        if args.json:
            print(
                json.dumps(
                    {"verified": False, "kind": kind, "error": e.code, "reason": str(e)}, indent=2
                )
            )
        else:
            print(f"refused ({e.code}): {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # a policy section that does not validate
        raise InputError(f"--policy {args.policy}: {e}.") from None
    if args.json:
        print(json.dumps({"verified": True, **out}, indent=2))
    else:
        print(f"verified {kind} evidence at {out['verified_at']}")
        for k, v in out.items():
            if k not in ("kind", "verified_at"):
                print(f"  {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    return 0


def add_commands(sub: Any, parents: list[argparse.ArgumentParser] | None = None) -> None:
    """Add `attest verify` to the `ennclave` command's subparsers; `parents` are the
    options every (sub)command accepts (-v, --debug)."""
    common = {"parents": parents or []}
    pa = sub.add_parser("attest", help="verify hardware evidence (SEV-SNP, TDX, SGX)", **common)
    asub = pa.add_subparsers(dest="attest_cmd", required=True, metavar="ACTION")
    v = asub.add_parser(
        "verify", help="verify one report or quote and print its fields or the refusal", **common
    )
    v.add_argument(
        "evidence",
        metavar="EVIDENCE_FILE",
        help="an SEV-SNP report (optionally with its certificate table) or a DCAP quote, raw or hex",
    )
    v.add_argument(
        "--kind", choices=KINDS, help="snp, tdx or sgx (default: from the file's first bytes)"
    )
    v.add_argument(
        "--certs",
        action="append",
        metavar="FILE_OR_DIR",
        help="SNP: the VCEK/VLEK (and ASK/ARK); DCAP: the PCK chain instead of the quote's (repeatable)",
    )
    v.add_argument(
        "--collateral",
        action="append",
        metavar="FILE_OR_DIR",
        help="DCAP: TCB Info, QE Identity, CRLs (Intel PCS JSON, QuoteCollateralV3 JSON, DER/PEM; repeatable)",
    )
    v.add_argument("--at", metavar="ISO_TIME", help="verification time (default: now, UTC)")
    v.add_argument(
        "--policy",
        metavar="JSON_FILE",
        help="also apply this policy section (snp, tdx or sgx object)",
    )
    v.add_argument("--json", action="store_true", help="print JSON")
    v.set_defaults(func=cmd_attest_verify)
