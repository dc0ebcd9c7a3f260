"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
try:  # not installed (development checkout): use the source tree
    import ennclave  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))


@pytest.fixture
def enclave_bundle(tmp_path):
    """A sealed 2-layer dense bundle (public=None) with its key in a tmp keystore."""
    from support.enclave_bundle import write_bundle

    return write_bundle(tmp_path / "bundle", tmp_path / "keystore.json")


@pytest.fixture
def make_enclave_bundle(tmp_path):
    """Factory: make_enclave_bundle(name, policy=..., seed=...) -> enclave_bundle.Bundle."""
    from support.enclave_bundle import write_bundle

    def make(name: str = "b", **kw):
        return write_bundle(tmp_path / name, tmp_path / "keystore.json", **kw)

    return make


# ------------------------------------------------------------------ worker platform

# `ENNCLAVE_TEST_PLATFORM=gramine-direct python -m pytest tests/test_worker_e2e.py` runs
# the end-to-end suite a second time with every worker under gramine-direct (the
# README's test command does): each WorkerClient the tests make starts there.
TEST_PLATFORM = os.environ.get("ENNCLAVE_TEST_PLATFORM", "native")


@pytest.fixture(scope="session", autouse=TEST_PLATFORM != "native")
def _workers_on_test_platform(tmp_path_factory):
    if TEST_PLATFORM == "native":
        yield
        return
    from ennclave.runtime import gramine
    from ennclave.runtime import worker as wmod

    directory = tmp_path_factory.mktemp("gramine-worker")
    gramine.write_manifest(directory, wmod.find_worker_binary())
    original = wmod.WorkerClient.__init__
    moved: list[int] = []

    def on_platform(self, *args, **kwargs):
        if kwargs.get("platform", "native") == "native":  # EnclavedModel passes it
            kwargs["platform"] = TEST_PLATFORM
            kwargs["gramine_dir"] = kwargs.get("gramine_dir") or directory
            moved.append(1)
        original(self, *args, **kwargs)

    wmod.WorkerClient.__init__ = on_platform
    yield
    wmod.WorkerClient.__init__ = original
    assert moved, f"ENNCLAVE_TEST_PLATFORM={TEST_PLATFORM}: no test started a worker there"


# ------------------------------------------------------------------ key-server databases


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server for the whole session (tests/support/postgres.py), or
    a skip saying why there is none — a failure under CI (env CI set), where
    .ci/run installs PostgreSQL and a missing one must not pass silently."""
    import os

    from support.postgres import PostgresServer, unavailable_reason

    why = unavailable_reason()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs PostgreSQL for the key-server tests: {why}", pytrace=False)
        pytest.skip(why)
    server = PostgresServer.find()
    assert server is not None
    server.start()
    yield server
    server.stop()


KEYSERVER_BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(params=KEYSERVER_BACKENDS)
def keyserver_db(request, tmp_path):
    """A fresh, empty key-server database: a SQLite file, or a new database on the
    session's PostgreSQL server (a SQLAlchemy URL)."""
    if request.param == "sqlite":
        return str(tmp_path / "keys.db")
    return request.getfixturevalue("postgres").create_database()


@pytest.fixture
def keyserver(tmp_path, monkeypatch, keyserver_db):
    """A key server process on `keyserver_db`, with the owner config and the client
    cache in tmp dirs and no rate limit."""
    from support.keyserver_util import KeyServerProc

    cfg = tmp_path / "cfg"
    monkeypatch.setenv("ENNCLAVE_CONFIG_DIR", str(cfg))
    monkeypatch.setenv("ENNCLAVE_CACHE_DIR", str(tmp_path / "keycache"))
    ks = KeyServerProc(keyserver_db, cfg, extra=["--rate", "0"]).start()
    yield ks
    ks.stop()
