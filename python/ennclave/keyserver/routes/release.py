"""Key requests: ``POST /v1/challenge`` hands out a single-use nonce, ``POST /v1/release``
releases a bundle's data key, HPKE-wrapped to the worker's ephemeral key, with a licence.
No token: the evidence and the policy decide. Every decision goes to the audit log.

`release` runs its stages in this order, each refusing with its own code: the nonce,
the registered key, `check_policy` (revoked, expired), `validate_pubkey` (malformed or
low-order X25519 keys), `validate_evidence` and `issue_licence`; only then `Store.grant`
admits the client (`max_clients`), charges a slice of a metered budget (nothing left:
``budget_spent``) and appends the grant's audit row in one transaction, and `wrap_key`
wraps the key and MACs the licence, whose `query_budget` is that slice. Nothing is admitted for a request that is refused or fails; any
unexpected failure is an audited 500 (or 503 when the database is unavailable) with a
reason. Refusals without a valid nonce (anyone can send them) are audited through
`JunkAudit`, which sums a flood into one row per peer and reason and window."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

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
from ..state import JunkAudit, JunkDep, NoncesDep, ServerSettings, SettingsDep, StoreDep, peer
from ..store import BundleRecord, NonceLimit, Slice, Store, audit_row, spent_reason

router = APIRouter()

# Refusals that need no valid nonce: audited through `JunkAudit`.
JUNK = frozenset({"nonce_invalid"})
X25519_P = 2**255 - 19
# Any scalar finds a low-order point (the clamped scalar is a multiple of the cofactor);
# the exchange's result is thrown away, so one key per process will do.
_TRIAL_KEY = X25519PrivateKey.generate()


@router.post("/v1/challenge", response_model=ChallengeResponse, responses=ERRORS)
def challenge(
    body: ChallengeRequest, req: Request, nonces: NoncesDep, settings: SettingsDep
) -> ChallengeResponse | JSONResponse:
    try:
        nonce = nonces.issue(body.key_id, peer(req))
    except NonceLimit as e:
        if e.scope == "peer":
            raise Refusal(
                429,
                "too_many_challenges",
                "This client has too many outstanding challenges; use or let them expire.",
            ) from None
        raise Refusal(503, "busy", "The key server has too many outstanding challenges.") from None
    except SQLAlchemyError:
        raise Refusal(503, "store_unavailable", STORE_DOWN) from None
    # a ChallengeResponse, sent as is
    return JSONResponse({"nonce": nonce.hex(), "expires_in": settings.nonce_ttl})


STORE_DOWN = "The key server's database is unavailable; try again shortly."


@router.post("/v1/release", response_model=ReleaseResponse, responses=ERRORS)
def release(
    body: ReleaseRequest,
    req: Request,
    store: StoreDep,
    settings: SettingsDep,
    junk: JunkDep,
) -> ReleaseResponse | JSONResponse:
    log = ReleaseLog.of(store, junk, body, req)
    try:
        return _release(body, store, settings, log)
    except Refusal:
        raise
    except SQLAlchemyError as e:
        print(f"ennclave keyserver: release failed: {e!r}", file=sys.stderr, flush=True)
        raise log.refuse(503, "store_unavailable", STORE_DOWN) from None
    except Exception as e:  # never a silent 500: audited, with a reason
        print(f"ennclave keyserver: release failed: {e!r}", file=sys.stderr, flush=True)
        if log.nonce is None and log.spent is False:  # failed before it was looked at
            log.nonce = bytes.fromhex(body.nonce)  # spent with the audit row
        raise log.refuse(
            500,
            "internal_error",
            f"The key server failed on this request ({type(e).__name__}); nothing was "
            "released and the failure is in the audit log.",
        ) from None


def _release(
    body: ReleaseRequest,
    store: Store,
    settings: ServerSettings,
    log: ReleaseLog,
) -> ReleaseResponse | JSONResponse:
    nonce = bytes.fromhex(body.nonce)
    start = store.open_release(body.key_id, nonce)
    if start.nonce_outstanding:
        log.nonce = nonce  # from here on, every outcome spends it
    else:
        log.spent = True  # nothing to spend
    if not start.nonce_valid:
        raise log.refuse(
            403,
            "nonce_invalid",
            "The nonce is unknown, expired, already used or for another key; ask for a new challenge.",
        )
    rec = start.bundle
    if rec is None:
        raise log.refuse(404, "unknown_bundle", "No key is registered under this key id.")
    data_key = store.unseal(body.key_id, start.sealed_key)
    try:
        now = check_policy(rec, log)
        validate_pubkey(bytes.fromhex(body.pubkey), log)
        claim, verified = validate_evidence(body, rec, settings, log)
        lic = issue_licence(body, rec.policy, verified, log, now)
        got: list[Slice] = []
        outcome = store.grant(
            body.key_id,
            log.client_id,
            rec.policy.max_clients,
            log.grant(verified, lic),
            nonce=nonce,
            refused={code: log.row("refused", code, why) for code, why in REASONS.items()},
            slice_out=got,
        )
        log.nonce, log.spent = None, True  # spent, and the outcome audited, in that transaction
        if outcome == "budget_spent":
            raise Refusal(403, outcome, spent_reason(body.key_id, got[-1]))
        if outcome != "granted":
            raise Refusal(403, outcome, REASONS[outcome])
        charged = got[-1] if got else Slice(None)
        if charged.size is not None:  # metered: the licence carries its slice, never offline
            lic = dataclasses.replace(lic, query_budget=charged.size, offline=False)
        enc, wrapped, mac = wrap_key(claim, data_key, lic)
    finally:
        del data_key, start
    b64 = lambda b: base64.b64encode(b).decode()
    # a ReleaseResponse, sent as is (not validated a second time on the way out)
    return JSONResponse(
        {
            "key_id": body.key_id,
            "enc": b64(enc),
            "wrapped": b64(wrapped),
            "licence": b64(lic.to_bytes()),
            "licence_mac": b64(mac),
            "evidence": verified.kind,
            "software": not verified.hardware,
            "expires_at": lic.expires_at,
            "query_budget": lic.query_budget,
            "budget_left": charged.left,
        }
    )


REASONS = {
    "too_many_clients": "The bundle's maximum number of clients is reached.",
    "nonce_invalid": "The nonce was used by another request at the same time; ask for a new "
    "challenge.",
    "budget_spent": "The key's query budget is spent; ask the owner to raise it.",
}


# ------------------------------------------------------------------ stages of a release


@dataclass
class ReleaseLog:
    """The audit trail of one release request: each refusal, or the grant, is appended
    with the same context (key, client, peer, evidence kind, binary). While `nonce` is
    set (the request's nonce is outstanding), a refusal also spends it, in the same
    transaction."""

    store: Store
    junk: JunkAudit
    ctx: dict[str, Any]
    nonce: bytes | None = None
    spent: bool = False  # the nonce was spent (or found absent) and the outcome recorded

    @classmethod
    def of(cls, store: Store, junk: JunkAudit, body: ReleaseRequest, req: Request) -> ReleaseLog:
        return cls(
            store,
            junk,
            {
                "key_id": body.key_id,
                "client_id": body.client_id.lower(),
                "peer": peer(req),
                "evidence": body.evidence.kind[:32],
                "binary_sha256": body.binary_sha256.lower(),
            },
        )

    @property
    def client_id(self) -> str:
        return self.ctx["client_id"]

    def row(self, decision: str, reason: str, detail: str, **kw: Any) -> dict[str, Any]:
        return audit_row("release", decision, reason, detail=detail, **self.ctx, **kw)

    def refuse(self, status: int, code: str, reason: str) -> Refusal:
        """Log the refusal; the caller raises what this returns. When the database
        itself fails, the answer still says why (503), unaudited: there is nowhere to
        write."""
        try:
            audited = code not in JUNK or self.junk.admit(self.ctx["peer"], code, self.ctx)
            row = self.row("refused", code, reason) if audited else None
            if self.nonce is not None:
                self.store.spend_nonce(self.nonce, row)
                self.nonce = None
                self.spent = True
            elif row is not None:
                self.store.append_audit(row)
        except SQLAlchemyError as e:
            print(f"ennclave keyserver: audit failed: {e!r}", file=sys.stderr, flush=True)
            return Refusal(503, "store_unavailable", STORE_DOWN)
        return Refusal(status, code, reason)

    def grant(self, verified: ev.Verified, lic: Licence) -> dict[str, Any]:
        """The grant's audit row (appended by `Store.grant` with the admission). For
        hardware evidence it records what the policy accepted: the evidence kind, the
        measurements and the TCB status (docs/attestation.md); for every kind, the
        protections the worker reported (docs/key-release.md "Protections")."""
        detail = f"licence until {lic.expires_at}"
        if verified.hardware:
            accepted = {
                "kind": verified.kind,
                "measurements": verified.measurements,
                "tcb_status": verified.tcb_status,
            }
            detail += "; accepted " + json.dumps(accepted, sort_keys=True, separators=(",", ":"))
        if verified.protections is not None:
            detail += "; protections " + ev.canonical_json(verified.protections).decode()
        return self.row(
            "granted",
            "software" if not verified.hardware else "hardware",
            detail,
            licence_id=lic.licence_id,
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
        None if body.protections is None else body.protections.encode(),
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


def validate_pubkey(pub: bytes, log: ReleaseLog) -> None:
    """The worker's ephemeral X25519 key must be a canonical encoding (u < p once the
    top bit is masked, RFC 7748) of a point outside the small subgroup: a low-order key
    (the all-zero one among them) makes every shared secret zero, and the HPKE wrap
    would fail or be worthless. A trial exchange with a throw-away key finds every
    low-order point (`cryptography` refuses an all-zero shared secret)."""
    u = int.from_bytes(pub, "little") & ((1 << 255) - 1)
    if len(pub) != 32 or u >= X25519_P:
        raise log.refuse(
            400, "bad_pubkey", "The worker's public key is not a canonical X25519 key."
        )
    try:
        _TRIAL_KEY.exchange(X25519PublicKey.from_public_bytes(pub))
    except ValueError:
        raise log.refuse(
            400, "bad_pubkey", "The worker's public key is a low-order X25519 point."
        ) from None


def issue_licence(
    body: ReleaseRequest, pol: ev.Policy, verified: ev.Verified, log: ReleaseLog, now: int
) -> Licence:
    """The licence, before its budget: a metered key's slice is set once `Store.grant`
    has charged it; an unmetered key's licences carry no budget."""
    expires = now + pol.licence_ttl
    if pol.expires_at is not None:
        expires = min(expires, pol.expires_at)
    return Licence.new(
        key_id=body.key_id,
        issued_at=now,
        expires_at=expires,
        query_budget=None,
        pubkey=body.pubkey.lower(),
        binary_sha256=verified.binary_sha256,
        client_id=log.client_id,
        offline=pol.offline and not pol.metered,  # a cache would restart a metered budget
        evidence=verified.kind,
    )


def wrap_key(claim: ev.Claim, data_key: bytes, lic: Licence) -> tuple[bytes, bytes, bytes]:
    """HPKE-wrap the data key to the worker's ephemeral key and MAC the licence under it:
    (enc, wrapped, licence_mac)."""
    wk = wrap_data_key(claim.pubkey, data_key, lic.key_id)
    return wk.enc, wk.wrapped, licence_mac(data_key, lic)
