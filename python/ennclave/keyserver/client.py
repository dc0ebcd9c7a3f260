"""HTTP client for the key server: owner calls and the host's key-release relay.

`KeyserverRelease` is a `KeyRelease` for `WorkerClient`: it asks the server for a
nonce, has the worker answer a CHALLENGE for exactly that nonce, relays HELLO and
EVIDENCE to the server and hands the server's HPKE-wrapped key to the worker unchanged.
The host never sees the data key. The licence that comes with the key goes to the
worker (LICENCE frame), which verifies its MAC and enforces expiry and query budget; a
copy is kept in `.licence` for the host's own check (docs/key-release.md). With an
offline licence the worker's sealed key cache is stored (`cache`) and used when the key
server cannot be reached.

Metered keys (docs/key-release.md "Metered budgets"): the licence's `query_budget` is
one slice of the key's total. When the worker stops in order it sends a usage report
(authenticated under the data key), which `report_usage` relays to the key server
(``POST /v1/usage``); if the server cannot be reached the report waits in
`<cache dir>/usage-pending/<key_id>.json` and is sent before the next release.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any

from ..errors import EnnclaveError, LicenceError
from . import cache
from .licence import Licence

__all__ = [
    "KeyReleaseRefused",
    "KeyServerClient",
    "KeyServerUnreachable",
    "KeyserverRelease",
    "LicenceError",
    "client_id",
]


class KeyServerUnreachable(EnnclaveError):
    """The key server cannot be reached."""


class KeyReleaseRefused(EnnclaveError):
    """The key server refused (4xx): `code` is its machine-readable reason."""

    def __init__(self, message: str, code: str, status: int) -> None:
        super().__init__(message)
        self.code, self.status = code, status


def client_id() -> str:
    """A stable, self-reported id of this machine and user (not a secret, not proof)."""
    mid = b""
    for p in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            mid = open(p, "rb").read().strip()
            break
        except OSError:
            continue
    return hashlib.sha256(
        b"ennclave client v1\x00" + mid + b"\x00" + str(os.getuid()).encode()
    ).hexdigest()


class KeyServerClient:
    """Owner calls and key requests to one key server or several replicas: `url` may
    name several (comma-separated, or a list), tried in order. A call that cannot
    connect goes to the next URL, and the client stays with the first that answers;
    a request already sent is repeated elsewhere only where that is harmless (GET,
    challenges), never for a release or an owner change."""

    def __init__(
        self, url: str | list[str], token: str | None = None, timeout: float = 10.0
    ) -> None:
        from .config import split_urls

        self.urls = split_urls(url)
        if not self.urls:
            raise EnnclaveError("No key-server URL was given.")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout
        self._http: dict[str, Any] = {}
        self._at = 0  # index of the URL that answered last

    @property
    def url(self) -> str:
        return self.urls[self._at]

    def __repr__(self) -> str:  # never show the token
        return f"KeyServerClient({','.join(self.urls)!r})"

    def close(self) -> None:
        for http in self._http.values():
            http.close()
        self._http.clear()

    def __enter__(self) -> KeyServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _client_for(self, url: str) -> Any:
        import httpx

        if url not in self._http:
            self._http[url] = httpx.Client(
                base_url=url, headers=self._headers, timeout=self._timeout
            )
        return self._http[url]

    def _send(self, method: str, path: str, repeatable: bool, **kw: Any) -> Any:
        import httpx

        failed: list[str] = []
        for k in range(len(self.urls)):
            i = (self._at + k) % len(self.urls)
            try:
                r = self._client_for(self.urls[i]).request(method, path, **kw)
            except httpx.TransportError as e:
                failed.append(f"{self.urls[i]} ({type(e).__name__})")
                sent = not isinstance(e, httpx.ConnectError | httpx.ConnectTimeout)
                if sent and not repeatable:
                    break  # it may have been acted on: not repeated on another replica
                continue
            self._at = i
            return r
        where = failed[0] if len(failed) == 1 else "; ".join(failed)
        raise KeyServerUnreachable(
            f"The key server at {where} cannot be reached; check the URL and that the server runs."
        )

    def _call(self, method: str, path: str, *, repeatable: bool = False, **kw: Any) -> Any:
        r = self._send(method, path, repeatable or method == "GET", **kw)
        if r.status_code >= 400:
            try:
                body = r.json()
                code, reason = str(body.get("error", "error")), str(body.get("reason", ""))
            except ValueError:
                code, reason = "error", r.text[:200]
            reason = reason.rstrip(".")
            raise KeyReleaseRefused(
                f"The key server refused ({r.status_code} {code}): {reason}.", code, r.status_code
            )
        return r.json()

    # -- owner ----------------------------------------------------------------

    def register(
        self,
        key_id: str,
        key: bytes,
        manifest_sha256: str | None = None,
        policy: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body = {
            "key_id": key_id,
            "key": base64.b64encode(key).decode(),
            "manifest_sha256": manifest_sha256,
            "policy": policy or {},
        }
        return self._call("POST", "/v1/keys", json=body)

    def list(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/keys")

    def get(self, key_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/keys/{key_id}")

    def set_policy(self, key_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        return self._call("PATCH", f"/v1/keys/{key_id}/policy", json=changes)

    def revoke(self, key_id: str, reason: str = "revoked by the owner") -> dict[str, Any]:
        return self._call("POST", f"/v1/keys/{key_id}/revoke", json={"reason": reason})

    def audit(self, key_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if key_id:
            params["key_id"] = key_id
        return self._call("GET", "/v1/audit", params=params)

    # -- key requests (no token) ------------------------------------------------

    def challenge(self, key_id: str) -> bytes:
        body = self._call("POST", "/v1/challenge", repeatable=True, json={"key_id": key_id})
        return bytes.fromhex(body["nonce"])

    def release(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/v1/release", json=body)

    def usage(self, key_id: str, report: bytes, mac: bytes) -> dict[str, Any]:
        """Relay a worker's usage report. Safe to repeat on another replica: a licence's
        report counts once."""
        b64 = lambda b: base64.b64encode(b).decode()
        body = {"key_id": key_id, "report": b64(report), "mac": b64(mac)}
        return self._call("POST", "/v1/usage", repeatable=True, json=body)


@dataclass
class ReleasedLicence:
    raw: bytes
    mac: bytes
    licence: Licence
    used: int = 0
    # What this client may still get from the key server after this licence's slice
    # (None: not metered, or not said).
    budget_left: int | None = None

    @property
    def left(self) -> int | None:
        """Samples left under this licence (None: no budget)."""
        b = self.licence.query_budget
        return None if b is None else max(0, b - self.used)


class KeyserverRelease:
    """`key_release` for `WorkerClient` in key-server mode (see module docstring).

    Call `bind(worker_client)` before the handshake: the relay needs to send the
    server's nonce to the worker as a CHALLENGE."""

    def __init__(
        self, url: str, key_id: str, manifest_sha256: str, *, timeout: float = 10.0
    ) -> None:
        self.url, self.key_id, self.manifest_sha256 = url, key_id, manifest_sha256
        self.timeout = timeout
        self.licence: ReleasedLicence | None = None
        self._worker: Any = None

    def __repr__(self) -> str:
        return f"KeyserverRelease({self.url!r}, key_id={self.key_id!r})"

    def bind(self, worker: Any) -> None:
        self._worker = worker

    def spend(self, samples: int, now: float | None = None) -> None:
        """Host-side licence check before each batch (expiry, query budget): defence in
        depth and early, clear errors. The worker enforces the same licence itself
        (docs/key-release.md), so a host that skips this check gains nothing."""
        from ..errors import QueryBudgetExhausted

        held = self.licence
        if held is None:
            return
        lic = held.licence
        if (time.time() if now is None else now) >= lic.expires_at:
            raise LicenceError(
                f"The licence for key {lic.key_id} expired at {lic.expires_at} (Unix time); "
                "restart to ask the key server for a new one.",
                12,
            )
        if lic.query_budget is not None and held.used + samples > lic.query_budget:
            if held.budget_left == 0:
                raise QueryBudgetExhausted(
                    f"The licence's query budget of {lic.query_budget} samples is exhausted "
                    f"({held.used} used) and the key server has no more of the key's query "
                    "budget for this client; ask the model owner to raise it.",
                    4,
                    False,
                )
            raise QueryBudgetExhausted(
                f"The licence's query budget of {lic.query_budget} samples is exhausted "
                f"({held.used} used); ask the model owner for a new licence.",
                4,
                False,
            )
        held.used += samples

    @property
    def renewable(self) -> bool:
        """Whether a new release may bring another slice: the licence is metered and
        the key server said this client had more after it."""
        held = self.licence
        return held is not None and bool(held.budget_left)

    def report_usage(self, report: bytes, mac: bytes) -> None:
        """The worker's final usage report (`WorkerClient` at close or restart): sent
        to the key server, or kept pending when it cannot be reached."""
        pending = [*cache.load_usage(self.key_id), (report, mac)]
        cache.store_usage(self.key_id, self._send_usage(pending))

    def _send_usage(self, reports: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """Send each report; returns those still pending (the server was unreachable).
        A refused report (a replay, or one that does not authenticate) is dropped:
        sending it again would not change the answer."""
        if not reports:
            return []
        left: list[tuple[bytes, bytes]] = []
        with KeyServerClient(self.url, timeout=self.timeout) as ks:
            for i, (report, mac) in enumerate(reports):
                try:
                    ks.usage(self.key_id, report, mac)
                except KeyServerUnreachable:
                    left = reports[i:]
                    break
                except KeyReleaseRefused:
                    continue
        return left

    def flush_usage(self) -> None:
        """Send the reports left pending by earlier runs (before a new release)."""
        pending = cache.load_usage(self.key_id)
        if pending:
            cache.store_usage(self.key_id, self._send_usage(pending))

    def store_key_cache(self, key_id: str, blob: bytes) -> None:
        """The worker's KEY_CACHE (offline licence): keep it with the licence."""
        held = self.licence
        if held is None or key_id != self.key_id or not held.licence.offline:
            return
        cache.store(key_id, blob, held.raw, held.mac)

    def _from_cache(self, unreachable: KeyServerUnreachable) -> Any:
        from ..seal import CachedKey

        c = cache.load(self.key_id)
        if c is None:
            raise unreachable
        try:
            lic = Licence.from_bytes(c["licence"])
        except (ValueError, TypeError):
            raise unreachable from None
        # The host's copy (for its own check); the worker checks the sealed one.
        self.licence = ReleasedLicence(c["licence"], c["licence_mac"], lic)
        return CachedKey(self.key_id, c["blob"])

    def __call__(self, hello: Any) -> Any:
        from ..seal import WrappedKey

        if self._worker is None:
            raise EnnclaveError("KeyserverRelease is not bound to a worker; this is a bug.")
        self.licence = None
        self.flush_usage()  # what earlier workers used, before the next slice is charged
        with KeyServerClient(self.url, timeout=self.timeout) as ks:
            try:
                nonce = ks.challenge(self.key_id)
            except KeyServerUnreachable as e:
                # Only when unreachable (never after a refusal): the offline key cache.
                return self._from_cache(e)
            got = self._worker.evidence_for(nonce)
            kind, report = got.kind, got.report
            try:
                resp = ks.release(
                    {
                        "key_id": self.key_id,
                        "nonce": nonce.hex(),
                        "pubkey": hello.pubkey.hex(),
                        "binary_sha256": hello.binary_sha256,
                        "manifest_sha256": self.manifest_sha256,
                        "client_id": client_id(),
                        "evidence": {
                            "kind": "software" if kind == "none" else kind,
                            "report": base64.b64encode(report).decode(),
                        },
                        "protections": got.protections.decode(),
                    }
                )
            except KeyReleaseRefused as e:
                if e.code != "software_not_allowed":
                    raise
                raise KeyReleaseRefused(
                    f"The key server {ks.url} refused key {self.key_id} to this worker: it "
                    "runs without a TEE and the key's policy does not allow software workers; "
                    "the owner can allow them with `ennclave keys policy "
                    f"{self.key_id} --allow-software --keyserver {ks.url}`.",
                    e.code,
                    e.status,
                ) from None
        raw, mac = base64.b64decode(resp["licence"]), base64.b64decode(resp["licence_mac"])
        lic = Licence.from_bytes(raw)
        self.licence = ReleasedLicence(raw, mac, lic, budget_left=resp.get("budget_left"))
        if not lic.offline:
            cache.remove(self.key_id)  # the owner no longer allows offline use
        return WrappedKey(
            resp["key_id"],
            base64.b64decode(resp["enc"]),
            base64.b64decode(resp["wrapped"]),
            licence=raw,
            licence_mac=mac,
        )
