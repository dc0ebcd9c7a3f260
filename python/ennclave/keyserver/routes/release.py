"""Key requests: ``POST /v1/challenge`` hands out a single-use nonce, ``POST /v1/release``
releases a bundle's data key, HPKE-wrapped to the worker's ephemeral key, with a licence.
No token: the evidence and the policy decide. Every decision goes to the audit log.

`release` runs its stages in this order, each refusing with its own code: the nonce,
the registered key, `check_policy` (revoked, expired), `validate_evidence`,
`admit_client`, then `issue_licence`, `wrap_key` and the grant's audit entry."""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass

from fastapi import APIRouter, Request

from ...seal import wrap_data_key
from .. import evidence as ev
from ..licence import Licence, licence_mac
from ..schemas import (
    ERRORS,
    ChallengeRequest,
    ChallengeResponse,
    Refusal,
    ReleaseRequest,
    ReleaseResponse,
)
from ..state import NoncesDep, ServerSettings, SettingsDep, StoreDep, peer
from ..store import BundleRecord, Store

router = APIRouter()


@router.post("/v1/challenge", response_model=ChallengeResponse, responses=ERRORS)
def challenge(
    body: ChallengeRequest, nonces: NoncesDep, settings: SettingsDep
) -> ChallengeResponse:
    return ChallengeResponse(nonce=nonces.issue(body.key_id).hex(), expires_in=settings.nonce_ttl)


@router.post("/v1/release", response_model=ReleaseResponse, responses=ERRORS)
def release(
    body: ReleaseRequest,
    req: Request,
    store: StoreDep,
    settings: SettingsDep,
    nonces: NoncesDep,
) -> ReleaseResponse:
    log = ReleaseLog.of(store, body, req)
    if not nonces.consume(bytes.fromhex(body.nonce), body.key_id):
        raise log.refuse(
            403,
            "nonce_invalid",
            "The nonce is unknown, expired, already used or for another key; ask for a new challenge.",
        )
    loaded = store.load_for_release(body.key_id)
    if loaded is None:
        raise log.refuse(404, "unknown_bundle", "No key is registered under this key id.")
    rec, data_key = loaded
    try:
        now = check_policy(rec, log)
        claim, verified = validate_evidence(body, rec, settings, log)
        admit_client(store, body.key_id, rec.policy, log)
        lic = issue_licence(body, rec.policy, verified, log, now)
        enc, wrapped, mac = wrap_key(claim, data_key, lic)
    finally:
        del data_key
    log.granted(verified, lic)
    b64 = lambda b: base64.b64encode(b).decode()
    return ReleaseResponse(
        key_id=body.key_id,
        enc=b64(enc),
        wrapped=b64(wrapped),
        licence=b64(lic.to_bytes()),
        licence_mac=b64(mac),
        evidence=verified.kind,
        software=not verified.hardware,
        expires_at=lic.expires_at,
        query_budget=lic.query_budget,
    )


# ------------------------------------------------------------------ stages of a release


@dataclass
class ReleaseLog:
    """The audit trail of one release request: each refusal, or the grant, is appended
    with the same context (key, client, peer, evidence kind, binary)."""

    store: Store
    ctx: dict[str, str]

    @classmethod
    def of(cls, store: Store, body: ReleaseRequest, req: Request) -> ReleaseLog:
        return cls(
            store,
            {
                "key_id": body.key_id,
                "client_id": body.client_id.lower(),
                "peer": peer(req),
                "evidence": body.evidence.kind,
                "binary_sha256": body.binary_sha256.lower(),
            },
        )

    @property
    def client_id(self) -> str:
        return self.ctx["client_id"]

    def refuse(self, status: int, code: str, reason: str) -> Refusal:
        """Log the refusal; the caller raises what this returns."""
        self.store.audit("release", "refused", code, detail=reason, **self.ctx)
        return Refusal(status, code, reason)

    def granted(self, verified: ev.Verified, lic: Licence) -> None:
        self.store.audit(
            "release",
            "granted",
            "software" if not verified.hardware else "hardware",
            detail=f"licence until {lic.expires_at}",
            licence_id=lic.licence_id,
            **self.ctx,
        )


def check_policy(rec: BundleRecord, log: ReleaseLog) -> int:
    """Refuse a revoked or expired key; returns the time (s) the release is decided at."""
    if rec.revoked:
        raise log.refuse(403, "revoked", "The owner revoked this bundle's key.")
    now = int(time.time())
    pol = rec.policy
    if pol.expires_at is not None and now >= pol.expires_at:
        raise log.refuse(403, "expired", "This bundle's key has expired.")
    return now


def validate_evidence(
    body: ReleaseRequest, rec: BundleRecord, settings: ServerSettings, log: ReleaseLog
) -> tuple[ev.Claim, ev.Verified]:
    """Decode the report and verify the claim against the key's policy and manifest."""
    try:
        report = base64.b64decode(body.evidence.report, validate=True)
    except (binascii.Error, ValueError):
        raise log.refuse(400, "bad_request", "The evidence report is not base64.") from None
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
            claim,
            rec.policy,
            registered_manifest=rec.manifest_sha256,
            collateral=settings.collateral,
        )
    except ev.EvidenceRefused as e:
        raise log.refuse(403, e.code, str(e)) from None
    return claim, verified


def admit_client(store: Store, key_id: str, pol: ev.Policy, log: ReleaseLog) -> None:
    if not store.admit_client(key_id, log.client_id, pol.max_clients):
        raise log.refuse(
            403, "too_many_clients", "The bundle's maximum number of clients is reached."
        )


def issue_licence(
    body: ReleaseRequest, pol: ev.Policy, verified: ev.Verified, log: ReleaseLog, now: int
) -> Licence:
    expires = now + pol.licence_ttl
    if pol.expires_at is not None:
        expires = min(expires, pol.expires_at)
    return Licence.new(
        key_id=body.key_id,
        issued_at=now,
        expires_at=expires,
        query_budget=pol.query_budget,
        pubkey=body.pubkey.lower(),
        binary_sha256=verified.binary_sha256,
        client_id=log.client_id,
        offline=pol.offline,
        evidence=verified.kind,
    )


def wrap_key(claim: ev.Claim, data_key: bytes, lic: Licence) -> tuple[bytes, bytes, bytes]:
    """HPKE-wrap the data key to the worker's ephemeral key and MAC the licence under it:
    (enc, wrapped, licence_mac)."""
    wk = wrap_data_key(claim.pubkey, data_key, lic.key_id)
    return wk.enc, wk.wrapped, licence_mac(data_key, lic)
