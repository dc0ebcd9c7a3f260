"""The owner's calls: register, list, get, change the policy of and revoke keys, read the
audit log. Every route needs ``Authorization: Bearer <owner token>`` (`require_owner`);
every change is appended to the audit log."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from .. import evidence as ev
from ..schemas import (
    ERRORS,
    KEY_ID,
    AuditEntry,
    BundleOut,
    Refusal,
    RegisterRequest,
    RevokeRequest,
)
from ..state import StoreDep, peer, require_owner
from ..store import Store

router = APIRouter(dependencies=[Depends(require_owner)])


def _bundle(store: Store, key_id: str) -> BundleOut:
    rec = store.get(key_id)
    if rec is None:
        raise Refusal(404, "unknown_bundle", "No key is registered under this key id.")
    return BundleOut(**rec.to_json())


@router.post("/v1/keys", response_model=BundleOut, status_code=201, responses=ERRORS)
def register(body: RegisterRequest, req: Request, store: StoreDep) -> BundleOut:
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
    return _bundle(store, body.key_id)


@router.get("/v1/keys", response_model=list[BundleOut])
def list_keys(store: StoreDep) -> list[BundleOut]:
    return [BundleOut(**r.to_json()) for r in store.list()]


@router.get("/v1/keys/{key_id}", response_model=BundleOut, responses=ERRORS)
def get_key(key_id: str, store: StoreDep) -> BundleOut:
    return _bundle(store, key_id)


@router.patch("/v1/keys/{key_id}/policy", response_model=BundleOut, responses=ERRORS)
def set_policy(key_id: str, changes: dict[str, Any], req: Request, store: StoreDep) -> BundleOut:
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
    return _bundle(store, key_id)


@router.post("/v1/keys/{key_id}/revoke", response_model=BundleOut, responses=ERRORS)
def revoke(key_id: str, body: RevokeRequest, req: Request, store: StoreDep) -> BundleOut:
    if not store.revoke(key_id, body.reason):
        raise Refusal(404, "unknown_bundle", "No key is registered under this key id.")
    store.audit("revoke", "done", "ok", key_id=key_id, peer=peer(req), detail=body.reason)
    return _bundle(store, key_id)


@router.get("/v1/audit", response_model=list[AuditEntry])
def audit(
    store: StoreDep,
    key_id: Annotated[str | None, Query(pattern=KEY_ID)] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 100,
) -> list[AuditEntry]:
    return [AuditEntry(**r) for r in store.audit_log(key_id, limit)]
