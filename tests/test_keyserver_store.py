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

from ennclave.keyserver.evidence import Policy
from ennclave.keyserver.store import NonceLimit, Slice, Store, audit_row, schema_revision
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
        assert old.budget_spent == 0 and old.budget_left == 100  # 0003: nothing charged yet
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


def _grant(st: Store, key_id: str, client: str, n: int) -> tuple[str, Slice | None]:
    got: list[Slice] = []
    row = audit_row("release", "granted", "software", key_id=key_id, licence_id=f"{n:016x}")
    refused = {"budget_spent": audit_row("release", "refused", "budget_spent", key_id=key_id)}
    outcome = st.grant(key_id, client, None, row, refused=refused, slice_out=got)
    return outcome, got[-1] if got else None


def test_concurrent_grants_on_two_replicas_never_exceed_the_budget(keyserver_db):
    """Metered budgets: 24 releases at once through two `Store`s on one database (two
    replicas) hand out slices of a budget of 50 that add up to exactly 50, then refuse;
    each licence's usage is credited once."""
    a, b = Store(keyserver_db, KEK), Store(keyserver_db, KEK)
    try:
        a.register("k", os.urandom(32), None, Policy(query_budget=50, budget_slice=3))
        got: dict[int, tuple[str, Slice | None]] = {}

        def release(i: int) -> None:  # licence id i, on alternating replicas
            got[i] = _grant(a if i % 2 else b, "k", f"{i:02x}" * 16, i)

        threads = [threading.Thread(target=release, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        granted = {i: s.size for i, (outcome, s) in got.items() if outcome == "granted"}
        sizes = sorted(granted.values())
        assert sum(sizes) == 50 and sizes == [2] + [3] * 16
        assert all(outcome == "budget_spent" for i, (outcome, _) in got.items() if i not in granted)
        rec = a.get("k")
        assert rec.budget_left == 0 and rec.budget_spent == 50
        assert rec.clients == len(sizes)  # the refused were not admitted
        # usage: 1 of one slice used → the rest back, once; the others unreported: spent
        i = next(iter(granted))
        lid = f"{i:016x}"
        row = audit_row("usage", "done", "credited", key_id="k", licence_id=lid)
        out = b.report_usage("k", lid, 1, row)
        assert out.outcome == "credited" and out.credited == granted[i] - 1
        assert b.report_usage("k", lid, 0, row).outcome == "replayed"
        assert a.report_usage("k", lid, 99, row).outcome == "exceeds_slice"
        assert a.report_usage("k", "ff" * 8, 0, row).outcome == "unknown_licence"
        assert a.get("k").budget_left == out.credited
        assert a.verify_audit_chain() > 0
    finally:
        a.close()
        b.close()


def test_client_budget_and_the_refusal_that_names_whose_budget(keyserver_db):
    st = Store(keyserver_db, KEK)
    try:
        st.register("k", os.urandom(32), None, Policy(query_budget=8, client_budget=5))
        one, two = "11" * 16, "22" * 16
        outcome, s = _grant(st, "k", one, 1)
        assert outcome == "granted" and s.size == 5 and s.left == 0  # the client's 5
        outcome, s = _grant(st, "k", one, 2)
        assert outcome == "budget_spent" and s.spent == "client" and s.total == 5
        outcome, s = _grant(st, "k", two, 3)
        assert outcome == "granted" and s.size == 3 and s.left == 0  # the key's last 3
        outcome, s = _grant(st, "k", two, 4)
        assert outcome == "budget_spent" and s.spent == "key" and s.total == 8
        reasons = [r["detail"] for r in st.audit_log("k") if r["reason"] == "budget_spent"]
        assert "This client's query budget of 5 samples" in reasons[0]
        assert "The key's query budget of 8 samples is spent" in reasons[1]
        assert "--query-budget N" in reasons[1]
        # unmetered keys: no slice, no counting
        st.register("free", os.urandom(32), None, Policy())
        outcome, s = _grant(st, "free", one, 5)
        assert outcome == "granted" and s.size is None and st.get("free").budget_spent == 0
    finally:
        st.close()
