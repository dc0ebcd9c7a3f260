"""The key server's store on SQLite and on a real PostgreSQL: schema migrations
(an existing database keeps its keys, policies and audit log), the nonce table, the
audit chain and the append-only triggers."""

from __future__ import annotations

import os
import threading

import pytest

pytest.importorskip("sqlalchemy")
pytest.importorskip("alembic")

from sqlalchemy import inspect, text
from sqlalchemy.exc import DatabaseError

from ennclave.keyserver.store import NonceLimit, Store, audit_row, schema_revision
from support.keyserver_v0 import make_v0_database

KEK = bytes(range(32))
HEAD = "0003"


def _url(db: str) -> str:
    return db if "://" in db else f"sqlite:///{db}"


def test_upgrade_keeps_keys_policies_clients_and_audit_log(keyserver_db):
    keys = {"old-key": os.urandom(32), "other-key": os.urandom(32)}
    # the first schema's 32-bit ts_ms on PostgreSQL cannot hold milliseconds
    ts = 1_700_000_000_000 if "://" not in keyserver_db else 1_700_000
    written = make_v0_database(_url(keyserver_db), KEK, keys, ts)

    st = Store(keyserver_db, KEK)  # a newer server opens it: stamps 0001, upgrades
    try:
        assert schema_revision(st) == HEAD
        old = st.get("old-key")
        assert old is not None and old.revoked and old.revoked_reason == "end of contract"
        assert old.policy.max_clients == 5 and old.policy.query_budget == 100
        assert old.policy.allow_software and old.clients == 2
        assert old.manifest_sha256 == "cd" * 32
        for key_id, key in keys.items():
            _rec, data_key = st.load_for_release(key_id)
            assert data_key == key
        assert st.get("other-key").policy.query_budget == 101
        log = st.audit_log(limit=100)
        assert [{k: r[k] for k in w} for r, w in zip(log, written, strict=True)] == written
        assert st.verify_audit_chain() == len(written)
        # the upgraded database takes new state: a millisecond audit time, nonces
        st.audit("owner_token", "done", "checked")
        assert st.audit_log(limit=1)[0]["ts_ms"] > 1_700_000_000_000
        assert st.verify_audit_chain() == len(written) + 1
        n = st.issue_nonce("old-key", "127.0.0.1", 60, 10, 100)
        assert st.consume_nonce(n, "old-key") and not st.consume_nonce(n, "old-key")
        assert st.admit_client("other-key", "33" * 16, 1)
        assert not st.admit_client("other-key", "44" * 16, 1)
    finally:
        st.close()
    again = Store(keyserver_db, KEK)  # opening an up-to-date database changes nothing
    assert schema_revision(again) == HEAD and again.verify_audit_chain() == len(written) + 1
    again.close()


def test_new_database_gets_the_newest_schema_once_with_concurrent_starts(keyserver_db):
    errors: list[BaseException] = []

    def start() -> None:
        try:
            Store(keyserver_db, KEK).close()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    st = Store(keyserver_db, KEK)
    with st.read() as c:
        names = set(inspect(c).get_table_names())
    assert {"meta", "bundles", "clients", "nonces", "audit", "alembic_version"} <= names
    assert schema_revision(st) == HEAD
    st.close()


def test_audit_log_is_append_only_and_chained(keyserver_db):
    st = Store(keyserver_db, KEK)
    for i in range(3):
        st.append_audit(audit_row("test", "done", f"r{i}"))
    assert st.verify_audit_chain() == 3
    for sql in ("DELETE FROM audit", "UPDATE audit SET reason = 'x'"):
        with pytest.raises(DatabaseError, match="append-only"), st.engine.begin() as c:
            c.execute(text(sql))
    if st.postgresql:
        with pytest.raises(DatabaseError, match="append-only"), st.engine.begin() as c:
            c.execute(text("TRUNCATE audit"))
    assert st.verify_audit_chain() == 3
    st.close()


def test_nonces_single_use_expire_and_a_per_peer_cap_without_eviction(keyserver_db):
    st = Store(keyserver_db, KEK)
    mine = st.issue_nonce("k", "10.0.0.1", 60, 3, 1000)
    for _ in range(3):
        st.issue_nonce("k", "10.0.0.2", 60, 3, 1000)
    with pytest.raises(NonceLimit) as e:  # the flooding peer is refused ...
        st.issue_nonce("k", "10.0.0.2", 60, 3, 1000)
    assert e.value.scope == "peer"
    assert st.consume_nonce(mine, "k")  # ... and nobody else's nonce was evicted
    assert not st.consume_nonce(mine, "k")  # single use
    other = st.issue_nonce("k", "10.0.0.1", 60, 3, 1000)
    assert not st.consume_nonce(other, "another-key")  # bound to its key, and spent
    assert not st.consume_nonce(other, "k")
    expired = st.issue_nonce("k", "10.0.0.3", 0, 3, 1000)  # ttl 0: expired at once
    assert not st.consume_nonce(expired, "k")
    with pytest.raises(NonceLimit) as e:
        st.issue_nonce("k", "10.0.0.4", 60, 3, 3)  # the table's total cap
    assert e.value.scope == "total"
    st.close()
