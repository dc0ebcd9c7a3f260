"""HTTP client for the key server: owner calls and the host's key-release relay.

`KeyserverRelease` is a `KeyRelease` for `WorkerClient`: it asks the server for a
nonce, has the worker answer a CHALLENGE for exactly that nonce, relays HELLO and
EVIDENCE to the server and hands the server's HPKE-wrapped key to the worker unchanged.
The host never sees the data key. The licence that comes with the key is kept in
`.licence` (the worker checks its MAC and enforces it, see docs/key-release.md).
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any

from ..errors import EnnclaveError
from .licence import Licence


class LicenceError(EnnclaveError):
    """The licence of the released key does not allow this (expired)."""


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
    return hashlib.sha256(b"ennclave client v1\x00" + mid + b"\x00" + str(os.getuid()).encode()).hexdigest()


class KeyServerClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __repr__(self) -> str:  # never show the token
        return f"KeyServerClient({self.url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KeyServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise KeyServerUnreachable(
                f"The key server at {self.url} cannot be reached ({type(e).__name__}); check "
                "the URL and that the server runs."
            ) from None
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
        return bytes.fromhex(self._call("POST", "/v1/challenge", json={"key_id": key_id})["nonce"])

    def release(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/v1/release", json=body)


@dataclass
class ReleasedLicence:
    raw: bytes
    mac: bytes
    licence: Licence
    used: int = 0


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
        """Host-side licence check before each batch (expiry, query budget). The worker
        enforces the same licence where it supports licences (docs/key-release.md);
        this check gives the same clear errors either way."""
        from ..errors import QueryBudgetExhausted

        held = self.licence
        if held is None:
            return
        lic = held.licence
        if (time.time() if now is None else now) >= lic.expires_at:
            raise LicenceError(
                f"The licence for key {lic.key_id} expired at {lic.expires_at} (Unix time); "
                "restart to ask the key server for a new one."
            )
        if lic.query_budget is not None and held.used + samples > lic.query_budget:
            raise QueryBudgetExhausted(
                f"The licence's query budget of {lic.query_budget} samples is exhausted "
                f"({held.used} used); ask the model owner for a new licence.",
                4,
                False,
            )
        held.used += samples

    def __call__(self, hello: Any) -> Any:
        from ..runtime.worker import WrappedKey

        if self._worker is None:
            raise EnnclaveError("KeyserverRelease is not bound to a worker; this is a bug.")
        with KeyServerClient(self.url, timeout=self.timeout) as ks:
            nonce = ks.challenge(self.key_id)
            kind, report = _evidence_for(self._worker, nonce)
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
                }
            )
        raw, mac = base64.b64decode(resp["licence"]), base64.b64decode(resp["licence_mac"])
        self.licence = ReleasedLicence(raw, mac, Licence.from_bytes(raw))
        return WrappedKey(resp["key_id"], base64.b64decode(resp["enc"]), base64.b64decode(resp["wrapped"]))


def _evidence_for(worker: Any, nonce: bytes) -> tuple[str, bytes]:
    """Send CHALLENGE{nonce} to the worker (during its handshake) and return its EVIDENCE
    (kind, report). Uses `WorkerClient.evidence_for` where the runtime has it."""
    if hasattr(worker, "evidence_for"):
        return worker.evidence_for(nonce)
    from ..errors import WorkerError
    from ..runtime import worker as w

    worker._send(w._frame(w.CHALLENGE, nonce))
    ty, p = worker._recv()
    if ty != w.EVIDENCE:
        raise worker._unexpected(ty, p, "EVIDENCE")
    r = w._Reader(p)
    got, kind, report = r.take(32), r.str_(), r.bytes_()
    if got != nonce:
        raise WorkerError("The enclave worker answered a different challenge.", w.E_PROTOCOL, True)
    return kind, report
