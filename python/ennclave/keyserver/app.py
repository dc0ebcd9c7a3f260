"""The key server's HTTP API (FastAPI). Routes and payloads: docs/key-release.md and the
exported OpenAPI schema docs/keyserver-openapi.json.

Key requests (``/v1/challenge``, ``/v1/release``) need no token: the evidence and the
policy decide. Owner calls (``/v1/keys…``, ``/v1/audit``) need ``Authorization: Bearer
<owner token>``, compared in constant time against the SHA-256 stored in the database.
Every release decision and every owner change is appended to the audit log. Errors are
``{"error": code, "reason": sentence}`` with a 4xx status and never contain key material.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from .. import __version__
from . import evidence as ev
from .licence import Licence, licence_mac
from .store import Store

HEX64 = r"^[0-9a-fA-F]{64}$"
KEY_ID = r"^[A-Za-z0-9._-]{1,128}$"
TOKEN_META = "owner_token_sha256"


@dataclass
class ServerSettings:
    max_body: int = 64 * 1024  # bytes per request (an SGX quote with certs is ~5-10 KiB)
    rate: float = 20.0  # requests per second per peer (token bucket); 0 = unlimited
    burst: int = 40
    nonce_ttl: int = 120  # seconds a challenge nonce stays valid
    max_nonces: int = 100_000  # outstanding nonces (oldest dropped first)
    collateral: ev.CollateralVerifier | None = None


class Refusal(Exception):
    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.code, self.reason = status, code, reason


# ------------------------------------------------------------------ ASGI guards


class Guard:
    """Pure-ASGI middleware: request-size limit (413) and a per-peer token bucket (429)."""

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


# ------------------------------------------------------------------ nonces


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


# ------------------------------------------------------------------ payloads


class ChallengeRequest(BaseModel):
    key_id: str = Field(pattern=KEY_ID)


class ChallengeResponse(BaseModel):
    nonce: str = Field(description="32 random bytes, hex; single use, bound to key_id")
    expires_in: int


class EvidenceIn(BaseModel):
    kind: str = Field(max_length=32, description="software | sgx-dcap-v3")
    report: str = Field(max_length=60000, description="base64: the worker's report or SGX quote")


class ReleaseRequest(BaseModel):
    key_id: str = Field(pattern=KEY_ID)
    nonce: str = Field(pattern=HEX64)
    pubkey: str = Field(pattern=HEX64, description="the worker's ephemeral X25519 key (HELLO)")
    binary_sha256: str = Field(pattern=HEX64, description="from HELLO")
    manifest_sha256: str = Field(pattern=HEX64, description="SHA-256 of the canonical manifest")
    client_id: str = Field(
        pattern=r"^[0-9a-fA-F]{16,128}$", description="self-reported machine id hash"
    )
    evidence: EvidenceIn


class ReleaseResponse(BaseModel):
    key_id: str
    enc: str = Field(description="base64, 32 B HPKE encapsulated key")
    wrapped: str = Field(description="base64, 48 B HPKE ciphertext of the data key")
    licence: str = Field(description="base64 canonical licence JSON")
    licence_mac: str = Field(description="base64 HMAC-SHA256 under a key derived from the data key")
    evidence: str
    software: bool
    expires_at: int
    query_budget: int | None


class RegisterRequest(BaseModel):
    key_id: str = Field(pattern=KEY_ID)
    key: str = Field(max_length=64, description="base64 of the 32-byte data key")
    manifest_sha256: str | None = Field(default=None, pattern=HEX64)
    policy: dict[str, Any] = Field(default_factory=dict)


class BundleOut(BaseModel):
    key_id: str
    manifest_sha256: str | None
    policy: dict[str, Any]
    revoked: bool
    revoked_reason: str | None
    created_at: int
    updated_at: int
    clients: int


class RevokeRequest(BaseModel):
    reason: str = Field(default="revoked by the owner", max_length=200)


class AuditEntry(BaseModel):
    id: int
    ts_ms: int
    event: str
    key_id: str | None
    decision: str
    reason: str
    detail: str | None
    client_id: str | None
    peer: str | None
    evidence: str | None
    binary_sha256: str | None
    licence_id: str | None
    prev_hash: str
    hash: str


class ErrorOut(BaseModel):
    error: str
    reason: str


ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorOut} for s in (400, 401, 403, 404, 409, 413, 422, 429)
}


# ------------------------------------------------------------------ app


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_app(store: Store, settings: ServerSettings | None = None) -> Any:
    """The ASGI application (FastAPI wrapped by `Guard`); `.fastapi` is the inner app."""
    s = settings or ServerSettings()
    nonces = NonceBook(s.nonce_ttl, s.max_nonces)
    api = FastAPI(
        title="ennclave key server",
        version=__version__,
        description="Attested release of ennclave bundle data keys (docs/key-release.md).",
    )

    @api.exception_handler(Refusal)
    async def _refusal(_req: Request, e: Refusal) -> JSONResponse:
        return JSONResponse({"error": e.code, "reason": e.reason}, status_code=e.status)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, e: RequestValidationError) -> JSONResponse:
        where = ", ".join(
            ".".join(str(p) for p in err.get("loc", ())[1:]) for err in e.errors()[:3]
        )
        return JSONResponse(
            {"error": "bad_request", "reason": f"Malformed request ({where or 'body'})."},
            status_code=400,
        )

    def owner(authorization: Annotated[str | None, Header()] = None) -> None:
        want = store.get_meta(TOKEN_META) or ""
        got = (authorization or "").removeprefix("Bearer ").strip()
        # constant time: compare digests of equal length
        if not want or not hmac.compare_digest(hash_token(got), want):
            raise Refusal(401, "unauthorized", "Owner calls need the owner's token.")

    def peer(req: Request) -> str:
        return req.client.host if req.client else "?"

    @api.get("/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @api.post("/v1/challenge", response_model=ChallengeResponse, responses=ERRORS)
    def challenge(body: ChallengeRequest) -> ChallengeResponse:
        return ChallengeResponse(nonce=nonces.issue(body.key_id).hex(), expires_in=s.nonce_ttl)

    @api.post("/v1/release", response_model=ReleaseResponse, responses=ERRORS)
    def release(body: ReleaseRequest, req: Request) -> ReleaseResponse:
        ctx = {
            "key_id": body.key_id,
            "client_id": body.client_id.lower(),
            "peer": peer(req),
            "evidence": body.evidence.kind,
            "binary_sha256": body.binary_sha256.lower(),
        }

        def refuse(status: int, code: str, reason: str) -> Refusal:
            store.audit("release", "refused", code, detail=reason, **ctx)
            return Refusal(status, code, reason)

        if not nonces.consume(bytes.fromhex(body.nonce), body.key_id):
            raise refuse(
                403,
                "nonce_invalid",
                "The nonce is unknown, expired, already used or for another key; ask for a new challenge.",
            )
        loaded = store.load_for_release(body.key_id)
        if loaded is None:
            raise refuse(404, "unknown_bundle", "No key is registered under this key id.")
        rec, data_key = loaded
        try:
            if rec.revoked:
                raise refuse(403, "revoked", "The owner revoked this bundle's key.")
            now = int(time.time())
            pol = rec.policy
            if pol.expires_at is not None and now >= pol.expires_at:
                raise refuse(403, "expired", "This bundle's key has expired.")
            try:
                report = base64.b64decode(body.evidence.report, validate=True)
            except (binascii.Error, ValueError):
                raise refuse(400, "bad_request", "The evidence report is not base64.") from None
            claim = ev.Claim(
                bytes.fromhex(body.nonce),
                bytes.fromhex(body.pubkey),
                bytes.fromhex(body.binary_sha256),
                body.manifest_sha256,
                body.evidence.kind,
                report,
            )
            try:
                verified = ev.verify(
                    claim, pol, registered_manifest=rec.manifest_sha256, collateral=s.collateral
                )
            except ev.EvidenceRefused as e:
                raise refuse(403, e.code, str(e)) from None
            if not store.admit_client(body.key_id, ctx["client_id"], pol.max_clients):
                raise refuse(
                    403, "too_many_clients", "The bundle's maximum number of clients is reached."
                )
            expires = now + pol.licence_ttl
            if pol.expires_at is not None:
                expires = min(expires, pol.expires_at)
            lic = Licence.new(
                key_id=body.key_id,
                issued_at=now,
                expires_at=expires,
                query_budget=pol.query_budget,
                pubkey=body.pubkey.lower(),
                binary_sha256=verified.binary_sha256,
                client_id=ctx["client_id"],
                offline=pol.offline,
                evidence=verified.kind,
            )
            from ..runtime.worker import wrap_data_key

            wk = wrap_data_key(claim.pubkey, data_key, body.key_id)
            mac = licence_mac(data_key, lic)
        finally:
            del data_key
        store.audit(
            "release",
            "granted",
            "software" if not verified.hardware else "hardware",
            detail=f"licence until {lic.expires_at}",
            licence_id=lic.licence_id,
            **ctx,
        )
        b64 = lambda b: base64.b64encode(b).decode()
        return ReleaseResponse(
            key_id=body.key_id,
            enc=b64(wk.enc),
            wrapped=b64(wk.wrapped),
            licence=b64(lic.to_bytes()),
            licence_mac=b64(mac),
            evidence=verified.kind,
            software=not verified.hardware,
            expires_at=lic.expires_at,
            query_budget=lic.query_budget,
        )

    # -- owner ----------------------------------------------------------------

    def _bundle(key_id: str) -> BundleOut:
        rec = store.get(key_id)
        if rec is None:
            raise Refusal(404, "unknown_bundle", "No key is registered under this key id.")
        return BundleOut(**rec.to_json())

    @api.post(
        "/v1/keys",
        response_model=BundleOut,
        status_code=201,
        responses=ERRORS,
        dependencies=[Depends(owner)],
    )
    def register(body: RegisterRequest, req: Request) -> BundleOut:
        try:
            key = base64.b64decode(body.key, validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != 32:
            raise Refusal(400, "bad_key", "The data key must be 32 bytes, base64.")
        try:
            pol = ev.Policy.from_json(body.policy)
        except (TypeError, ValueError) as e:
            raise Refusal(400, "bad_policy", f"Invalid policy: {e}.") from None
        ok = store.register(
            body.key_id, key, body.manifest_sha256.lower() if body.manifest_sha256 else None, pol
        )
        del key
        store.audit(
            "register",
            "done" if ok else "refused",
            "ok" if ok else "exists",
            key_id=body.key_id,
            peer=peer(req),
        )
        if not ok:
            raise Refusal(409, "exists", "A key is already registered under this key id.")
        return _bundle(body.key_id)

    @api.get("/v1/keys", response_model=list[BundleOut], dependencies=[Depends(owner)])
    def list_keys() -> list[BundleOut]:
        return [BundleOut(**r.to_json()) for r in store.list()]

    @api.get(
        "/v1/keys/{key_id}",
        response_model=BundleOut,
        responses=ERRORS,
        dependencies=[Depends(owner)],
    )
    def get_key(key_id: str) -> BundleOut:
        return _bundle(key_id)

    @api.patch(
        "/v1/keys/{key_id}/policy",
        response_model=BundleOut,
        responses=ERRORS,
        dependencies=[Depends(owner)],
    )
    def set_policy(key_id: str, changes: dict[str, Any], req: Request) -> BundleOut:
        rec = store.get(key_id)
        if rec is None:
            raise Refusal(404, "unknown_bundle", "No key is registered under this key id.")
        try:
            pol = rec.policy.merged(changes)
        except (TypeError, ValueError) as e:
            raise Refusal(400, "bad_policy", f"Invalid policy: {e}.") from None
        store.set_policy(key_id, pol)
        store.audit(
            "policy",
            "done",
            "ok",
            key_id=key_id,
            peer=peer(req),
            detail=json.dumps(changes, sort_keys=True)[:500],
        )
        return _bundle(key_id)

    @api.post(
        "/v1/keys/{key_id}/revoke",
        response_model=BundleOut,
        responses=ERRORS,
        dependencies=[Depends(owner)],
    )
    def revoke(key_id: str, body: RevokeRequest, req: Request) -> BundleOut:
        if not store.revoke(key_id, body.reason):
            raise Refusal(404, "unknown_bundle", "No key is registered under this key id.")
        store.audit("revoke", "done", "ok", key_id=key_id, peer=peer(req), detail=body.reason)
        return _bundle(key_id)

    @api.get("/v1/audit", response_model=list[AuditEntry], dependencies=[Depends(owner)])
    def audit(
        key_id: Annotated[str | None, Query(pattern=KEY_ID)] = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 100,
    ) -> list[AuditEntry]:
        return [AuditEntry(**r) for r in store.audit_log(key_id, limit)]

    app = Guard(api, s)
    app.fastapi = api  # type: ignore[attr-defined]
    return app


def openapi_schema() -> dict[str, Any]:
    """The OpenAPI schema without a database (for docs/keyserver-openapi.json)."""

    class _NoStore:
        pass

    app = create_app(_NoStore())  # type: ignore[arg-type]
    return app.fastapi.openapi()  # type: ignore[attr-defined]
