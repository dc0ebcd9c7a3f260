"""The key server's routes, one `APIRouter` per concern; `create_app` includes them in
this order.

* `health`  — ``GET /v1/health``.
* `release` — key requests: ``/v1/challenge``, ``/v1/release`` (no token; the evidence
              and the policy decide).
* `usage`   — ``/v1/usage``: workers' usage reports of metered licences (no token;
              the report's MAC decides).
* `admin`   — the owner's calls: ``/v1/keys…``, ``/v1/audit`` (owner token).
"""

from . import admin, health, release, usage

ROUTERS = (health.router, release.router, usage.router, admin.router)
