"""A real key server in a subprocess on 127.0.0.1 (free port) for tests and benchmarks."""

from __future__ import annotations

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
        return saved["servers"][self.url]["token"]

    @property
    def sqlite(self) -> bool:
        return "://" not in self.db

    def start(self, timeout: float = 30.0) -> KeyServerProc:
        argv = [
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
