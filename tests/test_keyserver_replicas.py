"""Two key-server processes (replicas) on one database — SQLite file or a real
PostgreSQL — racing each other: the audit hash chain stays intact, `max_clients` is
exact, and a nonce is single use across replicas. Before the state moved into the
database, two processes broke the chain ("broken at row 47"), granted 30 clients
against max_clients=3 or 1, and refused a nonce issued by the other replica."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from ennclave.keyserver.client import KeyServerClient
from ennclave.keyserver.store import Store
from support.keyserver_util import KeyServerProc, SoftwareWorker, challenge, post, release

MANIFEST = "cd" * 32


@pytest.fixture
def replicas(tmp_path, monkeypatch, keyserver_db):
    """Two server processes on one database and one owner config."""
    cfg = tmp_path / "cfg"
    monkeypatch.setenv("ENNCLAVE_CONFIG_DIR", str(cfg))
    a = KeyServerProc(keyserver_db, cfg, extra=["--rate", "0"]).start()
    b = KeyServerProc(keyserver_db, cfg, extra=["--rate", "0"])
    try:
        b.start()
        yield a, b
    finally:
        b.stop()
        a.stop()


def _register(server: KeyServerProc, key_id: str, **policy) -> None:
    with KeyServerClient(server.url, server.token) as c:
        c.register(key_id, os.urandom(32), MANIFEST, {"allow_software": True, **policy})


def _race(n: int, fn) -> list:
    """Run fn(i) for i < n on n threads released together."""
    gate = threading.Barrier(n)

    def go(i: int):
        gate.wait(timeout=30)
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(go, range(n)))


def test_two_replicas_grant_exactly_max_clients_and_keep_the_chain(replicas):
    a, b = replicas
    assert a.token == b.token  # the second replica saved the database's token for its URL
    _register(a, "k", max_clients=3)
    workers = [SoftwareWorker(client_id=f"{i:032x}") for i in range(24)]
    outcomes = _race(24, lambda i: release((a, b)[i % 2].url, "k", MANIFEST, workers[i]))
    granted = [i for i, (status, _code) in enumerate(outcomes) if status == 200]
    assert len(granted) == 3, outcomes
    assert {code for status, code in outcomes if status != 200} == {"too_many_clients"}
    # the admitted clients come back, on both replicas at once: all granted
    again = _race(12, lambda i: release((a, b)[i % 2].url, "k", MANIFEST, workers[granted[i % 3]]))
    assert all(status == 200 for status, _ in again), again
    with KeyServerClient(b.url, b.token) as c:
        assert c.get("k")["clients"] == 3
        log = c.audit("k", 1000)
    releases = [r for r in log if r["event"] == "release"]
    assert sum(r["decision"] == "granted" for r in releases) == 3 + 12
    assert sum(r["reason"] == "too_many_clients" for r in releases) == 21
    st = Store(a.db, b"\0" * 32)
    try:
        assert st.verify_audit_chain() == len(log) + 1  # + the owner token's row
    finally:
        st.close()


def test_a_nonce_is_single_use_across_replicas(replicas):
    a, b = replicas
    _register(a, "k")
    w = SoftwareWorker()
    # issued by one replica, accepted by the other, then spent on both
    assert release(b.url, "k", MANIFEST, w, nonce_url=a.url) == (200, "granted")
    nonce = challenge(a.url, "k")
    assert post(b.url, "/v1/release", w.body("k", nonce, MANIFEST))[0] == 200
    for server in (a, b):
        status, body = post(server.url, "/v1/release", w.body("k", nonce, MANIFEST))
        assert (status, body["error"]) == (403, "nonce_invalid")
    # the same nonce sent to both replicas at the same moment: one release, never two
    for k in range(6):
        nonce = challenge((a, b)[k % 2].url, "k")
        body = w.body("k", nonce, MANIFEST)
        got = _race(4, lambda i, body=body: post((a, b)[i % 2].url, "/v1/release", body))
        assert sorted(status for status, _ in got) == [200, 403, 403, 403], got
    st = Store(a.db, b"\0" * 32)
    try:
        st.verify_audit_chain()
        assert st.outstanding_nonces() == 0
    finally:
        st.close()
