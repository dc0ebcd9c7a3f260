"""What the routes share, kept on the FastAPI app's `state` by `create_app` and handed to
them as dependencies: the `Store`, the `ServerSettings`, the challenge `NonceBook`, and
the owner-token check."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Request

from . import evidence as ev
from .schemas import Refusal
from .store import Store

TOKEN_META = "owner_token_sha256"


@dataclass
class ServerSettings:
    max_body: int = 64 * 1024  # bytes per request (an SGX quote with certs is ~5-10 KiB)
    rate: float = 20.0  # requests per second per peer (token bucket); 0 = unlimited
    burst: int = 40
    nonce_ttl: int = 120  # seconds a challenge nonce stays valid
    max_nonces: int = 100_000  # outstanding nonces (oldest dropped first)
    collateral: ev.CollateralVerifier | None = None


class NonceBook:
    """Single-use challenge nonces, each bound to one key id, valid `ttl` seconds.
    In memory: a server restart invalidates outstanding nonces (clients just ask again)."""

    def __init__(self, ttl: int, cap: int) -> None:
        self.ttl, self.cap = ttl, cap
        self._d: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def issue(self, key_id: str) -> bytes:
        n = secrets.token_bytes(32)
        now = time.monotonic()
        with self._lock:
            while self._d:
                _k, (_, exp) = next(iter(self._d.items()))
                if exp > now and len(self._d) < self.cap:
                    break
                self._d.popitem(last=False)
            self._d[n] = (key_id, now + self.ttl)
        return n

    def consume(self, nonce: bytes, key_id: str) -> bool:
        with self._lock:
            got = self._d.pop(nonce, None)
        return got is not None and got[1] > time.monotonic() and hmac.compare_digest(got[0], key_id)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def attach_state(api: FastAPI, store: Store, settings: ServerSettings) -> None:
    """Put what the dependencies below hand out on `api.state`."""
    api.state.store = store
    api.state.settings = settings
    api.state.nonces = NonceBook(settings.nonce_ttl, settings.max_nonces)


# ------------------------------------------------------------------ dependencies


def get_store(req: Request) -> Store:
    return req.app.state.store


def get_settings(req: Request) -> ServerSettings:
    return req.app.state.settings


def get_nonces(req: Request) -> NonceBook:
    return req.app.state.nonces


StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
NoncesDep = Annotated[NonceBook, Depends(get_nonces)]


def require_owner(store: StoreDep, authorization: Annotated[str | None, Header()] = None) -> None:
    want = store.get_meta(TOKEN_META) or ""
    got = (authorization or "").removeprefix("Bearer ").strip()
    # constant time: compare digests of equal length
    if not want or not hmac.compare_digest(hash_token(got), want):
        raise Refusal(401, "unauthorized", "Owner calls need the owner's token.")


def peer(req: Request) -> str:
    return req.client.host if req.client else "?"
