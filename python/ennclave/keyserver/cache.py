"""The host's store of offline key caches (docs/key-release.md "Offline licences").

With a licence that says `offline: true` the worker seals {data key, licence, MAC}
under a key derived from `/etc/machine-id` and its own binary hash and hands the blob
to the host (KEY_CACHE). The host keeps it, with the (public) licence next to it, in
`<user cache dir>/ennclave/keycache/<key_id>.json` (platformdirs; 0600, written
atomically; `$ENNCLAVE_CACHE_DIR` overrides the directory). When the key server cannot
be reached at a later start, the host sends the blob back (CACHED_KEY); only a worker
with the same binary on the same machine can open it, and it refuses after the
licence's `expires_at`.

The blob is ciphertext; the host never holds the data key. It is **not** resistant to
root or to the same user: both can read the machine id and the binary and so derive
the cache key.

Next to it, `<cache dir>/usage-pending/<key_id>.json` holds workers' usage reports of
metered licences that could not be sent to the key server yet (docs/key-release.md
"Metered budgets"). Losing them is safe for the owner: an unreported slice counts as
spent.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import Any

from .config import _read_private, _write_private

_KEY_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def cache_dir() -> Path:
    env = os.environ.get("ENNCLAVE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("ennclave")) / "keycache"


def cache_path(key_id: str) -> Path | None:
    """Where the cache for `key_id` lives (None for a key id unfit for a file name)."""
    if not _KEY_ID.fullmatch(key_id):
        return None
    return cache_dir() / f"{key_id}.json"


def store(key_id: str, blob: bytes, licence: bytes, licence_mac: bytes) -> Path | None:
    p = cache_path(key_id)
    if p is None:
        return None
    b64 = lambda b: base64.b64encode(b).decode()
    body = {
        "v": 1,
        "key_id": key_id,
        "blob": b64(blob),
        "licence": b64(licence),
        "licence_mac": b64(licence_mac),
    }
    _write_private(p, json.dumps(body, sort_keys=True).encode())
    return p


def load(key_id: str) -> dict[str, Any] | None:
    """`{"blob", "licence", "licence_mac"}` as bytes, or None when there is no usable
    cache file (absent, unreadable, malformed)."""
    p = cache_path(key_id)
    if p is None or not p.is_file():
        return None
    try:
        d = json.loads(_read_private(p))
        if d.get("v") != 1 or d.get("key_id") != key_id:
            return None
        return {
            k: base64.b64decode(d[k], validate=True) for k in ("blob", "licence", "licence_mac")
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove(key_id: str) -> None:
    p = cache_path(key_id)
    if p is not None:
        p.unlink(missing_ok=True)


def usage_path(key_id: str) -> Path | None:
    if not _KEY_ID.fullmatch(key_id):
        return None
    return cache_dir() / "usage-pending" / f"{key_id}.json"


def load_usage(key_id: str) -> list[tuple[bytes, bytes]]:
    """Pending usage reports `(report, mac)` (none when absent or unreadable)."""
    p = usage_path(key_id)
    if p is None or not p.is_file():
        return []
    try:
        d = json.loads(_read_private(p))
        return [
            (
                base64.b64decode(r["report"], validate=True),
                base64.b64decode(r["mac"], validate=True),
            )
            for r in d["reports"]
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def store_usage(key_id: str, reports: list[tuple[bytes, bytes]]) -> None:
    """Replace the pending reports of `key_id` (none: the file is removed)."""
    p = usage_path(key_id)
    if p is None:
        return
    if not reports:
        p.unlink(missing_ok=True)
        return
    b64 = lambda b: base64.b64encode(b).decode()
    body = {"v": 1, "reports": [{"report": b64(r), "mac": b64(m)} for r, m in reports[-1000:]]}
    _write_private(p, json.dumps(body, sort_keys=True).encode())
