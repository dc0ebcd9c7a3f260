"""Owner-side sealing of the enclave program (docs/bundle.md).

AES-256-GCM under a fresh data key per bundle; the manifest (minus its `integrity`
section) is the associated data, so editing the output policy, the cut or a shape in
manifest.json makes unsealing fail inside the enclave. The host never decrypts.
"""

from __future__ import annotations

import json
import os
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SEAL_MAGIC = b"ENCSEAL1"
NONCE_BYTES = 12
KEY_BYTES = 32


def _reject_floats(value: Any, path: str = "manifest") -> None:
    if isinstance(value, float):
        raise ValueError(f"{path} is a float; the authenticated manifest may not hold floats.")
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        # The enclave (serde_json) would read such an integer as a float and refuse it.
        raise ValueError(
            f"{path} does not fit in 64 bits; the authenticated manifest may not hold it."
        )
    if isinstance(value, dict) and not all(isinstance(k, str) for k in value):
        raise ValueError(f"{path} has a non-string key; JSON object keys must be strings.")
    if isinstance(value, dict):
        for k, v in value.items():
            _reject_floats(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _reject_floats(v, f"{path}[{i}]")


def canonical_manifest(manifest: dict[str, Any]) -> bytes:
    """The associated data: canonical JSON of the manifest without `integrity`."""
    authenticated = {k: v for k, v in manifest.items() if k != "integrity"}
    _reject_floats(authenticated)
    return json.dumps(
        authenticated, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def seal_container(container: bytes, manifest: dict[str, Any], key: bytes) -> bytes:
    """ENCSEAL1 ‖ nonce ‖ AES-256-GCM(container, aad = canonical manifest)."""
    if len(key) != KEY_BYTES:
        raise ValueError("data key must be 32 bytes")
    nonce = os.urandom(NONCE_BYTES)
    return SEAL_MAGIC + nonce + AESGCM(key).encrypt(nonce, container, canonical_manifest(manifest))
