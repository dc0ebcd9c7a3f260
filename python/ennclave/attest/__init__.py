"""Evidence verifiers: software, AMD SEV-SNP, Intel TDX and SGX (DCAP).

One module per kind (`software`, `snp`, `tdx`, `sgx`; `dcap` holds what TDX and SGX
share), each checking authenticity at an explicit verification time and returning the
verified fields; `binding` checks that REPORT_DATA binds the key server's nonce and the
worker's key; `policy` says what an owner accepts. Every refusal is an
`EvidenceRefused(code, reason)`. All signature and certificate checks are done by
`cryptography`; the vendor roots are pinned package data (`roots/`).

Verified against real vendor-signed samples only: nothing here has run on SEV-SNP, TDX
or SGX hardware (docs/attestation.md).
"""

from .errors import EvidenceRefused

__all__ = ["EvidenceRefused"]
