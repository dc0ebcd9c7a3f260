"""A real key server in a subprocess on 127.0.0.1 (free port) for tests and benchmarks."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class KeyServerProc:
    db: str
    config_dir: Path
    port: int = field(default_factory=free_port)
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        pp = str(REPO / "python") + os.pathsep + os.environ.get("PYTHONPATH", "")
        return dict(os.environ, ENNCLAVE_CONFIG_DIR=str(self.config_dir), PYTHONPATH=pp)

    @property
    def token(self) -> str:
        """This server's saved owner token (the config holds one entry per URL)."""
        saved = json.loads((self.config_dir / "keyserver-owner.json").read_text())
        if "servers" not in saved:  # the first version of the file: one server
            return saved["token"]
        return saved["servers"][self.url]["token"]

    @property
    def sqlite(self) -> bool:
        return "://" not in self.db

    @property
    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "ennclave",
            "keyserver",
            "--db",
            self.db,
            "--port",
            str(self.port),
            *self.extra,
        ]

    def start(self, timeout: float = 30.0) -> KeyServerProc:
        argv = self.argv
        self.log = open(self.config_dir.parent / f"keyserver-{self.port}.log", "ab")
        self.proc = subprocess.Popen(argv, env=self.env, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"key server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/v1/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("key server did not come up")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None


class SoftwareWorker:
    """What a worker sends for a key release with software evidence, computed in
    Python: its own X25519 key pair; `release` runs challenge + release over HTTP."""

    def __init__(self, client_id: str = "ab" * 32) -> None:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        self.sk = X25519PrivateKey.generate()
        self.pub = self.sk.public_key().public_bytes_raw()
        self.binsha = hashlib.sha256(b"a worker binary").digest()
        self.client_id = client_id

    def body(
        self, key_id: str, nonce: bytes, manifest: str, pub: bytes | None = None, **over: Any
    ) -> dict[str, Any]:
        """A release request; `pub` replaces the worker's own key (the evidence binds
        whichever key is sent: software evidence is computable by anyone)."""
        from ennclave.keyserver.evidence import evidence_hash

        pub = self.pub if pub is None else pub
        report = evidence_hash(nonce, pub, self.binsha)
        body: dict[str, Any] = {
            "key_id": key_id,
            "nonce": nonce.hex(),
            "pubkey": pub.hex(),
            "binary_sha256": self.binsha.hex(),
            "manifest_sha256": manifest,
            "client_id": self.client_id,
            "evidence": {"kind": "software", "report": base64.b64encode(report).decode()},
        }
        body.update(over)
        return body


def post(url: str, path: str, body: dict[str, Any], timeout: float = 20.0) -> tuple[int, Any]:
    """One JSON POST on a fresh connection: (status, decoded body)."""
    import httpx

    r = httpx.post(url + path, json=body, timeout=timeout)
    return r.status_code, r.json()


def challenge(url: str, key_id: str) -> bytes:
    status, body = post(url, "/v1/challenge", {"key_id": key_id})
    assert status == 200, body
    return bytes.fromhex(body["nonce"])


def release(
    url: str, key_id: str, manifest: str, worker: SoftwareWorker, nonce_url: str | None = None
) -> tuple[int, str]:
    """A whole key release (challenge on `nonce_url`, default `url`): (status, code),
    code "granted" on success."""
    nonce = challenge(nonce_url or url, key_id)
    status, body = post(url, "/v1/release", worker.body(key_id, nonce, manifest))
    return status, "granted" if status == 200 else body.get("error", "?")
