"""The licence that travels with a released key.

A licence is canonical JSON (sorted keys, no whitespace, integers only):

    {"v": 1, "key_id": …, "licence_id": hex, "issued_at": s, "expires_at": s,
     "query_budget": n | null, "pubkey": hex (the worker's ephemeral key),
     "binary_sha256": hex, "client_id": hex, "offline": bool, "evidence": kind}

authenticated with HMAC-SHA256 under a key derived from the bundle's **data key**:

    mac_key = HKDF-SHA256(ikm = data key, salt = none, info = "ennclave licence v1" ‖ 0 ‖ key_id)

Only holders of the data key — the key server (and the owner) — can issue a licence,
and the worker can check it as soon as it has unwrapped the key. The host relays the
licence but cannot forge or change it (it never holds the data key in key-server mode).

A metered licence (`query_budget` set: a slice of the key's total) ends with the
worker's **usage report** (docs/key-release.md "Metered budgets"), the canonical JSON
``{"final": true, "key_id": …, "licence_id": …, "used": n, "v": 1}`` authenticated with
HMAC-SHA256 under a key of its own:

    usage_key = HKDF-SHA256(ikm = data key, salt = none, info = "ennclave usage v1" ‖ 0 ‖ key_id)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import asdict, dataclass
from typing import Any

LICENCE_INFO = b"ennclave licence v1"
USAGE_INFO = b"ennclave usage v1"
LICENCE_VERSION = 1


@dataclass(frozen=True)
class Licence:
    key_id: str
    licence_id: str
    issued_at: int
    expires_at: int
    query_budget: int | None
    pubkey: str
    binary_sha256: str
    client_id: str
    offline: bool
    evidence: str
    v: int = LICENCE_VERSION

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Licence:
        d: dict[str, Any] = json.loads(raw)
        if d.get("v") != LICENCE_VERSION:
            raise ValueError("unknown licence version")
        return cls(**d)

    @classmethod
    def new(cls, **kw: Any) -> Licence:
        return cls(licence_id=secrets.token_hex(8), **kw)


def _derive(data_key: bytes, prefix: bytes, key_id: str) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    info = prefix + b"\x00" + key_id.encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(data_key)


def _mac_key(data_key: bytes, key_id: str) -> bytes:
    return _derive(data_key, LICENCE_INFO, key_id)


def licence_mac(data_key: bytes, licence: Licence) -> bytes:
    return hmac.new(_mac_key(data_key, licence.key_id), licence.to_bytes(), hashlib.sha256).digest()


def check_licence_mac(data_key: bytes, raw: bytes, mac: bytes) -> Licence:
    """Verify and parse (what the worker does; for tests and tools)."""
    lic = Licence.from_bytes(raw)
    if lic.to_bytes() != raw:
        raise ValueError("licence is not canonical")
    if not hmac.compare_digest(licence_mac(data_key, lic), mac):
        raise ValueError("licence MAC does not verify")
    return lic


@dataclass(frozen=True)
class UsageReport:
    """A worker's final usage report of one metered licence."""

    key_id: str
    licence_id: str
    used: int
    final: bool = True
    v: int = LICENCE_VERSION

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()


def usage_mac(data_key: bytes, key_id: str, raw: bytes) -> bytes:
    """The MAC a worker puts on usage report `raw` (what enclave/src/licence.rs does)."""
    return hmac.new(_derive(data_key, USAGE_INFO, key_id), raw, hashlib.sha256).digest()


def check_usage(data_key: bytes, key_id: str, raw: bytes, mac: bytes) -> UsageReport:
    """Verify (constant time) and parse a usage report; ValueError says what is wrong."""
    if not hmac.compare_digest(usage_mac(data_key, key_id, raw), mac):
        raise ValueError("the usage report does not authenticate under the key")
    try:
        d = json.loads(raw)
        rep = UsageReport(**d)
    except (ValueError, TypeError):
        raise ValueError("the usage report is malformed") from None
    ok_used = isinstance(rep.used, int) and not isinstance(rep.used, bool) and rep.used >= 0
    if rep.v != LICENCE_VERSION or rep.final is not True or not ok_used:
        raise ValueError("the usage report is malformed")
    if rep.key_id != key_id:
        raise ValueError("the usage report is for another key")
    return rep
