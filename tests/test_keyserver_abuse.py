"""Requests that must not hurt the key server, on SQLite and on a real PostgreSQL:
malformed and low-order worker keys, failures inside a release, out-of-range policy
numbers, slow clients (slowloris), challenge floods and junk release floods. Every
case here once did harm: an all-zero X25519 key gave HTTP 500, used up a max_clients
slot and left no audit row; 530 slow connections made every challenge 503 for 45 s; a
challenge flood evicted legitimate nonces; 3,000 junk releases grew the database by
5 MB; query_budget 2^64+5 was accepted."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import httpx

from ennclave.keyserver.client import KeyReleaseRefused, KeyServerClient
from ennclave.keyserver.store import Store
from support.keyserver_util import KeyServerProc, SoftwareWorker, challenge, post, release

MANIFEST = "cd" * 32
# X25519 points of small order (all-zero, 1, the two of order 8, p-1, p, p+1)
LOW_ORDER = [
    "00" * 32,
    "01" + "00" * 31,
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ec" + "ff" * 30 + "7f",
    "ed" + "ff" * 30 + "7f",
    "ee" + "ff" * 30 + "7f",
]


def _server(tmp_path, monkeypatch, db, *extra: str) -> KeyServerProc:
    cfg = tmp_path / "cfg"
    monkeypatch.setenv("ENNCLAVE_CONFIG_DIR", str(cfg))
    return KeyServerProc(db, cfg, extra=["--rate", "0", *extra]).start()


@pytest.fixture
def server(tmp_path, monkeypatch, keyserver_db):
    ks = _server(tmp_path, monkeypatch, keyserver_db)
    yield ks
    ks.stop()


def _register(server: KeyServerProc, key_id: str = "k", **policy) -> None:
    with KeyServerClient(server.url, server.token) as c:
        c.register(key_id, os.urandom(32), MANIFEST, {"allow_software": True, **policy})


def _audit(server: KeyServerProc, key_id: str | None = None) -> list[dict]:
    with KeyServerClient(server.url, server.token) as c:
        return c.audit(key_id, 10000)


# ------------------------------------------------------------------ item 3


def test_low_order_worker_keys_are_audited_400s_and_use_no_client_slot(server):
    _register(server, max_clients=1)
    w = SoftwareWorker()
    for pub in LOW_ORDER:
        nonce = challenge(server.url, "k")
        req = w.body("k", nonce, MANIFEST, pub=bytes.fromhex(pub))
        status, body = post(server.url, "/v1/release", req)
        assert (status, body["error"]) == (400, "bad_pubkey"), (pub, status, body)
    refused = [r for r in _audit(server, "k") if r["event"] == "release"]
    assert [r["reason"] for r in refused] == ["bad_pubkey"] * len(LOW_ORDER)
    with KeyServerClient(server.url, server.token) as c:
        assert c.get("k")["clients"] == 0  # no slot used
    assert release(server.url, "k", MANIFEST, SoftwareWorker("ef" * 32)) == (200, "granted")


def test_a_failure_inside_a_release_is_an_audited_500_and_admits_nobody(server):
    """A data key that no longer decrypts (a KEK that does not match the database):
    the release fails with a reason and an audit row, and no client is admitted."""
    from sqlalchemy import create_engine, text

    _register(server, max_clients=1)
    engine = create_engine(server.db if "://" in server.db else f"sqlite:///{server.db}")
    with engine.begin() as c:
        c.execute(text("UPDATE bundles SET sealed_key = :b"), {"b": os.urandom(60)})
    engine.dispose()
    w = SoftwareWorker()
    nonce = challenge(server.url, "k")
    status, body = post(server.url, "/v1/release", w.body("k", nonce, MANIFEST))
    assert (status, body["error"]) == (500, "internal_error")
    again = post(server.url, "/v1/release", w.body("k", nonce, MANIFEST))  # nonce spent
    assert (again[0], again[1]["error"]) == (403, "nonce_invalid")
    last = _audit(server, "k")[-2:]
    assert [(r["decision"], r["reason"]) for r in last] == [
        ("refused", "internal_error"),
        ("refused", "nonce_invalid"),
    ]
    with KeyServerClient(server.url, server.token) as c:
        assert c.get("k")["clients"] == 0


OUT_OF_RANGE = [
    ("query_budget", 2**64 + 5),
    ("query_budget", 2**63),
    ("max_clients", 10**12),
    ("licence_ttl", 10**9),
    ("expires_at", 2**63),
]


def test_policy_numbers_out_of_range_are_422(server):
    with KeyServerClient(server.url, server.token) as c:
        c.register("k", os.urandom(32), MANIFEST, {})
        for field, value in OUT_OF_RANGE:
            with pytest.raises(KeyReleaseRefused) as e:
                c.register("big", os.urandom(32), MANIFEST, {field: value})
            assert (e.value.status, e.value.code) == (422, "policy_out_of_range")
            assert field in str(e.value)
            with pytest.raises(KeyReleaseRefused) as e:
                c.set_policy("k", {field: value})
            assert (e.value.status, e.value.code) == (422, "policy_out_of_range")
            assert c.get("k")["policy"][field] != value
        assert [r["key_id"] for r in c.list()] == ["k"]
        c.set_policy("k", {"query_budget": 2**63 - 1})  # the largest allowed


# ------------------------------------------------------------------ item 4


def _slow_sockets(n: int, source: str, port: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(5)
        s.bind((source, 0))
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        socks.append(s)
    return socks


def test_slow_clients_cannot_starve_a_legitimate_challenge(tmp_path, monkeypatch, keyserver_db):
    """80 connections from 127.0.0.2 send their headers a byte at a time; the server
    holds at most --max-connections-per-peer of them, closes those after
    --header-timeout, and a challenge from 127.0.0.1 is answered at once throughout."""
    ks = _server(
        tmp_path,
        monkeypatch,
        keyserver_db,
        "--max-connections",
        "64",
        "--max-connections-per-peer",
        "16",
        "--header-timeout",
        "2",
    )
    try:
        socks = _slow_sockets(80, "127.0.0.2", ks.port)
        request = b"POST /v1/challenge HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        stop = threading.Event()
        closed: set[int] = set()

        def trickle() -> None:
            for i in range(40):  # at most 40 × 0.1 s
                if stop.is_set():
                    return
                for k, s in enumerate(socks):
                    if k in closed:
                        continue
                    try:
                        s.send(request[i % len(request) : i % len(request) + 1])
                    except OSError:
                        closed.add(k)
                time.sleep(0.1)

        t = threading.Thread(target=trickle)
        t.start()
        try:
            time.sleep(0.5)
            latencies = []
            for _ in range(5):
                t0 = time.monotonic()
                r = httpx.post(ks.url + "/v1/challenge", json={"key_id": "k"}, timeout=3)
                latencies.append(time.monotonic() - t0)
                assert r.status_code == 200, r.text
                time.sleep(0.3)
            assert max(latencies) < 2.0, latencies
            # after the header deadline every slow connection has been closed
            deadline = time.monotonic() + 6
            for k, s in enumerate(socks):
                if k in closed:
                    continue
                s.settimeout(max(0.05, deadline - time.monotonic()))
                try:
                    while s.recv(4096):  # a 408, then the end of the connection
                        pass
                    closed.add(k)
                except TimeoutError:
                    pass  # still open: counted below
                except OSError:
                    closed.add(k)  # reset
            assert len(closed) == len(socks), f"{len(socks) - len(closed)} slow sockets still open"
        finally:
            stop.set()
            t.join()
            for s in socks:
                s.close()
    finally:
        ks.stop()


def test_a_challenge_flood_does_not_evict_legitimate_nonces(tmp_path, monkeypatch, keyserver_db):
    ks = _server(
        tmp_path, monkeypatch, keyserver_db, "--max-nonces", "120", "--max-nonces-per-peer", "50"
    )
    try:
        _register(ks)
        w = SoftwareWorker()
        mine = challenge(ks.url, "k")  # from 127.0.0.1
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        codes = []
        with httpx.Client(transport=transport, timeout=10) as flood:
            for _ in range(200):
                codes.append(flood.post(ks.url + "/v1/challenge", json={"key_id": "k"}).status_code)
        assert codes.count(200) == 50 and codes.count(429) == 150, codes
        assert post(ks.url, "/v1/release", w.body("k", mine, MANIFEST))[0] == 200
    finally:
        ks.stop()


def _db_bytes(server: KeyServerProc) -> int:
    if server.sqlite:
        return sum(
            p.stat().st_size for p in Path(server.db).parent.glob(Path(server.db).name + "*")
        )
    import psycopg

    url = server.db.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as c:
        return c.execute("SELECT pg_database_size(current_database())").fetchone()[0]


def test_a_junk_release_flood_does_not_grow_the_database(server):
    _register(server)
    w = SoftwareWorker()
    before_rows, before_bytes = len(_audit(server)), _db_bytes(server)

    def junk(n: int) -> None:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            for _ in range(n):
                body = w.body("k", os.urandom(32), MANIFEST)
                assert c.post("/v1/release", json=body).status_code == 403

    threads = [threading.Thread(target=junk, args=(200,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = _audit(server)
    assert len(rows) - before_rows <= 20, len(rows) - before_rows  # the burst, then summed
    assert _db_bytes(server) - before_bytes < 512 * 1024
    server.stop()  # the summary row is written at shutdown (or when the window ends)
    server.start()
    summary = [r for r in _audit(server) if r["reason"] == "suppressed"]
    assert len(summary) == 1 and summary[0]["detail"].startswith("780 more nonce_invalid")
    assert release(server.url, "k", MANIFEST, w) == (200, "granted")
    st = Store(server.db, b"\0" * 32)
    try:
        st.verify_audit_chain()
    finally:
        st.close()
