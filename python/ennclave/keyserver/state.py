"""What the routes share, kept on the FastAPI app's `state` by `create_app` and handed to
them as dependencies: the `Store`, the `ServerSettings`, the challenge `NonceBook`, the
`JunkAudit` throttle and the owner-token check."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request

from . import evidence as ev
from .schemas import Refusal
from .store import Store, audit_row

TOKEN_META = "owner_token_sha256"


@dataclass
class ServerSettings:
    max_body: int = 64 * 1024  # bytes per request (an SGX quote with certs is ~5-10 KiB)
    rate: float = 20.0  # requests per second per peer (token bucket, per replica); 0 = off
    burst: int = 40
    nonce_ttl: int = 120  # seconds a challenge nonce stays valid
    max_nonces: int = 100_000  # outstanding nonces in the database, all peers (then 503)
    max_nonces_per_peer: int = 256  # outstanding nonces of one peer (then 429)
    header_timeout: float = 10.0  # s to send a request's headers (server.py)
    body_timeout: float = 10.0  # s to send a request's body once its headers are in
    keep_alive: float = 5.0  # s an idle keep-alive connection stays open
    max_connections: int = 1000  # open connections per replica (then 503)
    max_connections_per_peer: int = 64  # open connections of one peer (then closed)
    junk_window: float = 60.0  # s: per peer and reason, `junk_burst` refusals of
    junk_burst: int = 20  # requests without a valid nonce are audited one by one, the rest summed
    collateral: ev.CollateralVerifier | None = None


class NonceBook:
    """Single-use challenge nonces, each bound to one key id, valid `ttl` seconds, kept
    in the database (`Store.issue_nonce` / `consume_nonce`): any replica accepts a nonce
    another issued, and only once. A peer may hold `per_peer` outstanding nonces; a
    flood of challenges is refused (`NonceLimit`) and never evicts anyone's nonce."""

    def __init__(self, store: Store, settings: ServerSettings) -> None:
        self.store, self.s = store, settings

    def issue(self, key_id: str, peer: str) -> bytes:
        return self.store.issue_nonce(
            key_id, peer, self.s.nonce_ttl, self.s.max_nonces_per_peer, self.s.max_nonces
        )

    def consume(self, nonce: bytes, key_id: str) -> bool:
        return self.store.consume_nonce(nonce, key_id)


class JunkAudit:
    """Audit rows for refused requests that carry no valid nonce (anyone can send them
    at line rate): per (peer, reason) the first `burst` in each `window` seconds are
    audited one by one, the rest are counted and written as one ``suppressed`` row when
    the window ends (or at shutdown). Per replica; bounded memory."""

    MAX_KEYS = 4096

    def __init__(self, store: Store, window: float, burst: int) -> None:
        self.store, self.window, self.burst = store, window, burst
        self._w: dict[tuple[str, str], list[Any]] = {}  # key → [window start, seen, ctx]
        self._lock = threading.Lock()

    def admit(self, peer: str, code: str, ctx: dict[str, Any]) -> bool:
        """True: audit this refusal now. False: it was counted into a summary."""
        now = time.monotonic()
        due: list[dict[str, Any]] = []
        with self._lock:
            key = (peer, code)
            if key not in self._w and len(self._w) >= self.MAX_KEYS:
                due += self._expire(now, everything=True)
            w = self._w.get(key)
            if w is not None and now - w[0] >= self.window:
                due += self._summaries([(key, w)])
                del self._w[key]
                w = None
            if w is None:
                w = self._w[key] = [now, 0, ctx]
            w[1] += 1
            ok = w[1] <= self.burst
        for row in due:
            self.store.append_audit(row)
        return ok

    def _expire(self, now: float, everything: bool = False) -> list[dict[str, Any]]:
        old = [(k, w) for k, w in self._w.items() if everything or now - w[0] >= self.window]
        for k, _ in old:
            del self._w[k]
        return self._summaries(old)

    def _summaries(self, items: list[tuple[tuple[str, str], list[Any]]]) -> list[dict[str, Any]]:
        rows = []
        for (peer, code), (start, seen, ctx) in items:
            extra = seen - self.burst
            if extra > 0:
                secs = max(1, round(time.monotonic() - start))
                rows.append(
                    audit_row(
                        "release",
                        "refused",
                        "suppressed",
                        detail=f"{extra} more {code} refusals from {peer} in {secs} s "
                        "not audited one by one",
                        **{**ctx, "peer": peer},
                    )
                )
        return rows

    def flush(self) -> None:
        with self._lock:
            due = self._expire(time.monotonic(), everything=True)
        for row in due:
            self.store.append_audit(row)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def attach_state(api: FastAPI, store: Store, settings: ServerSettings) -> None:
    """Put what the dependencies below hand out on `api.state`."""
    api.state.store = store
    api.state.settings = settings
    api.state.nonces = NonceBook(store, settings)
    api.state.junk = JunkAudit(store, settings.junk_window, settings.junk_burst)


# ------------------------------------------------------------------ dependencies
# `async def`: FastAPI runs a plain `def` dependency in its thread pool, a hop per
# dependency per request; these only read `app.state`.


async def get_store(req: Request) -> Store:
    return req.app.state.store


async def get_settings(req: Request) -> ServerSettings:
    return req.app.state.settings


async def get_nonces(req: Request) -> NonceBook:
    return req.app.state.nonces


async def get_junk(req: Request) -> JunkAudit:
    return req.app.state.junk


StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
NoncesDep = Annotated[NonceBook, Depends(get_nonces)]
JunkDep = Annotated[JunkAudit, Depends(get_junk)]


def require_owner(store: StoreDep, authorization: Annotated[str | None, Header()] = None) -> None:
    want = store.get_meta(TOKEN_META) or ""
    got = (authorization or "").removeprefix("Bearer ").strip()
    # constant time: compare digests of equal length
    if not want or not hmac.compare_digest(hash_token(got), want):
        raise Refusal(401, "unauthorized", "Owner calls need the owner's token.")


def peer(req: Request) -> str:
    return req.client.host if req.client else "?"
