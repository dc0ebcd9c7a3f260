"""Persistent state of the key server (SQLAlchemy Core; SQLite file or PostgreSQL URL).

Tables: ``meta`` (owner-token hash), ``bundles`` (data key encrypted under the KEK with
AES-256-GCM, aad = key id; manifest digest; policy JSON; revocation), ``clients``
(distinct client ids granted per bundle) and ``audit`` (append-only: SQLite triggers
refuse UPDATE/DELETE; every row carries the SHA-256 of the previous row, so an edit of
the file is detectable with `verify_audit_chain`).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
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
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine

from .evidence import Policy

metadata = MetaData()

meta_t = Table("meta", metadata, Column("k", String(64), primary_key=True), Column("v", Text))
bundles_t = Table(
    "bundles",
    metadata,
    Column("key_id", String(128), primary_key=True),
    Column("sealed_key", LargeBinary, nullable=False),
    Column("manifest_sha256", String(64)),
    Column("policy", Text, nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("revoked_reason", Text),
    Column("created_at", Integer, nullable=False),
    Column("updated_at", Integer, nullable=False),
)
clients_t = Table(
    "clients",
    metadata,
    Column("key_id", String(128), primary_key=True),
    Column("client_id", String(128), primary_key=True),
    Column("first_seen", Integer, nullable=False),
)
audit_t = Table(
    "audit",
    metadata,
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

AUDIT_FIELDS = (
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
GENESIS = "0" * 64


def _row_hash(prev: str, row: dict[str, Any]) -> str:
    body = json.dumps([prev, *[row.get(f) for f in AUDIT_FIELDS]], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def db_url(db: str) -> str:
    """A path → SQLite URL; anything with `://` is used as a SQLAlchemy URL."""
    if "://" in db:
        return db
    return f"sqlite:///{Path(db).expanduser().resolve()}"


@dataclass(frozen=True)
class BundleRecord:
    key_id: str
    manifest_sha256: str | None
    policy: Policy
    revoked: bool
    revoked_reason: str | None
    created_at: int
    updated_at: int
    clients: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "manifest_sha256": self.manifest_sha256,
            "policy": self.policy.to_json(),
            "revoked": self.revoked,
            "revoked_reason": self.revoked_reason,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "clients": self.clients,
        }


class Store:
    def __init__(self, db: str, kek: bytes) -> None:
        url = db_url(db)
        self.sqlite = url.startswith("sqlite")
        kw: dict[str, Any] = {}
        if self.sqlite:
            kw["connect_args"] = {"check_same_thread": False}
            path = url.removeprefix("sqlite:///")
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                if not Path(path).exists():  # created 0600: it holds wrapped keys
                    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self.engine: Engine = create_engine(url, **kw)
        if self.sqlite:

            @event.listens_for(self.engine, "connect")
            def _pragmas(conn: Any, _rec: Any) -> None:
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA busy_timeout=5000")
                cur.close()

        metadata.create_all(self.engine)
        if self.sqlite:
            with self.engine.begin() as c:
                for op in ("UPDATE", "DELETE"):
                    c.execute(
                        text(
                            f"CREATE TRIGGER IF NOT EXISTS audit_no_{op.lower()} BEFORE {op} ON audit "
                            "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"
                        )
                    )
        self._aead = AESGCM(kek)
        self._lock = threading.RLock()  # one writer at a time (SQLite; keeps the chain linear)
        with self.engine.connect() as c:
            last = c.execute(select(audit_t.c.hash).order_by(audit_t.c.id.desc()).limit(1)).first()
        self._last_hash = last[0] if last else GENESIS

    def __repr__(self) -> str:
        return f"Store({self.engine.url.render_as_string(hide_password=True)!r})"

    # -- meta ---------------------------------------------------------------------

    def get_meta(self, k: str) -> str | None:
        with self.engine.connect() as c:
            r = c.execute(select(meta_t.c.v).where(meta_t.c.k == k)).first()
        return r[0] if r else None

    def set_meta(self, k: str, v: str) -> None:
        with self._lock, self.engine.begin() as c:
            if c.execute(select(meta_t.c.k).where(meta_t.c.k == k)).first():
                c.execute(update(meta_t).where(meta_t.c.k == k).values(v=v))
            else:
                c.execute(insert(meta_t).values(k=k, v=v))

    # -- bundles ------------------------------------------------------------------

    def _seal(self, key_id: str, key: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, key, key_id.encode())

    def _unseal(self, key_id: str, blob: bytes) -> bytes:
        return self._aead.decrypt(blob[:12], blob[12:], key_id.encode())

    def register(
        self, key_id: str, key: bytes, manifest_sha256: str | None, policy: Policy
    ) -> bool:
        """Insert; False if the key id exists (keys are never replaced)."""
        now = int(time.time())
        with self._lock, self.engine.begin() as c:
            if c.execute(select(bundles_t.c.key_id).where(bundles_t.c.key_id == key_id)).first():
                return False
            c.execute(
                insert(bundles_t).values(
                    key_id=key_id,
                    sealed_key=self._seal(key_id, key),
                    manifest_sha256=manifest_sha256,
                    policy=json.dumps(policy.to_json()),
                    revoked=False,
                    created_at=now,
                    updated_at=now,
                )
            )
        return True

    def _record(self, r: Any, clients: int = 0) -> BundleRecord:
        return BundleRecord(
            r.key_id,
            r.manifest_sha256,
            Policy.from_json(json.loads(r.policy)),
            bool(r.revoked),
            r.revoked_reason,
            r.created_at,
            r.updated_at,
            clients,
        )

    def get(self, key_id: str) -> BundleRecord | None:
        with self.engine.connect() as c:
            r = c.execute(select(bundles_t).where(bundles_t.c.key_id == key_id)).first()
            if r is None:
                return None
            n = c.execute(
                select(func.count()).select_from(clients_t).where(clients_t.c.key_id == key_id)
            ).scalar_one()
        return self._record(r, n)

    def list(self) -> list[BundleRecord]:
        with self.engine.connect() as c:
            counts = dict(
                c.execute(
                    select(clients_t.c.key_id, func.count()).group_by(clients_t.c.key_id)
                ).all()
            )
            rows = c.execute(select(bundles_t).order_by(bundles_t.c.created_at)).all()
        return [self._record(r, counts.get(r.key_id, 0)) for r in rows]

    def set_policy(self, key_id: str, policy: Policy) -> bool:
        with self._lock, self.engine.begin() as c:
            res = c.execute(
                update(bundles_t)
                .where(bundles_t.c.key_id == key_id)
                .values(policy=json.dumps(policy.to_json()), updated_at=int(time.time()))
            )
        return bool(res.rowcount)

    def revoke(self, key_id: str, reason: str) -> bool:
        with self._lock, self.engine.begin() as c:
            res = c.execute(
                update(bundles_t)
                .where(bundles_t.c.key_id == key_id)
                .values(revoked=True, revoked_reason=reason, updated_at=int(time.time()))
            )
        return bool(res.rowcount)

    # -- release ------------------------------------------------------------------

    def load_for_release(self, key_id: str) -> tuple[BundleRecord, bytes] | None:
        with self.engine.connect() as c:
            r = c.execute(select(bundles_t).where(bundles_t.c.key_id == key_id)).first()
        if r is None:
            return None
        return self._record(r), self._unseal(key_id, r.sealed_key)

    def admit_client(self, key_id: str, client_id: str, max_clients: int | None) -> bool:
        """Record `client_id` for `key_id`; False if that would exceed `max_clients`."""
        with self._lock, self.engine.begin() as c:
            known = c.execute(
                select(clients_t.c.client_id).where(
                    clients_t.c.key_id == key_id, clients_t.c.client_id == client_id
                )
            ).first()
            if known:
                return True
            if max_clients is not None:
                n = c.execute(
                    select(func.count()).select_from(clients_t).where(clients_t.c.key_id == key_id)
                ).scalar_one()
                if n >= max_clients:
                    return False
            c.execute(
                insert(clients_t).values(
                    key_id=key_id, client_id=client_id, first_seen=int(time.time())
                )
            )
        return True

    # -- audit --------------------------------------------------------------------

    def audit(self, event: str, decision: str, reason: str, **kw: Any) -> None:
        row: dict[str, Any] = {f: kw.get(f) for f in AUDIT_FIELDS}
        row.update(event=event, decision=decision, reason=reason, ts_ms=int(time.time() * 1000))
        with self._lock:
            h = _row_hash(self._last_hash, row)
            with self.engine.begin() as c:
                c.execute(insert(audit_t).values(**row, prev_hash=self._last_hash, hash=h))
            self._last_hash = h

    def audit_log(self, key_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        q = select(audit_t).order_by(audit_t.c.id.desc()).limit(max(1, min(limit, 10000)))
        if key_id:
            q = q.where(audit_t.c.key_id == key_id)
        with self.engine.connect() as c:
            rows = c.execute(q).mappings().all()
        return [dict(r) for r in reversed(rows)]

    def verify_audit_chain(self) -> int:
        """Re-hash the whole log; returns the row count, raises ValueError on a break."""
        prev = GENESIS
        n = 0
        with self.engine.connect() as c:
            for r in c.execute(select(audit_t).order_by(audit_t.c.id)).mappings():
                if r["prev_hash"] != prev or _row_hash(prev, dict(r)) != r["hash"]:
                    raise ValueError(f"the audit log is broken at row {r['id']}")
                prev = r["hash"]
                n += 1
        return n
