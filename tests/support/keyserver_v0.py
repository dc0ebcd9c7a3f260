"""A key-server database exactly as the first store code (before migrations) made it:
``metadata.create_all`` of its four tables plus the SQLite append-only triggers, filled
with keys, policies, clients and a hash-chained audit log the way that code wrote them.
For the upgrade test: a newer server must migrate it without losing anything."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import (
    Boolean,
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    insert,
    text,
)

V0 = MetaData()
Table("meta", V0, Column("k", String(64), primary_key=True), Column("v", Text))
Table(
    "bundles",
    V0,
    Column("key_id", String(128), primary_key=True),
    Column("sealed_key", LargeBinary, nullable=False),
    Column("manifest_sha256", String(64)),
    Column("policy", Text, nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("revoked_reason", Text),
    Column("created_at", Integer, nullable=False),
    Column("updated_at", Integer, nullable=False),
)
Table(
    "clients",
    V0,
    Column("key_id", String(128), primary_key=True),
    Column("client_id", String(128), primary_key=True),
    Column("first_seen", Integer, nullable=False),
)
Table(
    "audit",
    V0,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts_ms", Integer, nullable=False),
    Column("event", String(32), nullable=False),
    Column("key_id", String(128)),
    Column("decision", String(16), nullable=False),
    Column("reason", String(64), nullable=False),
    Column("detail", Text),
    Column("client_id", String(128)),
    Column("peer", String(64)),
    Column("evidence", String(32)),
    Column("binary_sha256", String(64)),
    Column("licence_id", String(32)),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)
FIELDS = (
    "ts_ms",
    "event",
    "key_id",
    "decision",
    "reason",
    "detail",
    "client_id",
    "peer",
    "evidence",
    "binary_sha256",
    "licence_id",
)


def _row_hash(prev: str, row: dict[str, Any]) -> str:
    body = json.dumps([prev, *[row.get(f) for f in FIELDS]], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def make_v0_database(url: str, kek: bytes, keys: dict[str, bytes], ts_ms: int) -> list[dict]:
    """Create the first schema at `url` and fill it: each key of `keys` registered with
    a policy, the first also revoked and with two clients; an audit row per change.
    `ts_ms` is the audit time (the first schema's 32-bit column on PostgreSQL could
    not hold a real millisecond time). Returns the audit rows written."""
    engine = create_engine(url)
    V0.create_all(engine)
    t = V0.tables
    rows: list[dict] = []
    prev = "0" * 64
    with engine.begin() as c:
        if engine.dialect.name == "sqlite":
            for op in ("UPDATE", "DELETE"):
                c.execute(
                    text(
                        f"CREATE TRIGGER IF NOT EXISTS audit_no_{op.lower()} BEFORE {op} ON audit "
                        "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"
                    )
                )
        c.execute(insert(t["meta"]).values(k="owner_token_sha256", v="ab" * 32))
        for i, (key_id, key) in enumerate(keys.items()):
            nonce = os.urandom(12)
            policy = {"allow_software": True, "max_clients": 5 + i, "query_budget": 100 + i}
            c.execute(
                insert(t["bundles"]).values(
                    key_id=key_id,
                    sealed_key=nonce + AESGCM(kek).encrypt(nonce, key, key_id.encode()),
                    manifest_sha256="cd" * 32,
                    policy=json.dumps(policy),
                    revoked=i == 0,
                    revoked_reason="end of contract" if i == 0 else None,
                    created_at=1_700_000_000 + i,
                    updated_at=1_700_000_000 + i,
                )
            )
            events = [("register", "done", "ok")]
            if i == 0:
                for cid in ("11" * 16, "22" * 16):
                    c.execute(
                        insert(t["clients"]).values(
                            key_id=key_id, client_id=cid, first_seen=1_700_000_100
                        )
                    )
                events += [("release", "granted", "software"), ("revoke", "done", "ok")]
            for event, decision, reason in events:
                row = {f: None for f in FIELDS}
                row.update(
                    ts_ms=ts_ms + len(rows),
                    event=event,
                    key_id=key_id,
                    decision=decision,
                    reason=reason,
                    peer="127.0.0.1",
                )
                h = _row_hash(prev, row)
                c.execute(insert(t["audit"]).values(**row, prev_hash=prev, hash=h))
                rows.append({**row, "prev_hash": prev, "hash": h})
                prev = h
    engine.dispose()
    return rows
