"""``POST /v1/usage``: a worker's final usage report of a metered licence, relayed by its
host (docs/key-release.md "Metered budgets"). No token: the report authenticates under
a key derived from the bundle's data key (`licence.check_usage`), which only the worker
that unwrapped it and the key server hold.

Each licence's report counts once (`Store.report_usage`: a replay is refused and
credits nothing), never for more than its slice, and credits back what the slice did
not use. Every outcome is audited; reports that do not authenticate (anyone can send
them) through `JunkAudit`."""

from __future__ import annotations

import base64
import binascii
import sys

from fastapi import APIRouter, Request
from sqlalchemy.exc import SQLAlchemyError

from ..licence import check_usage
from ..schemas import ERRORS, Refusal, UsageRequest, UsageResponse
from ..state import JunkDep, StoreDep, peer
from ..store import audit_row

router = APIRouter()

REFUSALS = {
    "unknown_licence": (
        404,
        "No slice of this key's budget was handed out under this licence id.",
    ),
    "replayed": (409, "This licence's usage was already reported; nothing more is credited."),
    "exceeds_slice": (
        422,
        "The report claims more samples than the licence's slice; nothing is credited.",
    ),
}


@router.post("/v1/usage", response_model=UsageResponse, responses=ERRORS)
def usage(body: UsageRequest, req: Request, store: StoreDep, junk: JunkDep) -> UsageResponse:
    ctx = {"key_id": body.key_id, "peer": peer(req)}

    def refuse(status: int, code: str, reason: str) -> Refusal:
        try:
            if junk.admit(ctx["peer"], code, ctx):
                store.append_audit(audit_row("usage", "refused", code, detail=reason, **ctx))
        except SQLAlchemyError as e:
            print(f"ennclave keyserver: audit failed: {e!r}", file=sys.stderr, flush=True)
        return Refusal(status, code, reason)

    try:
        raw = base64.b64decode(body.report, validate=True)
        mac = base64.b64decode(body.mac, validate=True)
    except (binascii.Error, ValueError):
        raise refuse(400, "bad_request", "The usage report or its MAC is not base64.") from None
    got = store.load_for_release(body.key_id)
    if got is None:
        raise refuse(404, "unknown_bundle", "No key is registered under this key id.")
    _rec, data_key = got
    try:
        rep = check_usage(data_key, body.key_id, raw, mac)
    except ValueError as e:
        raise refuse(403, "usage_invalid", f"{str(e).capitalize()}; it is ignored.") from None
    finally:
        del data_key
    row = audit_row("usage", "done", "credited", licence_id=rep.licence_id[:32], **ctx)
    out = store.report_usage(body.key_id, rep.licence_id, rep.used, row)
    if out.outcome != "credited":
        status, reason = REFUSALS[out.outcome]
        raise Refusal(status, out.outcome, reason)
    return UsageResponse(
        licence_id=rep.licence_id, used=rep.used, credited=out.credited, budget_left=out.key_left
    )
