"""A real PostgreSQL server for tests and benchmarks: Debian's `postgresql` package,
`initdb` + `pg_ctl` into a temporary directory, listening on 127.0.0.1 (free port) and
on a Unix socket in that directory, stopped at the end.

PostgreSQL refuses to run as root (CI runs as root): then the cluster belongs to an
unprivileged system user (`postgres` from the Debian package, else `nobody`) and every
server command runs through `runuser -u USER --`.

`PostgresServer.find()` returns None when no PostgreSQL binaries are installed;
`unavailable_reason()` says why, for a skip (or, under CI, a failure).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .keyserver_util import free_port

SUPERUSER = "ennclave"


def find_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin holding initdb and pg_ctl (or $PG_BINDIR)."""
    env = os.environ.get("PG_BINDIR")
    candidates = [env] if env else []
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    versions.sort(key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    candidates += reversed(versions)
    for d in candidates:
        if d and (Path(d) / "initdb").is_file() and (Path(d) / "pg_ctl").is_file():
            return Path(d)
    return None


def _run_as() -> str | None:
    """The user the cluster runs as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a `postgres` nor a `nobody` user exists")


def unavailable_reason() -> str | None:
    """None when a server can be started here, else one sentence why not."""
    if find_bindir() is None:
        return (
            "PostgreSQL is not installed (Debian: apt-get install postgresql; no initdb/pg_ctl "
            "under /usr/lib/postgresql/*/bin)"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg driver is not installed (pip install 'ennclave[server]')"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without `runuser` to drop to an unprivileged user"
    return None


@dataclass
class PostgresServer:
    bindir: Path
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ennclave-pg-")))
    port: int = field(default_factory=free_port)
    user: str | None = field(default_factory=_run_as)
    # Durability settings: tests do not test PostgreSQL's crash safety, so fsync is off
    # there; the benchmark keeps PostgreSQL's defaults (durable=True).
    durable: bool = False
    _n: int = 0

    @classmethod
    def find(cls, **kw: object) -> PostgresServer | None:
        bindir = find_bindir()
        return None if bindir is None else cls(bindir, **kw)  # type: ignore[arg-type]

    @property
    def data(self) -> Path:
        return self.root / "data"

    def _cmd(self, *argv: str) -> list[str]:
        return ["runuser", "-u", self.user, "--", *argv] if self.user else list(argv)

    def _check(self, *argv: str, timeout: float = 120) -> None:
        r = subprocess.run(
            self._cmd(*argv), capture_output=True, text=True, timeout=timeout, cwd=self.root
        )
        if r.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")

    def start(self) -> PostgresServer:
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        os.chmod(self.root, 0o700)
        self._check(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-instructions",
            "--no-sync",
        )
        opts = [
            f"-p {self.port}",
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={self.root}",
            "-c max_connections=200",
            "-c shared_buffers=64MB",
        ]
        if not self.durable:
            opts += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._check(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-o",
            " ".join(opts),
            "-w",
            "-t",
            "60",
            "start",
        )
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 30.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.dsn("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run(
                self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"),
                capture_output=True,
                timeout=60,
                cwd=self.root,
            )
        shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, dbname: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={dbname}"

    def url(self, dbname: str) -> str:
        """A SQLAlchemy URL (the psycopg 3 driver) for one database."""
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, prefix: str = "ks") -> str:
        """A new, empty database; returns its SQLAlchemy URL."""
        import psycopg

        self._n += 1
        name = f"{prefix}_{os.getpid()}_{self._n}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
