"""Intel SGX DCAP quotes (v3): the enclave report body and its verified fields.

The body is the 384-byte SGX REPORT (`dcap.EnclaveReport`: MRENCLAVE at 64, MRSIGNER at
128, ISVPRODID/ISVSVN at 256/258, REPORTDATA at 320; ATTRIBUTES.FLAGS bit 1 = DEBUG).
Everything below the body — PCK chain, QE report, signatures, collateral — is
`dcap.verify_quote`. Acceptance is `policy.check_sgx`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509

from . import dcap
from .certs import Anchors
from .errors import EvidenceRefused


@dataclass(frozen=True)
class SgxEvidence(dcap.QuoteEvidence):
    body: dcap.EnclaveReport
    dcap: dcap.DcapResult

    kind = "sgx"

    def measurements(self) -> dict[str, str]:
        return {"mrenclave": self.body.mr_enclave.hex(), "mrsigner": self.body.mr_signer.hex()}

    def to_json(self) -> dict[str, Any]:
        b = self.body
        return {
            "kind": "sgx",
            "quote_version": self.dcap.quote.version,
            **self.measurements(),
            "isv_prod_id": b.isv_prod_id,
            "isv_svn": b.isv_svn,
            "attributes": b.attributes.hex(),
            "debug": b.debug,
            "misc_select": f"{b.misc_select:08x}",
            "cpu_svn": b.cpu_svn.hex(),
            "config_id": b.config_id.hex(),
            "config_svn": b.config_svn,
            "isv_family_id": b.isv_family_id.hex(),
            "report_data": b.report_data.hex(),
            "qe_mrenclave": self.dcap.quote.qe_report.mr_enclave.hex(),
            "qe_isv_svn": self.dcap.quote.qe_report.isv_svn,
            **self.dcap.to_json(),
        }


def verify_sgx_quote(
    data: bytes,
    *,
    at: datetime,
    certs: Sequence[x509.Certificate] | None = None,
    collateral: dcap.CollateralSource | None = None,
    anchors: Anchors | None = None,
    allow_trailing: bool = False,
    versions: tuple[int, ...] = (3, 4, 5),
) -> SgxEvidence:
    """Verify an SGX quote at time `at`; see `dcap.verify_quote`. Raises `EvidenceRefused`."""
    q = dcap.parse_quote(data, allow_trailing=allow_trailing)
    if q.tee_type != dcap.TEE_SGX:
        raise EvidenceRefused("unsupported", "This is a TDX quote, not an SGX quote.")
    if q.version not in versions:
        raise EvidenceRefused("unsupported", f"SGX quote version {q.version} is not accepted here.")
    res = dcap.verify_quote(q, at=at, certs=certs, collateral=collateral, anchors=anchors)
    return SgxEvidence(dcap.EnclaveReport.parse(q.body), res)
