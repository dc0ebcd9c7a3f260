"""The owner's calls: register, list, get, change the policy of and revoke keys, read the
audit log. Every route needs ``Authorization: Bearer <owner token>`` (`require_owner`);
every change is appended to the audit log."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from .. import evidence as ev
from ..bounds import OutOfRange, check_policy_bounds
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
from ..store import Store, audit_row

router = APIRouter(dependencies=[Depends(require_owner)])


def _bundle(store: Store, key_id: str) -> BundleOut:
    rec = store.get(key_id)
    if rec is None:
        raise Refusal(404, "unknown_bundle", "No key is registered under this key id.")
    return BundleOut(**rec.to_json())


def _policy(make: Callable[[], ev.Policy], given: dict[str, Any]) -> ev.Policy:
    """The policy `make` builds, after `given`'s numbers are checked against their
    bounds (422 ``policy_out_of_range``); other invalid policies are 400 ``bad_policy``."""
    try:
        check_policy_bounds(given)
    except OutOfRange as e:
        raise Refusal(422, "policy_out_of_range", f"{e}.") from None
    try:
        pol = make()
    except (TypeError, ValueError) as e:
        raise Refusal(400, "bad_policy", f"Invalid policy: {e}.") from None
    if pol.offline and pol.metered:
        raise Refusal(
            400,
            "bad_policy",
            "A key with a query budget cannot allow offline licences: an offline key "
            "cache would restart the worker with a fresh allowance each time; set "
            "offline to false or remove the budget.",
        )
    return pol


@router.post("/v1/keys", response_model=BundleOut, status_code=201, responses=ERRORS)
def register(body: RegisterRequest, req: Request, store: StoreDep) -> BundleOut:
    try:
        key = base64.b64decode(body.key, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise Refusal(400, "bad_key", "The data key must be 32 bytes, base64.")
    pol = _policy(lambda: ev.Policy.from_json(body.policy), body.policy)
    ok = store.register(
        body.key_id,
        key,
        body.manifest_sha256.lower() if body.manifest_sha256 else None,
        pol,
        audit=audit_row("register", "done", "ok", key_id=body.key_id, peer=peer(req)),
    )
    del key
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
    pol = _policy(lambda: rec.policy.merged(changes), changes)
    row = audit_row(
        "policy",
        "done",
        "ok",
        key_id=key_id,
        peer=peer(req),
        detail=json.dumps(changes, sort_keys=True)[:500],
    )
    if not store.set_policy(key_id, pol, audit=row):
        raise Refusal(404, "unknown_bundle", "No key is registered under this key id.")
    return _bundle(store, key_id)


@router.post("/v1/keys/{key_id}/revoke", response_model=BundleOut, responses=ERRORS)
def revoke(key_id: str, body: RevokeRequest, req: Request, store: StoreDep) -> BundleOut:
    row = audit_row("revoke", "done", "ok", key_id=key_id, peer=peer(req), detail=body.reason)
    if not store.revoke(key_id, body.reason, audit=row):
        raise Refusal(404, "unknown_bundle", "No key is registered under this key id.")
    return _bundle(store, key_id)


@router.get("/v1/audit", response_model=list[AuditEntry])
def audit(
    store: StoreDep,
    key_id: Annotated[str | None, Query(pattern=KEY_ID)] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 100,
) -> list[AuditEntry]:
    return [AuditEntry(**r) for r in store.audit_log(key_id, limit)]
