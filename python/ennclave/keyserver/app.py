"""The key server's HTTP API (FastAPI). Routes and payloads: docs/key-release.md and the
exported OpenAPI schema docs/keyserver-openapi.json.

Key requests (``/v1/challenge``, ``/v1/release``) need no token: the evidence and the
policy decide. Owner calls (``/v1/keys…``, ``/v1/audit``) need ``Authorization: Bearer
<owner token>``, compared in constant time against the SHA-256 stored in the database.
Every release decision and every owner change is appended to the audit log. Errors are
``{"error": code, "reason": sentence}`` with a 4xx status and never contain key material.

This module assembles the app; the routes are in `routes/` (health, release, admin),
the payloads in `schemas`, the shared state and its dependencies in `state`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from .. import __version__
from .routes import ROUTERS
from .schemas import Refusal
from .state import TOKEN_META, JunkAudit, NonceBook, ServerSettings, attach_state, hash_token
from .store import Store

__all__ = [
    "TOKEN_META",
    "Guard",
    "NonceBook",
    "Refusal",
    "ServerSettings",
    "create_app",
    "hash_token",
    "openapi_schema",
]


# ------------------------------------------------------------------ ASGI guards


class Guard:
    """Pure-ASGI middleware: request-size limit (413), a deadline for the body once the
    headers are in (408; the header deadline is in `server`), and a per-peer token
    bucket (429, per replica)."""

    def __init__(self, app: Any, settings: ServerSettings) -> None:
        self.app = app
        self.s = settings
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def _allow(self, peer: str) -> bool:
        if self.s.rate <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.pop(peer, (float(self.s.burst), now))
            tokens = min(float(self.s.burst), tokens + (now - last) * self.s.rate)
            ok = tokens >= 1.0
            self._buckets[peer] = (tokens - 1.0 if ok else tokens, now)
            while len(self._buckets) > 10_000:
                self._buckets.popitem(last=False)
        return ok

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        peer = (scope.get("client") or ("?", 0))[0]
        if not self._allow(peer):
            await _send_json(send, 429, "rate_limited", "Too many requests; slow down.")
            return
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.s.max_body
                except ValueError:
                    too_big = True
                if too_big:
                    await _send_json(send, 413, "too_large", "The request body is too large.")
                    return
        # Buffer the whole body (at most max_body) before the app sees it, so chunked
        # uploads are capped as well, with a clean 413.
        body = bytearray()
        try:
            async with asyncio.timeout(self.s.body_timeout):
                more = True
                while more:
                    msg = await receive()
                    if msg["type"] != "http.request":
                        return  # client went away
                    body += msg.get("body", b"")
                    more = msg.get("more_body", False)
                    if len(body) > self.s.max_body:
                        await _send_json(send, 413, "too_large", "The request body is too large.")
                        return
        except TimeoutError:
            await _send_json(send, 408, "too_slow", "The request body arrived too slowly.")
            return
        sent = False

        async def replay() -> Any:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send_json(send: Any, status: int, code: str, reason: str) -> None:
    body = json.dumps({"error": code, "reason": reason}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------ app


async def _refusal(_req: Request, e: Refusal) -> JSONResponse:
    return JSONResponse({"error": e.code, "reason": e.reason}, status_code=e.status)


async def _invalid(_req: Request, e: RequestValidationError) -> JSONResponse:
    where = ", ".join(".".join(str(p) for p in err.get("loc", ())[1:]) for err in e.errors()[:3])
    return JSONResponse(
        {"error": "bad_request", "reason": f"Malformed request ({where or 'body'})."},
        status_code=400,
    )


async def _store_down(_req: Request, e: SQLAlchemyError) -> JSONResponse:
    print(f"ennclave keyserver: database error: {e!r}", file=sys.stderr, flush=True)
    return JSONResponse(
        {"error": "store_unavailable", "reason": "The key server's database is unavailable."},
        status_code=503,
        headers={"Retry-After": "1"},
    )


async def _failed(req: Request, e: Exception) -> JSONResponse:
    """Any other failure: a 500 with a reason, and an audit row saying where."""
    print(f"ennclave keyserver: {req.url.path} failed: {e!r}", file=sys.stderr, flush=True)
    try:
        req.app.state.store.audit(
            "error",
            "failed",
            "internal_error",
            detail=f"{req.method} {req.url.path}: {type(e).__name__}"[:500],
            peer=req.client.host if req.client else "?",
        )
    except Exception as again:  # the database itself is the failure
        print(f"ennclave keyserver: audit failed: {again!r}", file=sys.stderr, flush=True)
    return JSONResponse(
        {
            "error": "internal_error",
            "reason": f"The key server failed on this request ({type(e).__name__}).",
        },
        status_code=500,
    )


@asynccontextmanager
async def _lifespan(api: FastAPI) -> AsyncIterator[None]:
    yield
    junk: JunkAudit | None = getattr(api.state, "junk", None)
    if junk is not None:
        try:
            junk.flush()  # the last window's summed refusals
        except Exception as e:
            print(f"ennclave keyserver: audit flush failed: {e!r}", file=sys.stderr, flush=True)


def create_app(store: Store, settings: ServerSettings | None = None) -> Any:
    """The ASGI application (FastAPI wrapped by `Guard`); `.fastapi` is the inner app."""
    s = settings or ServerSettings()
    api = FastAPI(
        title="ennclave key server",
        version=__version__,
        description="Attested release of ennclave bundle data keys (docs/key-release.md).",
        lifespan=_lifespan,
    )
    attach_state(api, store, s)
    api.add_exception_handler(Refusal, _refusal)  # type: ignore[arg-type]
    api.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    api.add_exception_handler(SQLAlchemyError, _store_down)  # type: ignore[arg-type]
    api.add_exception_handler(Exception, _failed)
    for router in ROUTERS:
        api.include_router(router)
    app = Guard(api, s)
    app.fastapi = api  # type: ignore[attr-defined]
    return app


def openapi_schema() -> dict[str, Any]:
    """The OpenAPI schema without a database (for docs/keyserver-openapi.json)."""

    class _NoStore:
        pass

    app = create_app(_NoStore())  # type: ignore[arg-type]
    return app.fastapi.openapi()  # type: ignore[attr-defined]
