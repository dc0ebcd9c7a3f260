"""Intel TDX quotes (v4 and v5): the TD report body and its verified fields.

TD report body ("Intel TDX DCAP Quoting Library API", appendix A.3; TDX 1.5 adds the
last two fields):

```
  0 TEE_TCB_SVN 16 ·  16 MRSEAM 48 ·  64 MRSIGNERSEAM 48 · 112 SEAMATTRIBUTES 8 ·
120 TDATTRIBUTES 8 · 128 XFAM 8 · 136 MRTD 48 · 184 MRCONFIGID 48 · 232 MROWNER 48 ·
280 MROWNERCONFIG 48 · 328 RTMR0 · 376 RTMR1 · 424 RTMR2 · 472 RTMR3 (48 each) ·
520 REPORTDATA 64  (584 B)  · TDX 1.5: 584 TEE_TCB_SVN2 16 · 600 MRSERVICETD 48 (648 B)
```

TDATTRIBUTES bit 0 is DEBUG (the TD's memory is readable by the host). Everything below
the body is `dcap.verify_quote`; the TEE TCB SVN and MRSIGNERSEAM/SEAMATTRIBUTES feed
its TCB evaluation. Acceptance is `policy.check_tdx`.
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

TD_ATTR_DEBUG = 0x01  # TDATTRIBUTES byte 0 bit 0 (TUD.DEBUG)


@dataclass(frozen=True)
class TdReport:
    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None  # TDX 1.5
    mr_service_td: bytes | None  # TDX 1.5

    @property
    def debug(self) -> bool:
        return bool(self.td_attributes[0] & TD_ATTR_DEBUG)

    @classmethod
    def parse(cls, b: bytes) -> TdReport:
        if len(b) not in (dcap.TD10_REPORT_SIZE, dcap.TD15_REPORT_SIZE):
            raise EvidenceRefused("malformed", "A TD report body is 584 or 648 bytes.")
        mr = lambda o: b[o : o + 48]
        v15 = len(b) == dcap.TD15_REPORT_SIZE
        return cls(
            tee_tcb_svn=b[0:16],
            mr_seam=mr(16),
            mr_signer_seam=mr(64),
            seam_attributes=b[112:120],
            td_attributes=b[120:128],
            xfam=b[128:136],
            mr_td=mr(136),
            mr_config_id=mr(184),
            mr_owner=mr(232),
            mr_owner_config=mr(280),
            rtmrs=(mr(328), mr(376), mr(424), mr(472)),
            report_data=b[520:584],
            tee_tcb_svn2=b[584:600] if v15 else None,
            mr_service_td=mr(600) if v15 else None,
        )


@dataclass(frozen=True)
class TdxEvidence(dcap.QuoteEvidence):
    body: TdReport
    dcap: dcap.DcapResult

    kind = "tdx"

    def measurements(self) -> dict[str, str]:
        b = self.body
        return {
            "mrtd": b.mr_td.hex(),
            **{f"rtmr{i}": r.hex() for i, r in enumerate(b.rtmrs)},
            "mrconfigid": b.mr_config_id.hex(),
            "mrseam": b.mr_seam.hex(),
        }

    def to_json(self) -> dict[str, Any]:
        b = self.body
        return {
            "kind": "tdx",
            "quote_version": self.dcap.quote.version,
            **self.measurements(),
            "mrowner": b.mr_owner.hex(),
            "mrownerconfig": b.mr_owner_config.hex(),
            "mrsignerseam": b.mr_signer_seam.hex(),
            "td_attributes": b.td_attributes.hex(),
            "debug": b.debug,
            "xfam": b.xfam.hex(),
            "tee_tcb_svn": b.tee_tcb_svn.hex(),
            "tee_tcb_svn2": None if b.tee_tcb_svn2 is None else b.tee_tcb_svn2.hex(),
            "mrservicetd": None if b.mr_service_td is None else b.mr_service_td.hex(),
            "report_data": b.report_data.hex(),
            "qe_mrenclave": self.dcap.quote.qe_report.mr_enclave.hex(),
            "qe_isv_svn": self.dcap.quote.qe_report.isv_svn,
            **self.dcap.to_json(),
        }


def verify_tdx_quote(
    data: bytes,
    *,
    at: datetime,
    certs: Sequence[x509.Certificate] | None = None,
    collateral: dcap.CollateralSource | None = None,
    anchors: Anchors | None = None,
    allow_trailing: bool = False,
) -> TdxEvidence:
    """Verify a TDX quote at time `at`; see `dcap.verify_quote`. Raises `EvidenceRefused`."""
    q = dcap.parse_quote(data, allow_trailing=allow_trailing)
    if q.tee_type != dcap.TEE_TDX:
        raise EvidenceRefused("unsupported", "This is an SGX quote, not a TDX quote.")
    body = TdReport.parse(q.body)
    tcb_in = dcap.TdxTcbInput(body.tee_tcb_svn, body.mr_signer_seam, body.seam_attributes)
    res = dcap.verify_quote(
        q, at=at, certs=certs, collateral=collateral, anchors=anchors, tdx=tcb_in
    )
    return TdxEvidence(body, res)
