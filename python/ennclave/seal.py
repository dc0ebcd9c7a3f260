"""The sealed container, both directions, and HPKE wrapping of its data key.

Sealed file (docs/bundle.md): ``ENCSEAL1`` ‖ 12-byte nonce ‖ AES-256-GCM(container,
aad = canonical manifest). The manifest (minus its ``integrity`` section) is the
associated data, so editing the output policy, the cut or a shape in manifest.json makes
unsealing fail inside the enclave. On the client the host never unseals: only the worker
does. `unseal_container` is for the owner's own tools (the audit's owner view) and tests.

The data key travels to a worker only HPKE-wrapped to the worker's ephemeral X25519 key
(`wrap_data_key`): the host does that for local-key bundles, the key server otherwise.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import AuthenticationError

SEAL_MAGIC = b"ENCSEAL1"
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
# Bytes before the ciphertext; the worker decrypts the container to just after them.
HEADER_BYTES = len(SEAL_MAGIC) + NONCE_BYTES
# The smallest well-formed sealed file: header and the tag of an empty container.
MIN_SEALED_BYTES = HEADER_BYTES + TAG_BYTES

HPKE_INFO_PREFIX = b"ennclave data key v1"
HPKE_ENC_BYTES = 32  # X25519 encapsulated key


# ------------------------------------------------------------------ manifest as AAD


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


# ------------------------------------------------------------------ the container


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def seal_container(container: bytes, manifest: dict[str, Any], key: bytes) -> bytes:
    """ENCSEAL1 ‖ nonce ‖ AES-256-GCM(container, aad = canonical manifest)."""
    if len(key) != KEY_BYTES:
        raise ValueError("data key must be 32 bytes")
    nonce = os.urandom(NONCE_BYTES)
    return SEAL_MAGIC + nonce + AESGCM(key).encrypt(nonce, container, canonical_manifest(manifest))


def looks_sealed(head: bytes, size: int) -> bool:
    """Whether a file that starts with `head` and has `size` bytes can be a sealed file."""
    return head[: len(SEAL_MAGIC)] == SEAL_MAGIC and size >= MIN_SEALED_BYTES


def unseal_container(sealed: bytes, manifest: dict[str, Any], key: bytes, where: str) -> bytes:
    """The inverse of `seal_container`; `where` names the bundle in the error."""
    if not looks_sealed(sealed, len(sealed)):
        raise AuthenticationError(f"{where} has no sealed program.")
    nonce = sealed[len(SEAL_MAGIC) : HEADER_BYTES]
    try:
        return AESGCM(key).decrypt(nonce, sealed[HEADER_BYTES:], canonical_manifest(manifest))
    except InvalidTag:
        raise AuthenticationError(
            f"The sealed program in {where} did not authenticate with the owner's key."
        ) from None


# ------------------------------------------------------------------ HPKE key wrapping


@dataclass(frozen=True)
class WrappedKey:
    """The data key HPKE-wrapped to the worker (KEY), with the key server's licence and
    its MAC where there is one (sent as LICENCE before KEY; the worker verifies and
    enforces it)."""

    key_id: str
    enc: bytes
    wrapped: bytes
    licence: bytes | None = None
    licence_mac: bytes | None = None


@dataclass(frozen=True)
class CachedKey:
    """An offline key cache the worker sealed earlier (KEY_CACHE), sent back instead of
    KEY and LICENCE (CACHED_KEY). Ciphertext only."""

    key_id: str
    blob: bytes = field(repr=False)


def hpke_info(key_id: str) -> bytes:
    return HPKE_INFO_PREFIX + b"\x00" + key_id.encode("utf-8")


def wrap_data_key(recipient_pubkey: bytes, data_key: bytes, key_id: str) -> WrappedKey:
    """HPKE base mode, DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM, single
    shot, info = "ennclave data key v1" ‖ 0 ‖ key_id (the host for local keys and the
    key server both wrap this way)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

    suite = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM)
    pk = X25519PublicKey.from_public_bytes(recipient_pubkey)
    out = suite.encrypt(data_key, pk, info=hpke_info(key_id))
    return WrappedKey(key_id, out[:HPKE_ENC_BYTES], out[HPKE_ENC_BYTES:])
