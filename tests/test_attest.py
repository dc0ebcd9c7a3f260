"""Evidence verifiers (`ennclave.attest`) against real vendor-signed samples, and the
key server's hardware evidence path against synthetic vendors (the only way to make a
report whose REPORT_DATA binds a fresh nonce).

The samples live in `../shared/attestation-samples` (override: $ENNCLAVE_ATTESTATION_SAMPLES;
README per kind there). Verification times are pinned: the samples' certificates and
collateral expire. None of this ran on SEV-SNP, TDX or SGX hardware.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import struct
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from ennclave.attest import cli as acli
from ennclave.attest import dcap, sgx, snp, tdx
from ennclave.attest import policy as ap
from ennclave.attest.binding import evidence_hash, expected_report_data
from ennclave.attest.certs import Anchors, load_certificates, packaged_intermediate
from ennclave.attest.errors import EvidenceRefused
from ennclave.keyserver import evidence as ev


def _samples_dir() -> Path:
    env = os.environ.get("ENNCLAVE_ATTESTATION_SAMPLES")
    return (
        Path(env)
        if env
        else Path(__file__).resolve().parents[1].parent / "shared" / "attestation-samples"
    )


SAMPLES = _samples_dir()


@pytest.fixture(scope="module")
def samples() -> Path:
    if not (SAMPLES / "sev-snp").is_dir():
        msg = (
            f"attestation samples not found at {SAMPLES} (set ENNCLAVE_ATTESTATION_SAMPLES or "
            "put shared/attestation-samples next to the repository)"
        )
        if os.environ.get("CI"):
            pytest.fail(msg)  # CI must exercise the real samples, never skip them
        pytest.skip(msg)
    return SAMPLES


def T(s: str) -> datetime:
    return datetime.fromisoformat(s)


def refused(fn, *a, **kw) -> EvidenceRefused:
    with pytest.raises(EvidenceRefused) as e:
        fn(*a, **kw)
    assert str(e.value).endswith("."), "a refusal reason is one sentence"
    return e.value


# ------------------------------------------------------------------ the sample table


@dataclass(frozen=True)
class Sample:
    id: str
    kind: str  # snp | tdx | sgx
    file: str  # under SAMPLES
    at: str
    measurement: tuple[str, str]  # (field, hex prefix) from the sample's README
    report_data: str  # hex prefix
    certs: tuple[str, ...] = ()  # SNP: VCEK/VLEK file
    chain: str = ""  # SNP: the ASK/ASVK + ARK file, for the certificate flips
    collateral: tuple[str, ...] = ()
    tcb: str | None = None  # expected TCB status (DCAP, with collateral)
    state: str = "missing"  # collateral state (DCAP)
    debug: bool = False
    default: str | None = None  # refusal by a default policy pinned to its measurement


GSPR = ("tdx/gtg-spr/sample_tcbInfo_response", "tdx/gtg-spr/sample_qeIdentity_response")
QVL_TDX = ("tdx/dcap-qvl/tdx_quote_collateral.json",)
QVL_V5 = ("tdx/dcap-qvl/tdx_quote_outdated_collateral.json",)
MILAN, GENOA = "sev-snp/certs/amd-milan-ask-ark.pem", "sev-snp/certs/amd-genoa-ask-ark.pem"
SNP_AT = "2025-06-01T00:00:00Z"  # inside every SNP signer's validity (the VLEK expired 2025-12-10)

SAMPLE_LIST = [
    Sample("snp-gsg-milan", "snp", "sev-snp/gsg-milan/attestation.bin", SNP_AT, ("measurement", "b07af9620f3b839b"), "0102030405", ("sev-snp/gsg-milan/vcek.der",), MILAN, debug=True, default="debug_forbidden"),
    Sample("snp-virtee-milan", "snp", "sev-snp/virtee-milan/report_milan.bin", SNP_AT, ("measurement", "7a1e5c266c0108db"), "d447b55d197491bf", ("sev-snp/virtee-milan/vcek_milan.der",), MILAN),
    Sample("snp-trustee-milan", "snp", "sev-snp/trustee-milan/test-report.bin", SNP_AT, ("id_key_digest", "0356215882a82527"), "ec6c52d7533cc2c4", ("sev-snp/trustee-milan/test-vcek.der",), MILAN),
    Sample("snp-aws-vlek", "snp", "sev-snp/trustee-milan-vlek-aws/test-vlek-report.bin", SNP_AT, ("measurement", "8922ebbdd00ec2c5"), "819770b7e6ea6df8", ("sev-snp/trustee-milan-vlek-aws/test-vlek.der",), "sev-snp/certs/amd-milan-asvk-ark.pem"),
    Sample("snp-azure-genoa", "snp", "sev-snp/trustee-azure-genoa/report.bin", SNP_AT, ("measurement", "f57dc09a507c6ecd"), "b581f12e29a2d7d6", ("sev-snp/trustee-azure-genoa/vcek.pem",), GENOA),
    Sample("snp-azure-milan", "snp", "sev-snp/trustee-azure-milan/report.bin", SNP_AT, ("measurement", "9ac48fcac8a2d88a"), "b3fbad6514c83cae", ("sev-snp/trustee-azure-milan/vcek.pem",), MILAN),
    Sample("snp-e2e-genoa", "snp", "sev-snp/trustee-e2e-genoa/report.bin", SNP_AT, ("measurement", "6a6519d757e68c2e"), "7e7320889600c7ac", ("sev-snp/trustee-e2e-genoa/vcek.der",), GENOA),
    Sample("sgx-qvl", "sgx", "sgx/dcap-qvl/sgx_quote", "2025-06-20T12:00:00Z", ("mrenclave", "33d8736db756ed49"), "48656c6c6f2c20776f726c6421", collateral=("sgx/dcap-qvl/sgx_quote_collateral.json",), tcb="ConfigurationAndSWHardeningNeeded", state="fresh", default="tcb_not_accepted"),
    Sample("sgx-occlum", "sgx", "sgx/trustee-occlum/occlum_quote.dat", "2025-06-20T12:00:00Z", ("mrenclave", "8f173e4613ff05c5"), "74657374", debug=True, default="debug_forbidden"),
    Sample("tdx-spr-e4", "tdx", "tdx/gtg-spr/tdx_prod_quote_SPR_E4.dat", "2025-06-20T12:00:00Z", ("mrtd", "6363b8043668a3ad"), "6c62dec1b8191749", collateral=(*GSPR, "tdx/gtg-spr/pckcrl", "tdx/certs/intel-sgx-root-ca.crl.der"), tcb="NoMatchingTcbLevel", state="stale", default="collateral_stale"),
    Sample("tdx-spr-e4-trimmed", "tdx", "tdx/gtg-spr/tdx_prod_quote_SPR_E4.trimmed.dat", "2025-06-20T12:00:00Z", ("mrtd", "6363b8043668a3ad"), "6c62dec1b8191749", collateral=GSPR, tcb="NoMatchingTcbLevel", state="stale", default="collateral_stale"),
    Sample("tdx-v5-gtg", "tdx", "tdx/gtg-v5/quote_v5_sample.dat", "2026-02-19T12:00:00Z", ("mrtd", "7348651a34b2d2d3"), "945eaacf5abc1f71", collateral=QVL_V5, tcb="UpToDate", state="fresh"),
    Sample("tdx-gce-cos", "tdx", "tdx/gtg-gce-cos/cos-113-tdx-quote.dat", "2025-06-20T12:00:00Z", ("mrtd", "dae67181d3d65e07"), "0000000000000000", default="collateral_missing"),
    Sample("tdx-trustee-4-debug", "tdx", "tdx/trustee/tdx_quote_4.dat", "2025-06-20T12:00:00Z", ("mrtd", "705ee9381b8633a9"), "7c71fe2c86eff65a", collateral=GSPR, tcb="UpToDate", state="stale", debug=True, default="debug_forbidden"),
    Sample("tdx-trustee-5", "tdx", "tdx/trustee/tdx_quote_5.dat", "2026-02-19T12:00:00Z", ("mrtd", "dfba221b48a22af8"), "6d6ab13b046cff60", collateral=QVL_V5, tcb="NoMatchingTcbLevel", state="fresh", default="tcb_not_accepted"),
    Sample("tdx-trustee-6", "tdx", "tdx/trustee/tdx_quote_6.dat", "2025-10-29T12:00:00Z", ("mrconfigid", "889abf4718f037e3"), "26cae1c77185617f", collateral=("tdx/trustee/tcbInfo.json", "tdx/trustee/enclaveIdentity.json"), tcb="OutOfDate", state="fresh", default="tcb_not_accepted"),
    Sample("tdx-azure", "tdx", "tdx/trustee-azure/td-quote.bin", "2025-06-20T12:00:00Z", ("mrtd", "024a32b070383331"), "9734504f161d104c", default="collateral_missing"),
    Sample("tdx-qvl", "tdx", "tdx/dcap-qvl/tdx_quote", "2025-06-20T12:00:00Z", ("mrtd", "91eb2b44d141d4ec"), "9a9d48e7f6799642", collateral=QVL_TDX, tcb="UpToDate", state="fresh"),
    Sample("tdx-qvl-outdated", "tdx", "tdx/dcap-qvl/tdx_quote_outdated", "2026-02-19T12:00:00Z", ("mrtd", "273828c46252fcbd"), "d2142b643598eb5f", collateral=QVL_V5, tcb="NoMatchingTcbLevel", state="fresh", default="tcb_not_accepted"),
    Sample("tdx-qvl-tappd", "tdx", "tdx/dcap-qvl/quote-from-tappd.bin", "2025-06-20T12:00:00Z", ("rtmr3", "a2d25bc888a93009"), "7668c6b4eafb6230", collateral=QVL_TDX, tcb="NoMatchingTcbLevel", state="fresh", default="tcb_not_accepted"),
    Sample("tdx-qvl-near", "tdx", "tdx/dcap-qvl/near-quote.bin", "2025-09-03T12:00:00Z", ("mrconfigid", "0112a20aed7d6c68"), "0001d579ba6e734a", collateral=("tdx/dcap-qvl/near-quote_collateral.json",), tcb="UpToDate", state="fresh"),
]  # fmt: skip
BY_ID = {s.id: s for s in SAMPLE_LIST}


@cache
def _bytes(rel: str) -> bytes:
    return (SAMPLES / rel).read_bytes()


@cache
def _certs(rel: str) -> tuple[x509.Certificate, ...]:
    return tuple(load_certificates(_bytes(rel)))


@cache
def _collateral(rels: tuple[str, ...]) -> dcap.Collateral | None:
    return dcap.load_collateral([SAMPLES / r for r in rels]) if rels else None


def verify_sample(s: Sample, data: bytes | None = None, **over):
    data = _bytes(s.file) if data is None else data
    at = over.pop("at", T(s.at))
    if s.kind == "snp":
        certs = over.pop("certs", [c for r in s.certs for c in _certs(r)])
        return snp.verify_snp(data, certs, at=at, **over)
    fn = sgx.verify_sgx_quote if s.kind == "sgx" else tdx.verify_tdx_quote
    over.setdefault("collateral", _collateral(s.collateral))
    return fn(data, at=at, allow_trailing=True, **over)


def pinned_policy(s: Sample, e, **kw):
    """The policy section an owner would write for this sample's own measurement."""
    m = e.measurements()
    if s.kind == "snp":
        return ap.SnpPolicy.from_json({"measurements": [m["measurement"]], **kw}, "snp.")
    if s.kind == "sgx":
        return ap.SgxPolicy.from_json({"mrenclaves": [m["mrenclave"]], **kw}, "sgx.")
    return ap.TdxPolicy.from_json({"mrtds": [m["mrtd"]], **kw}, "tdx.")


CHECK = {"snp": ap.check_snp, "sgx": ap.check_sgx, "tdx": ap.check_tdx}


# ------------------------------------------------------------------ every sample verifies


@pytest.mark.parametrize("s", SAMPLE_LIST, ids=lambda s: s.id)
def test_sample_verifies_at_its_pinned_time(samples, s):
    e = verify_sample(s)
    name, prefix = s.measurement
    assert e.measurements()[name].startswith(prefix)
    assert e.report_data.hex().startswith(prefix if name == "report_data" else s.report_data)
    assert e.debug is s.debug
    j = e.to_json()
    assert j["kind"] == s.kind and json.dumps(j)  # JSON-able, for the CLI
    if s.kind != "snp":
        assert e.dcap.collateral_state == s.state
        assert (e.dcap.tcb.status if e.dcap.tcb else None) == s.tcb


@pytest.mark.parametrize("s", SAMPLE_LIST, ids=lambda s: s.id)
def test_sample_against_the_default_and_an_accepting_policy(samples, s):
    e = verify_sample(s)
    if s.default is None:
        CHECK[s.kind](e, pinned_policy(s, e))
    else:
        assert refused(CHECK[s.kind], e, pinned_policy(s, e)).code == s.default
    accepting: dict = {"allow_debug": True}
    if s.kind != "snp":
        accepting |= {
            "accepted_tcb_statuses": list(ap.ACCEPTABLE_TCB),
            "allow_missing_collateral": True,
            "allow_stale_collateral": True,
        }
    CHECK[s.kind](e, pinned_policy(s, e, **accepting))
    other = replace(s, id="x")  # a policy pinned to something else refuses
    pol = pinned_policy(other, e, **accepting)
    for f in ("measurements", "mrenclaves", "mrtds"):
        if hasattr(pol, f):
            setattr(pol, f, ["00" * (len(getattr(pol, f)[0]) // 2)])
    assert refused(CHECK[s.kind], e, pol).code == "measurement_not_allowed"


def test_every_sample_is_in_the_table(samples):
    """Each vendor-signed evidence file in the samples has a row (the CCA token is
    test-signed and the NVIDIA reports are another kind: both out of scope)."""
    files = {s.file for s in SAMPLE_LIST}
    for kind, pat in (("sev-snp", "*/*.bin"), ("tdx", "*/*"), ("sgx", "*/*")):
        for p in sorted((SAMPLES / kind).glob(pat)):
            rel = str(p.relative_to(SAMPLES))
            if p.parent.name in ("certs",) or p.suffix in (".json", ".hex", ".txt", ".der", ".pem"):
                continue
            if "hcl-report" in p.name or p.name.startswith("sample_") or p.name == "pckcrl":
                continue  # Azure HCL wrappers (their inner report is in the table), collateral
            assert rel in files, rel


# ------------------------------------------------------------------ single-bit flips


def _flip(b: bytes, pos: int, bit: int = 0) -> bytes:
    out = bytearray(b)
    out[pos] ^= 1 << bit
    return bytes(out)


def _cert_positions(c: x509.Certificate) -> dict[str, int]:
    """Byte offsets in a certificate's DER: in its signature, its public key, its issuer."""
    d = c.public_bytes(Encoding.DER)
    spki = c.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    issuer_cn = c.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value.encode()
    return {
        "sig": len(d) - 1,
        "key": d.index(spki) + len(spki) // 2,
        "issuer": d.index(issuer_cn) + 1,
    }


def _flip_cert(c: x509.Certificate, where: str) -> x509.Certificate:
    d = c.public_bytes(Encoding.DER)
    bit = 5 if where == "issuer" else 0  # a letter's case bit keeps the name's type valid
    return load_certificates(_flip(d, _cert_positions(c)[where], bit))[0]


def _pem(certs) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


def _quote_with_chain(quote: bytes, i: int, where: str) -> bytes:
    """The quote with certificate `i` of its embedded PEM chain flipped, same length."""
    q = dcap.parse_quote(quote, allow_trailing=True)
    certs = load_certificates(q.cert_data.rstrip(b"\0"))
    certs[i] = _flip_cert(certs[i], where)
    new = _pem(certs)
    old = q.cert_data.rstrip(b"\0")
    assert len(new) == len(old) and old == _pem(load_certificates(old))
    off = quote.index(old)
    return quote[:off] + new + quote[off + len(old) :]


def _flip_cases() -> list:
    cases = []
    for s in SAMPLE_LIST:
        if s.kind == "snp":
            for pos in (0x008, 0x090 + 7, 0x1A0 + 63):  # POLICY, MEASUREMENT, CHIP_ID
                cases.append((s, "body", pos, "bad_signature"))
            for pos in (snp.OFF_SIGNATURE_R + 3, snp.OFF_SIGNATURE_S + 40):
                cases.append((s, "signature", pos, "bad_signature"))
            for cert in ("signer", "ca"):
                for where in ("sig", "key", "issuer"):
                    cases.append((s, f"{cert}-cert", where, "bad_chain"))
            for where in ("sig", "key"):
                cases.append((s, "root-cert", where, "untrusted_root"))
        else:
            body_end = dcap.HEADER_SIZE + (
                6 if s.file.endswith(("v5_sample.dat", "outdated", "_5.dat")) else 0
            )
            for pos in (9, 40, body_end + 64, body_end + 300):  # header SVNs, user data, body
                cases.append((s, "body", pos, "bad_signature"))
            cases.append((s, "signature", 0, "bad_signature"))
            cases.append((s, "signature", 63, "bad_signature"))
            cases.append((s, "attest-key", 10, "qe_binding"))
            cases.append((s, "qe-report", 100, "bad_qe_report"))
            cases.append((s, "qe-report-sig", 5, "bad_qe_report"))
            cases.append((s, "qe-auth", 0, "qe_binding"))
            for name in ("pck", "ca"):
                for where in ("sig", "key", "issuer"):
                    cases.append((s, f"{name}-cert", where, "bad_chain"))
            cases.append((s, "root-cert", "sig", "untrusted_root"))
            if s.collateral:
                cases.append((s, "tcb-info", 40, "bad_collateral"))
                cases.append((s, "qe-identity-sig", 7, "bad_collateral"))
                for where in ("sig", "key"):
                    cases.append((s, "tcb-signing-cert", where, "bad_chain"))
            if any("crl" in c or "collateral.json" in c for c in s.collateral):
                cases.append((s, "crl", -1, "bad_collateral"))
    return [pytest.param(*c, id=f"{c[0].id}-{c[1]}-{c[2]}") for c in cases]


def _offsets(q: dcap.Quote, raw: bytes) -> dict[str, int]:
    sig, qe = raw.index(q.signature), raw.index(q.qe_report_raw)  # both unique in the quote
    return {
        "signature": sig,
        "attest-key": sig + 64,
        "qe-report": qe,
        "qe-report-sig": qe + 384,
        "qe-auth": qe + 384 + 64 + 2,  # after the u16 size
    }


@pytest.mark.parametrize(("s", "region", "pos", "code"), _flip_cases())
def test_single_bit_flip_is_refused(samples, s, region, pos, code):
    raw = _bytes(s.file)
    if s.kind == "snp":
        chain = list(_certs(s.chain))  # ASK/ASVK then ARK, given explicitly so they can be flipped
        signer = _certs(s.certs[0])[0]
        if region in ("body", "signature"):
            e = refused(verify_sample, s, _flip(raw, pos), certs=[signer, *chain])
        else:
            certs = [signer, *chain]
            i = {"signer-cert": 0, "ca-cert": 1, "root-cert": 2}[region]
            certs[i] = _flip_cert(certs[i], pos)
            e = refused(verify_sample, s, raw, certs=certs)
        assert e.code == code, e
        return
    q = dcap.parse_quote(raw, allow_trailing=True)
    if region == "body":
        data = _flip(raw, pos)
    elif region in ("tcb-info", "qe-identity-sig", "tcb-signing-cert", "crl"):
        coll = _collateral(s.collateral)
        if region == "tcb-info":
            ti = [replace(t, raw=_flip(t.raw, pos)) for t in coll.tcb_infos]
            bad = dataclasses.replace(coll, tcb_infos=ti)
        elif region == "qe-identity-sig":
            qi = [replace(t, signature=_flip(t.signature, pos)) for t in coll.qe_identities]
            bad = dataclasses.replace(coll, qe_identities=qi)
        elif region == "tcb-signing-cert":  # the signer of both TCB Info and QE Identity
            signer = _flip_cert(packaged_intermediate("intel-sgx-tcb-signing.pem"), pos)
            bad = dataclasses.replace(
                coll,
                tcb_infos=[replace(t, chain=(signer,)) for t in coll.tcb_infos],
                qe_identities=[replace(t, chain=(signer,)) for t in coll.qe_identities],
            )
        else:
            crls = [
                x509.load_der_x509_crl(_flip(c.public_bytes(Encoding.DER), pos)) for c in coll.crls
            ]
            bad = dataclasses.replace(coll, crls=crls)
        assert refused(verify_sample, s, collateral=bad).code == code
        return
    elif region.endswith("-cert"):
        data = _quote_with_chain(raw, {"pck-cert": 0, "ca-cert": 1, "root-cert": 2}[region], pos)
    else:
        data = _flip(raw, _offsets(q, raw)[region] + pos)
    e = refused(verify_sample, s, data)
    assert e.code == code, e


# ------------------------------------------------------------------ debug, migration, TCB, time


def test_debug_and_migration_bits_refused_by_default_and_caught_by_the_signature(samples):
    s = BY_ID["snp-virtee-milan"]
    e = verify_sample(s)
    pol = pinned_policy(s, e)
    ap.check_snp(e, pol)
    for bit, code in (
        (snp.POLICY_DEBUG, "debug_forbidden"),
        (snp.POLICY_MIGRATE_MA, "migration_forbidden"),
    ):
        forged = replace(e, report=replace(e.report, policy=e.report.policy | bit))
        assert refused(ap.check_snp, forged, pol).code == code
        raw = bytearray(_bytes(s.file))
        struct.pack_into("<Q", raw, snp.OFF_POLICY, e.report.policy | bit)
        assert refused(verify_sample, s, bytes(raw)).code == "bad_signature"

    s = BY_ID["tdx-qvl"]
    e = verify_sample(s)
    ap.check_tdx(e, pinned_policy(s, e))
    td = bytearray(e.body.td_attributes)
    td[0] |= tdx.TD_ATTR_DEBUG
    forged = replace(e, body=replace(e.body, td_attributes=bytes(td)))
    assert (
        forged.debug
        and refused(ap.check_tdx, forged, pinned_policy(s, e)).code == "debug_forbidden"
    )
    assert (
        refused(verify_sample, s, _flip(_bytes(s.file), dcap.HEADER_SIZE + 120)).code
        == "bad_signature"
    )

    s = BY_ID["sgx-qvl"]
    e = verify_sample(s)
    attrs = bytearray(e.body.attributes)
    attrs[0] |= dcap.EnclaveReport.ATTR_DEBUG
    forged = replace(e, body=replace(e.body, attributes=bytes(attrs)))
    pol = pinned_policy(s, e, accepted_tcb_statuses=["ConfigurationAndSWHardeningNeeded"])
    ap.check_sgx(e, pol)
    assert refused(ap.check_sgx, forged, pol).code == "debug_forbidden"
    assert (
        refused(verify_sample, s, _flip(_bytes(s.file), dcap.HEADER_SIZE + 48, 1)).code
        == "bad_signature"
    )


def test_no_matching_tcb_level_is_refused_unless_the_policy_accepts_it(samples):
    s = BY_ID["tdx-qvl-outdated"]
    e = verify_sample(s)
    r = refused(ap.check_tdx, e, pinned_policy(s, e))
    assert r.code == "tcb_not_accepted" and "matches no TCB level" in str(r)
    ap.check_tdx(e, pinned_policy(s, e, accepted_tcb_statuses=["UpToDate", dcap.NO_MATCH]))
    s = BY_ID["tdx-trustee-6"]  # OutOfDate, accepted only when listed
    e = verify_sample(s)
    assert "OutOfDate" in str(refused(ap.check_tdx, e, pinned_policy(s, e)))
    ap.check_tdx(e, pinned_policy(s, e, accepted_tcb_statuses=["OutOfDate"]))
    with pytest.raises(ValueError, match="accepted_tcb_statuses"):
        ap.TdxPolicy.from_json({"accepted_tcb_statuses": ["Revoked"]}, "tdx.")


def test_missing_and_stale_collateral_are_policy_decisions_stated_in_the_refusal(samples):
    s = BY_ID["tdx-qvl"]
    e = verify_sample(s, collateral=None)
    assert e.dcap.collateral_state == "missing" and e.dcap.tcb is None
    r = refused(ap.check_tdx, e, pinned_policy(s, e))
    assert r.code == "collateral_missing" and "b0c06f000000" in str(r)
    ap.check_tdx(e, pinned_policy(s, e, allow_missing_collateral=True))
    late = verify_sample(s, at=T("2025-08-01T00:00:00Z"))  # past nextUpdate 2025-07-19
    r = refused(ap.check_tdx, late, pinned_policy(s, late))
    assert r.code == "collateral_stale" and "next update 2025-07-19" in str(r)
    ap.check_tdx(late, pinned_policy(s, late, allow_stale_collateral=True))
    early = refused(verify_sample, s, at=T("2025-06-19T10:10:00Z"))  # before the TCB Info's issue
    assert early.code == "bad_collateral" and "after the verification time" in str(early)


def test_certificates_are_checked_at_the_verification_time(samples):
    s = BY_ID["snp-aws-vlek"]
    r = refused(verify_sample, s, at=T("2026-01-01T00:00:00Z"))
    assert r.code == "cert_expired" and "SEV-VLEK" in str(r) and "2025-12-10" in str(r)
    s = BY_ID["tdx-v5-gtg"]  # its PCK certificate was issued 2026-01-27
    assert (
        refused(verify_sample, s, at=T("2025-06-01T00:00:00Z"), collateral=None).code
        == "cert_expired"
    )


def test_snp_structure_chain_and_product_checks(samples):
    s = BY_ID["snp-virtee-milan"]
    raw = _bytes(s.file)
    assert refused(verify_sample, s, raw[:-1]).code == "truncated"
    assert refused(verify_sample, s, raw + b"\0").code == "malformed"
    assert refused(verify_sample, s, b"\x01" + raw[1:]).code == "unsupported"
    assert refused(verify_sample, s, certs=[]).code == "collateral_missing"
    assert refused(verify_sample, s, product="Genoa").code == "product_mismatch"
    other = _certs("sev-snp/trustee-milan/test-vcek.der")  # another chip, same TCB
    assert refused(verify_sample, s, certs=list(other)).code == "bad_signature"
    verify_sample(s, certs=[*_certs(s.certs[0]), *_certs(GENOA)])  # unrelated certs are ignored
    vlek = BY_ID["snp-aws-vlek"]
    e = verify_sample(vlek)
    assert e.signing_key == "vlek" and not e.chip_id_checked and e.report.vmpl == 1
    pol = pinned_policy(vlek, e)
    assert (
        refused(ap.check_snp, e, replace(pol, allow_vlek=False)).code == "signing_key_not_allowed"
    )
    assert refused(ap.check_snp, e, replace(pol, max_vmpl=0)).code == "vmpl_not_allowed"
    assert refused(ap.check_snp, e, replace(pol, min_tcb={"snp": 25})).code == "tcb_too_low"
    assert refused(ap.check_snp, e, replace(pol, products=["Genoa"])).code == "product_not_allowed"
    g = verify_sample(BY_ID["snp-azure-genoa"])
    assert g.product == "Genoa" and g.report.guest_svn == 65547
    assert (
        refused(
            ap.check_snp, g, pinned_policy(BY_ID["snp-azure-genoa"], g, min_guest_svn=70000)
        ).code
        == "svn_too_low"
    )


def test_dcap_structure_checks(samples):
    s = BY_ID["tdx-spr-e4"]
    raw = _bytes(s.file)
    with pytest.raises(EvidenceRefused, match="39 bytes after"):
        dcap.parse_quote(raw)  # the key server wants the exact quote
    assert dcap.parse_quote(raw, allow_trailing=True).trailing == 39
    trimmed = _bytes("tdx/gtg-spr/tdx_prod_quote_SPR_E4.trimmed.dat")
    assert dcap.parse_quote(trimmed).trailing == 0
    assert refused(dcap.parse_quote, trimmed[:-1]).code == "truncated"
    assert refused(dcap.parse_quote, trimmed[:600]).code == "truncated"
    assert refused(dcap.parse_quote, b"\x06" + trimmed[1:]).code == "unsupported"
    assert (
        refused(tdx.verify_tdx_quote, _bytes("sgx/dcap-qvl/sgx_quote"), at=T(s.at)).code
        == "unsupported"
    )
    e = verify_sample(s)
    assert e.dcap.crls_checked == ("Intel SGX PCK Platform CA", "Intel SGX Root CA")
    assert e.dcap.pck.fmspc.hex() == "50806f000000" and e.dcap.pck.pce_svn == 11


def test_packaged_roots_are_the_vendor_roots(samples):
    """The pinned roots shipped as package data are byte-equal to the vendors' published
    roots in the samples (importlib.resources finds them in the installed package)."""
    a = Anchors.pinned()
    assert a.intel_root.public_bytes(Encoding.DER) == _certs("tdx/certs/intel-sgx-root-ca.pem")[
        0
    ].public_bytes(Encoding.DER)
    assert (
        a.intel_root.fingerprint(hashes.SHA256()).hex()
        == "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
    )
    assert a.amd_arks["Milan"] == _certs(MILAN)[1] and a.amd_arks["Genoa"] == _certs(GENOA)[1]
    for ark in a.amd_arks.values():
        assert ark.subject == ark.issuer and ark.subject.rfc4514_string().startswith("CN=ARK-")


# ------------------------------------------------------------------ the operator CLI


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    p = argparse.ArgumentParser()
    acli.add_commands(p.add_subparsers(dest="cmd"))
    args = p.parse_args(argv)
    rc = args.func(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_verify(samples, capsys, tmp_path):
    S = str(SAMPLES)
    rc, out, _ = _cli(["attest", "verify", f"{S}/sev-snp/virtee-milan/report_milan.hex", "--certs", f"{S}/sev-snp/virtee-milan", "--at", SNP_AT, "--json"], capsys)  # fmt: skip
    j = json.loads(out)
    assert (
        rc == 0 and j["verified"] and j["kind"] == "snp" and j["measurement"].startswith("7a1e5c26")
    )
    rc, out, _ = _cli(["attest", "verify", f"{S}/tdx/gtg-spr/tdx_prod_quote_SPR_E4.dat", "--collateral", f"{S}/tdx/gtg-spr", "--collateral", f"{S}/tdx/certs", "--at", "2025-06-20T12:00:00Z"], capsys)  # fmt: skip
    assert rc == 0 and "tcb_status: NoMatchingTcbLevel" in out and "collateral: stale" in out
    rc, _, err = _cli(["attest", "verify", f"{S}/sev-snp/gsg-milan/attestation.bin", "--kind", "snp", "--at", SNP_AT], capsys)  # fmt: skip
    assert rc == 2 and "refused (collateral_missing)" in err  # no VCEK given
    pol = tmp_path / "p.json"
    pol.write_text(
        json.dumps(
            {
                "measurements": [
                    "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01"
                ]
            }
        )
    )
    rc, out, _ = _cli(["attest", "verify", f"{S}/sev-snp/gsg-milan/attestation.bin", "--certs", f"{S}/sev-snp/gsg-milan/vcek.der", "--at", SNP_AT, "--policy", str(pol), "--json"], capsys)  # fmt: skip
    assert rc == 2 and json.loads(out)["error"] == "debug_forbidden"
    rc, out, _ = _cli(["attest", "verify", f"{S}/sgx/dcap-qvl/sgx_quote", "--collateral", f"{S}/sgx/dcap-qvl/sgx_quote_collateral.json", "--at", "2025-06-20T12:00:00Z", "--json"], capsys)  # fmt: skip
    j = json.loads(out)
    assert rc == 0 and j["kind"] == "sgx" and j["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    assert j["advisory_ids"] == ["INTEL-SA-00289", "INTEL-SA-00615"]
    bad = tmp_path / "q"
    bad.write_bytes(_flip(_bytes("tdx/dcap-qvl/tdx_quote"), 100))
    rc, _, err = _cli(["attest", "verify", str(bad), "--at", "2025-06-20T12:00:00Z"], capsys)
    assert rc == 2 and "refused (bad_signature)" in err


# ------------------------------------------------------------------ synthetic vendors: binding


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    ln = (
        bytes([n])
        if n < 0x80
        else bytes([0x80 | ((n.bit_length() + 7) // 8)])
        + n.to_bytes((n.bit_length() + 7) // 8, "big")
    )
    return bytes([tag]) + ln + body


def _oid(dotted: str) -> bytes:
    a = [int(x) for x in dotted.split(".")]
    out = bytearray([40 * a[0] + a[1]])
    for v in a[2:]:
        chunk = [v & 0x7F]
        while v > 0x7F:
            v >>= 7
            chunk.append(0x80 | (v & 0x7F))
        out += bytes(reversed(chunk))
    return _der(0x06, bytes(out))


def _int(v: int) -> bytes:
    return _der(0x02, v.to_bytes(max(1, (v.bit_length() + 8) // 8), "big"))


def _sgx_extension(fmspc: bytes, comps: list[int], pcesvn: int) -> bytes:
    b = dcap.OID_SGX_EXTENSIONS
    seq = lambda *xs: _der(0x30, b"".join(xs))
    tcb = [seq(_oid(f"{b}.2.{i + 1}"), _int(c)) for i, c in enumerate(comps)]
    tcb += [seq(_oid(f"{b}.2.17"), _int(pcesvn)), seq(_oid(f"{b}.2.18"), _der(0x04, bytes(comps)))]
    return seq(
        seq(_oid(f"{b}.1"), _der(0x04, bytes(16))),
        seq(_oid(f"{b}.2"), seq(*tcb)),
        seq(_oid(f"{b}.3"), _der(0x04, b"\0\0")),
        seq(_oid(f"{b}.4"), _der(0x04, fmspc)),
        seq(_oid(f"{b}.5"), _der(0x0A, b"\0")),
    )


NOW = datetime(2026, 6, 1, tzinfo=UTC)


def _cert(subject: str, pub, issuer: str, key, *, ca: bool, ext=(), pss=False) -> x509.Certificate:
    name = lambda s: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, s)])
    b = (
        x509.CertificateBuilder()
        .subject_name(name(subject))
        .issuer_name(name(issuer))
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=30))
        .not_valid_after(NOW + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    for oid, val in ext:
        b = b.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), val), critical=False
        )
    if pss:
        pad = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
        return b.sign(key, hashes.SHA384(), rsa_padding=pad)
    return b.sign(key, hashes.SHA256())


@dataclass(frozen=True)
class Vendor:
    """Throw-away Intel- and AMD-shaped PKIs: roots, intermediates, a PCK and a VCEK."""

    intel_root: x509.Certificate
    pck_key: ec.EllipticCurvePrivateKey
    pck_ca_key: ec.EllipticCurvePrivateKey
    pck_chain: list[x509.Certificate]  # PCK, PCK CA, root
    tcb_key: ec.EllipticCurvePrivateKey
    tcb_cert: x509.Certificate
    ark: x509.Certificate
    amd_chain: list[x509.Certificate]  # VCEK, ASK, ARK
    vcek_key: ec.EllipticCurvePrivateKey
    chip_id: bytes = b"\x5a" * 64

    def anchors(self) -> Anchors:
        return Anchors(self.intel_root, {"Milan": self.ark})


FMSPC = bytes.fromhex("00906ed50000")
COMPS = [3] * 16


@pytest.fixture(scope="module")
def vendor() -> Vendor:
    p256 = lambda: ec.generate_private_key(ec.SECP256R1())
    rk, ik, pck_key, tcb_key = p256(), p256(), p256(), p256()
    root = _cert("Test SGX Root CA", rk.public_key(), "Test SGX Root CA", rk, ca=True)
    inter = _cert("Test SGX PCK Platform CA", ik.public_key(), "Test SGX Root CA", rk, ca=True)
    sgx_ext = [(dcap.OID_SGX_EXTENSIONS, _sgx_extension(FMSPC, COMPS, 11))]
    pck = _cert("Intel SGX PCK Certificate", pck_key.public_key(), "Test SGX PCK Platform CA", ik, ca=False, ext=sgx_ext)  # fmt: skip
    tcb_cert = _cert(dcap.TCB_SIGNING_CN, tcb_key.public_key(), "Test SGX Root CA", rk, ca=False)
    ark_k, ask_k = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2)
    )
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    ark = _cert("ARK-Milan", ark_k.public_key(), "ARK-Milan", ark_k, ca=True, pss=True)
    ask = _cert("SEV-Milan", ask_k.public_key(), "ARK-Milan", ark_k, ca=True, pss=True)
    chip_id = b"\x5a" * 64
    tcb_ext = [(snp.OID_BL_SPL, _int(3)), (snp.OID_TEE_SPL, _int(0)), (snp.OID_SNP_SPL, _int(8)), (snp.OID_UCODE_SPL, _int(115)), (snp.OID_HWID, chip_id)]  # fmt: skip
    vcek = _cert("SEV-VCEK", vcek_key.public_key(), "SEV-Milan", ask_k, ca=False, ext=tcb_ext, pss=True)  # fmt: skip
    return Vendor(root, pck_key, ik, [pck, inter, root], tcb_key, tcb_cert, ark, [vcek, ask, ark], vcek_key, chip_id)  # fmt: skip


def _sign_raw(key, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _enclave_report(
    mrenclave: bytes, mrsigner: bytes, report_data: bytes, *, debug=False, svn=3, prod=7
) -> bytes:
    b = bytearray(384)
    b[48] = 0x04 | (0x02 if debug else 0)
    b[64:96], b[128:160] = mrenclave, mrsigner
    struct.pack_into("<HH", b, 256, prod, svn)
    b[320:384] = report_data
    return bytes(b)


QE_MRSIGNER = b"\x44" * 32


def synthetic_quote(v: Vendor, body: bytes, *, tdx_quote=False, pck_key=None) -> bytes:
    """A v3 SGX or v4 TDX quote signed by a throw-away attestation key, its QE report
    signed by the vendor's PCK key (or `pck_key`), the PCK chain embedded as type 5."""
    att = ec.generate_private_key(ec.SECP256R1())
    n = att.public_key().public_numbers()
    att_pub = n.x.to_bytes(32, "big") + n.y.to_bytes(32, "big")
    header = struct.pack("<HHIHH", 4 if tdx_quote else 3, 2, 0x81 if tdx_quote else 0, 1, 1)
    header += dcap.INTEL_QE_VENDOR_ID + bytes(20)
    auth = os.urandom(32)
    qe = _enclave_report(b"\x33" * 32, QE_MRSIGNER, hashlib.sha256(att_pub + auth).digest() + bytes(32), svn=8, prod=1 if not tdx_quote else 2)  # fmt: skip
    cert = _pem(v.pck_chain)
    inner = qe + _sign_raw(pck_key or v.pck_key, qe) + struct.pack("<H", len(auth)) + auth + struct.pack("<HI", 5, len(cert)) + cert  # fmt: skip
    if tdx_quote:
        inner = struct.pack("<HI", 6, len(inner)) + inner
    sig = _sign_raw(att, header + body) + att_pub + inner
    return header + body + struct.pack("<I", len(sig)) + sig


def _signed_json(v: Vendor, key: str, body: dict) -> dcap.Collateral:
    raw = json.dumps(body, separators=(",", ":"))
    doc = f'{{"{key}":{raw},"signature":"{_sign_raw(v.tcb_key, raw.encode()).hex()}"}}'
    c = dcap.parse_collateral(doc.encode(), f"synthetic {key}")
    c.certs.append(v.tcb_cert)
    return c


def synthetic_collateral(v: Vendor, tee: str, status: str = "UpToDate") -> dcap.Collateral:
    dates = {"issueDate": (NOW - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ"), "nextUpdate": (NOW + timedelta(days=29)).strftime("%Y-%m-%dT%H:%M:%SZ")}  # fmt: skip
    level = {"sgxtcbcomponents": [{"svn": 2}] * 16, "pcesvn": 10}
    if tee == "TDX":
        level["tdxtcbcomponents"] = [{"svn": 1}, {"svn": 0}] + [{"svn": 1}] * 14
    tcb = {"id": tee, "version": 3, **dates, "fmspc": FMSPC.hex(), "pceId": "0000", "tcbType": 0, "tcbEvaluationDataNumber": 1, "tcbLevels": [{"tcb": level, "tcbDate": "2026-01-01T00:00:00Z", "tcbStatus": status}]}  # fmt: skip
    if tee == "TDX":
        tcb["tdxModule"] = {
            "mrsigner": "00" * 48,
            "attributes": "00" * 8,
            "attributesMask": "ff" * 8,
        }
    qe = {"id": "TD_QE" if tee == "TDX" else "QE", "version": 2, **dates, "tcbEvaluationDataNumber": 1, "miscselect": "00000000", "miscselectMask": "FFFFFFFF", "attributes": "04" + "00" * 15, "attributesMask": "FB" + "FF" * 7 + "00" * 8, "mrsigner": QE_MRSIGNER.hex(), "isvprodid": 2 if tee == "TDX" else 1, "tcbLevels": [{"tcb": {"isvsvn": 8}, "tcbDate": "2026-01-01T00:00:00Z", "tcbStatus": "UpToDate"}]}  # fmt: skip
    c = _signed_json(v, "tcbInfo", tcb)
    c.add(_signed_json(v, "enclaveIdentity", qe))
    return c


def _td_body(report_data: bytes, *, mrtd=b"\x61" * 48, debug=False) -> bytes:
    b = bytearray(584)
    b[0:16] = bytes([2, 0] + [1] * 14)  # TEE_TCB_SVN: TDX 1.0 module (byte 1 = 0)
    b[120] = 1 if debug else 0
    b[136:184] = mrtd
    b[328:376] = b"\x70" * 48  # RTMR0
    b[520:584] = report_data
    return bytes(b)


def synthetic_snp(
    v: Vendor, report_data: bytes, *, policy=0x30000, measurement=b"\x5e" * 48, table=True
) -> bytes:
    r = bytearray(snp.REPORT_SIZE)
    struct.pack_into("<IIQ", r, 0, 2, 1, policy)
    struct.pack_into("<I", r, snp.OFF_SIGNATURE_ALGO, 1)
    r[snp.OFF_REPORT_DATA : snp.OFF_REPORT_DATA + 64] = report_data
    r[snp.OFF_MEASUREMENT : snp.OFF_MEASUREMENT + 48] = measurement
    r[snp.OFF_REPORTED_TCB : snp.OFF_REPORTED_TCB + 8] = bytes([3, 0, 0, 0, 0, 0, 8, 115])
    r[snp.OFF_CHIP_ID : snp.OFF_CHIP_ID + 64] = v.chip_id
    rr, ss = decode_dss_signature(
        v.vcek_key.sign(bytes(r[: snp.SIGNED_SIZE]), ec.ECDSA(hashes.SHA384()))
    )
    r[snp.OFF_SIGNATURE_R : snp.OFF_SIGNATURE_R + 72] = rr.to_bytes(72, "little")
    r[snp.OFF_SIGNATURE_S : snp.OFF_SIGNATURE_S + 72] = ss.to_bytes(72, "little")
    if not table:
        return bytes(r)
    ders = [c.public_bytes(Encoding.DER) for c in v.amd_chain]
    guids = (snp.GUID_VCEK, snp.GUID_ASK, snp.GUID_ARK)
    off = snp.CERT_TABLE_ENTRY * (len(ders) + 1)
    head, blobs = b"", b""
    for g, d in zip(guids, ders, strict=True):
        head += g.bytes + struct.pack("<II", off + len(blobs), len(d))
        blobs += d
    return bytes(r) + head + bytes(snp.CERT_TABLE_ENTRY) + blobs


class Ctx:
    def __init__(self, v: Vendor, kind: str) -> None:
        self.v, self.kind = v, kind
        self.nonce, self.pub, self.binsha = os.urandom(32), os.urandom(32), os.urandom(32)
        self.rd = expected_report_data(evidence_hash(self.nonce, self.pub, self.binsha))

    def claim(self, report: bytes, nonce: bytes | None = None) -> ev.Claim:
        return ev.Claim(nonce or self.nonce, self.pub, self.binsha, "aa" * 32, self.kind, report)

    def verify(
        self, report: bytes, policy: ev.Policy, collateral=None, nonce=None, at=NOW
    ) -> ev.Verified:
        return ev.verify(self.claim(report, nonce), policy, registered_manifest="aa" * 32, collateral=collateral, at=at, anchors=self.v.anchors())  # fmt: skip

    def code(self, *a, **kw) -> str:
        return refused(self.verify, *a, **kw).code


def test_keyserver_sgx_quote_binding_and_policy(vendor):
    """Replaces the synthetic-quote test that trusted an injected PCK key: the same
    cases through the real verifier (PCK chain to a pinned root, collateral)."""
    c = Ctx(vendor, ev.KIND_SGX)
    quote = synthetic_quote(vendor, _enclave_report(b"\x11" * 32, b"\x22" * 32, c.rd))
    q = dcap.parse_quote(quote)
    assert (q.version, q.att_key_type, q.tee_type, q.cert_type) == (3, 2, 0, 5)
    body = dcap.EnclaveReport.parse(q.body)
    assert body.mr_enclave == b"\x11" * 32 and body.isv_svn == 3 and not body.debug
    coll = synthetic_collateral(vendor, "SGX")
    pol = ev.Policy.from_json({"sgx": {"mrenclaves": ["11" * 32]}})
    v = c.verify(quote, pol, coll)
    assert (
        v.hardware
        and v.kind == ev.KIND_SGX
        and v.mrenclave == "11" * 32
        and v.tcb_status == "UpToDate"
    )
    assert c.code(quote, pol) == "collateral_missing"  # no TCB Info / QE Identity configured
    assert (
        c.verify(quote, pol.merged({"sgx": {"allow_missing_collateral": True}})).tcb_status is None
    )
    assert (
        c.code(quote, ev.Policy.from_json({"mrenclaves": ["55" * 32]}), coll)
        == "measurement_not_allowed"
    )
    assert (
        c.code(quote, ev.Policy.from_json({"mrsigners": ["22" * 32], "min_isv_svn": 4}), coll)
        == "svn_too_low"
    )
    assert (
        c.code(quote, ev.Policy.from_json({"mrsigners": ["22" * 32], "isv_prod_id": 8}), coll)
        == "product_not_allowed"
    )
    assert (
        c.verify(
            quote, ev.Policy.from_json({"mrsigners": ["22" * 32], "isv_prod_id": 7}), coll
        ).mrsigner
        == "22" * 32
    )
    assert c.code(quote, pol, coll, nonce=os.urandom(32)) == "binding"  # another nonce
    half = synthetic_quote(
        vendor, _enclave_report(b"\x11" * 32, b"\x22" * 32, c.rd[:32] + b"\x01" * 32)
    )
    assert c.code(half, pol, coll) == "binding"  # REPORT_DATA's second half must be zero
    wrong_pck = synthetic_quote(
        vendor, body=q.body, pck_key=ec.generate_private_key(ec.SECP256R1())
    )
    assert c.code(wrong_pck, pol, coll) == "bad_qe_report"  # QE report not signed by the PCK
    assert c.code(_flip(quote, 48 + 100), pol, coll) == "bad_signature"  # a reserved body byte
    dbg = synthetic_quote(vendor, _enclave_report(b"\x11" * 32, b"\x22" * 32, c.rd, debug=True))
    assert c.code(dbg, pol, coll) == "debug_forbidden"
    assert c.verify(dbg, pol.merged({"sgx": {"allow_debug": True}}), coll).hardware
    assert (
        c.code(quote, pol, synthetic_collateral(vendor, "SGX", "OutOfDate")) == "tcb_not_accepted"
    )
    assert c.code(quote, pol, coll, at=NOW + timedelta(days=40)) == "collateral_stale"
    assert c.code(quote, pol, coll, at=NOW + timedelta(days=400)) == "cert_expired"
    for bad, code in (
        (quote[:-1], "truncated"),
        (quote + b"\0", "malformed"),
        (quote[:100], "truncated"),
    ):
        assert c.code(bad, pol, coll) == code
    assert c.code(b"\x04" + quote[1:], pol, coll) in ("unsupported", "truncated", "malformed")
    # A collateral source can be a function of the FMSPC (a PCCS cache).
    seen = []
    assert c.verify(quote, pol, lambda f: seen.append(f) or coll).hardware and seen == [FMSPC.hex()]
    # Without the test anchors the chain does not reach Intel's pinned root.
    r = refused(
        ev.verify, c.claim(quote), pol, registered_manifest="aa" * 32, collateral=coll, at=NOW
    )
    assert r.code == "untrusted_root"


def test_keyserver_sgx_revocation_through_a_crl(vendor):
    c = Ctx(vendor, ev.KIND_SGX)
    quote = synthetic_quote(vendor, _enclave_report(b"\x11" * 32, b"\x22" * 32, c.rd))
    pck, inter, _ = vendor.pck_chain
    pol = ev.Policy.from_json({"sgx": {"mrenclaves": ["11" * 32]}})

    def with_crl(key, serial: int, next_update=NOW + timedelta(days=1)) -> dcap.Collateral:
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(NOW - timedelta(days=1))
        )
        crl = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(inter.subject)
            .last_update(NOW - timedelta(days=1))
            .next_update(next_update)
            .add_revoked_certificate(entry.build())
            .sign(key, hashes.SHA256())
        )
        coll = synthetic_collateral(vendor, "SGX")
        coll.crls.append(crl)
        return coll

    assert c.code(quote, pol, with_crl(vendor.pck_ca_key, pck.serial_number)) == "cert_revoked"
    fake = ec.generate_private_key(ec.SECP256R1())  # same issuer name, another key
    assert c.code(quote, pol, with_crl(fake, pck.serial_number)) == "bad_collateral"
    assert c.verify(quote, pol, with_crl(vendor.pck_ca_key, pck.serial_number + 1)).hardware
    stale = with_crl(vendor.pck_ca_key, 1, next_update=NOW - timedelta(hours=1))
    assert c.code(quote, pol, stale) == "collateral_stale"
    assert c.verify(quote, pol.merged({"sgx": {"allow_stale_collateral": True}}), stale).hardware


def test_keyserver_tdx_quote_binding_and_policy(vendor):
    c = Ctx(vendor, ev.KIND_TDX)
    quote = synthetic_quote(vendor, _td_body(c.rd), tdx_quote=True)
    coll = synthetic_collateral(vendor, "TDX")
    mrtd = "61" * 48
    pol = ev.Policy.from_json({"tdx": {"mrtds": [mrtd], "rtmrs": {"0": "70" * 48}}})
    v = c.verify(quote, pol, coll)
    assert v.hardware and v.measurements["mrtd"] == mrtd and v.tcb_status == "UpToDate"
    assert c.code(quote, ev.Policy(), coll) == "measurement_not_allowed"  # TDX off by default
    assert (
        c.code(quote, pol.merged({"tdx": {"rtmrs": {"1": "70" * 48}}}), coll)
        == "measurement_not_allowed"
    )
    assert c.code(quote, pol, coll, nonce=os.urandom(32)) == "binding"
    dbg = synthetic_quote(vendor, _td_body(c.rd, debug=True), tdx_quote=True)
    assert c.code(dbg, pol, coll) == "debug_forbidden"
    assert c.code(quote, pol) == "collateral_missing"
    assert c.code(_flip(quote, 48 + 136), pol, coll) == "bad_signature"
    assert (
        c.code(quote, pol, synthetic_collateral(vendor, "SGX")) == "collateral_missing"
    )  # SGX TCB Info
    assert ev.Policy.from_json(pol.to_json()) == pol  # stored and read back


def test_keyserver_snp_report_binding_and_policy(vendor):
    c = Ctx(vendor, ev.KIND_SNP)
    report = synthetic_snp(vendor, c.rd)
    meas = "5e" * 48
    pol = ev.Policy.from_json({"snp": {"measurements": [meas]}})
    v = c.verify(report, pol)
    assert v.hardware and v.measurements["measurement"] == meas and "snp 8" in v.tcb_status
    assert c.code(report, ev.Policy()) == "measurement_not_allowed"
    assert c.code(report, pol, nonce=os.urandom(32)) == "binding"
    assert (
        c.code(synthetic_snp(vendor, c.rd, policy=0x30000 | snp.POLICY_DEBUG), pol)
        == "debug_forbidden"
    )
    assert c.code(synthetic_snp(vendor, c.rd, table=False), pol) == "collateral_missing"  # no VCEK
    assert c.code(_flip(report, snp.OFF_MEASUREMENT), pol) == "bad_signature"
    assert c.code(report[: snp.REPORT_SIZE + 10], pol) == "truncated"  # a cut certificate table
    assert c.code(report, pol.merged({"snp": {"min_tcb": {"microcode": 116}}})) == "tcb_too_low"


def test_snp_vcek_extensions_must_match_the_report(vendor):
    c = Ctx(vendor, ev.KIND_SNP)
    raw = synthetic_snp(vendor, c.rd, table=False)
    vcek, ask, _ = vendor.amd_chain
    e = snp.verify_snp(raw, [vcek, ask], at=NOW, anchors=vendor.anchors())
    assert e.chip_id_checked and e.report.reported_tcb.microcode == 115
    other = replace(vendor, chip_id=b"\x11" * 64)
    assert refused(snp.verify_snp, synthetic_snp(other, c.rd, table=False), [vcek, ask], at=NOW, anchors=vendor.anchors()).code == "chip_id_mismatch"  # fmt: skip
    r = bytearray(raw)  # another TCB in the report, re-signed by the same VCEK
    r[snp.OFF_REPORTED_TCB + 7] = 116
    rr, ss = decode_dss_signature(
        vendor.vcek_key.sign(bytes(r[: snp.SIGNED_SIZE]), ec.ECDSA(hashes.SHA384()))
    )
    r[snp.OFF_SIGNATURE_R : snp.OFF_SIGNATURE_R + 72] = rr.to_bytes(72, "little")
    r[snp.OFF_SIGNATURE_S : snp.OFF_SIGNATURE_S + 72] = ss.to_bytes(72, "little")
    assert (
        refused(snp.verify_snp, bytes(r), [vcek, ask], at=NOW, anchors=vendor.anchors()).code
        == "tcb_mismatch"
    )


def test_policy_json_sections_and_legacy_fields():
    p = ev.Policy.from_json(
        {"mrenclaves": ["AB" * 32], "allow_debug": True, "tdx": {"mrtds": ["cd" * 48]}}
    )
    assert p.sgx.mrenclaves == ["ab" * 32] and p.sgx.allow_debug and p.tdx.mrtds == ["cd" * 48]
    j = p.to_json()
    assert "mrenclaves" not in j and j["sgx"]["mrenclaves"] == ["ab" * 32]
    assert ev.Policy.from_json(j) == p
    q = p.merged(
        {"mrsigners": ["ef" * 32], "tdx": {"allow_debug": True}}
    )  # the keys CLI's flat options
    assert q.sgx.mrsigners == ["ef" * 32] and q.sgx.mrenclaves == ["ab" * 32]
    assert q.tdx.allow_debug and q.tdx.mrtds == ["cd" * 48]
    d = ev.Policy()
    assert not d.sgx.allow_debug and not d.tdx.allow_debug and not d.snp.allow_debug
    assert d.tdx.accepted_tcb_statuses == ["UpToDate"] and not d.tdx.allow_stale_collateral
    for bad in ({"tdx": {"mrtds": ["xx"]}}, {"snp": {"min_tcb": {"fmc": 1}}}, {"tdx": {"rtmrs": {"4": "00" * 48}}}, {"snp": {"nope": 1}}, {"sgx": []}):  # fmt: skip
        with pytest.raises(ValueError):
            ev.Policy.from_json(bad)


def test_software_evidence_still_binds_nonce_key_and_binary():
    nonce, pub, binsha = os.urandom(32), os.urandom(32), os.urandom(32)
    h = evidence_hash(nonce, pub, binsha)
    assert h == hashlib.sha256(b"ennclave evidence v1\x00" + nonce + pub + binsha).digest()
    vector = evidence_hash(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32)  # docs/attestation.md
    assert expected_report_data(vector).hex() == (
        "cd403dc929776b0ff178eb55aa63f15462a329ccb6203e7fed8c353bf9941e0c" + "00" * 32
    )
    # v2 (protocol 3): the protections are hashed in; the same vector as handshake.rs.
    prot = b'{"seccomp":true}'
    assert (
        evidence_hash(nonce, pub, binsha, prot)
        == hashlib.sha256(
            b"ennclave evidence v2\x00" + nonce + pub + binsha + hashlib.sha256(prot).digest()
        ).digest()
    )
    assert evidence_hash(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, b"{}").hex() == (
        "986fc2c37b97e2c57ea8f218b423012490f09a0506d731882795e03976ebbb8f"
    )
    claim = ev.Claim(nonce, pub, binsha, "aa" * 32, ev.KIND_SOFTWARE, h)
    assert not ev.verify(claim, ev.Policy(allow_software=True), registered_manifest=None).hardware
    bad = replace(claim, report=os.urandom(32))
    assert (
        refused(ev.verify, bad, ev.Policy(allow_software=True), registered_manifest=None).code
        == "evidence_invalid"
    )
    assert (
        refused(ev.verify, replace(claim, kind="tpm"), ev.Policy(), registered_manifest=None).code
        == "unknown_kind"
    )


def test_ennclave_attest_verify_command(samples, tmp_path):
    """The operator's command as installed: fields and exit 0, one sentence and exit 2."""
    import subprocess
    import sys

    report = samples / "sev-snp/gsg-milan/attestation.bin"
    vcek = samples / "sev-snp/gsg-milan/vcek.der"
    cmd = [sys.executable, "-m", "ennclave", "attest", "verify"]
    ok = subprocess.run(
        [*cmd, str(report), "--certs", str(vcek), "--at", SNP_AT, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert '"kind": "snp"' in ok.stdout and "b07af962" in ok.stdout
    forged = tmp_path / "forged.bin"
    forged.write_bytes(_flip(report.read_bytes(), 0x90))  # inside MEASUREMENT
    bad = subprocess.run(
        [*cmd, str(forged), "--certs", str(vcek), "--at", SNP_AT],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    lines = [ln for ln in (bad.stdout + bad.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "signature" in lines[0], lines


def test_the_audit_row_of_a_hardware_release_records_what_was_accepted():
    """Issue #16: the audit log keeps kind, measurements and TCB status of each release."""
    from types import SimpleNamespace

    from ennclave.keyserver.routes.release import ReleaseLog

    log = ReleaseLog(None, None, {"key_id": "k", "client_id": "c", "peer": "127.0.0.1"})  # type: ignore[arg-type]
    lic = SimpleNamespace(expires_at=123, licence_id="L1")
    hw = ev.Verified(
        "tdx-dcap", True, "ab" * 32, {"mrtd": "61" * 48, "rtmr0": "70" * 48}, "UpToDate"
    )
    row = log.grant(hw, lic)  # type: ignore[arg-type]
    assert row["decision"] == "granted" and row["reason"] == "hardware"
    accepted = json.loads(row["detail"].split("; accepted ", 1)[1])
    assert accepted == {
        "kind": "tdx-dcap",
        "measurements": {"mrtd": "61" * 48, "rtmr0": "70" * 48},
        "tcb_status": "UpToDate",
    }
    soft = log.grant(ev.Verified("none", False, "ab" * 32), lic)  # type: ignore[arg-type]
    assert soft["reason"] == "software" and "accepted" not in soft["detail"]
