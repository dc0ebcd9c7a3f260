"""Persistent state of the key server (SQLAlchemy Core; SQLite file or PostgreSQL URL).

Every piece of state that must be consistent lives here, so that several server
processes (replicas) can share one database:

* ``meta`` — the owner-token hash;
* ``bundles`` — data key encrypted under the KEK with AES-256-GCM (aad = key id),
  manifest digest, policy JSON, revocation;
* ``clients`` — distinct client ids granted per bundle (`max_clients`), each with what
  it has been charged of its `client_budget`;
* ``slices`` — every slice of a metered key's budget handed out in a licence, and the
  worker's final usage report once it arrives (credited once; a slice that never
  reports stays charged in full);
* ``nonces`` — outstanding challenge nonces (single use across replicas, expiry by
  time, a cap per peer);
* ``audit`` — append-only (triggers refuse UPDATE/DELETE on SQLite and PostgreSQL);
  every row carries the SHA-256 of the previous row, so an edit is detectable with
  `verify_audit_chain`.

Concurrency: every write is one transaction that holds the database's own lock while
it decides — ``BEGIN IMMEDIATE`` on SQLite (one writer per database file), and on
PostgreSQL an advisory transaction lock for the audit chain and ``SELECT … FOR UPDATE``
on the bundle row while a new client is counted against `max_clients` and while a
slice of a metered budget is charged (`Store.grant`). A release's client admission,
its budget slice and its audit row commit together or not at all.

The schema is migrated with Alembic (`migrations/`) when a `Store` opens the database.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    inspect,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine

from .evidence import Policy

metadata = MetaData()

# The schema at the newest migration (migrations/versions/); the tables are made by
# the migrations, never by `metadata.create_all`.
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
    Column("budget_spent", BigInteger, nullable=False, default=0),
)
clients_t = Table(
    "clients",
    metadata,
    Column("key_id", String(128), primary_key=True),
    Column("client_id", String(128), primary_key=True),
    Column("first_seen", Integer, nullable=False),
    Column("budget_spent", BigInteger, nullable=False, default=0),
)
slices_t = Table(
    "slices",
    metadata,
    Column("licence_id", String(32), primary_key=True),
    Column("key_id", String(128), nullable=False),
    Column("client_id", String(128), nullable=False),
    Column("slice", BigInteger, nullable=False),
    Column("issued_ms", BigInteger, nullable=False),
    Column("used", BigInteger),
    Column("reported_ms", BigInteger),
    Index("ix_slices_key_id", "key_id"),
)
nonces_t = Table(
    "nonces",
    metadata,
    Column("nonce", String(64), primary_key=True),
    Column("key_id", String(128), nullable=False),
    Column("peer", String(64), nullable=False),
    Column("expires_ms", BigInteger, nullable=False),
    Index("ix_nonces_peer", "peer"),
    Index("ix_nonces_expires_ms", "expires_ms"),
)
audit_t = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts_ms", BigInteger, nullable=False),
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
    Index("ix_audit_key_id", "key_id", "id"),
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
# PostgreSQL advisory lock ids (any fixed 64-bit numbers, distinct per purpose).
AUDIT_LOCK = 0x656E_6E63_6C61_7601  # "ennclav" 1: extending the audit chain
MIGRATE_LOCK = 0x656E_6E63_6C61_7602  # schema migrations at start-up
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
FIRST_REVISION = "0001"


def _row_hash(prev: str, row: dict[str, Any]) -> str:
    body = json.dumps([prev, *[row.get(f) for f in AUDIT_FIELDS]], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def audit_row(event: str, decision: str, reason: str, **kw: Any) -> dict[str, Any]:
    """An audit entry's fields (the chain hashes are added when it is appended)."""
    row: dict[str, Any] = {f: kw.get(f) for f in AUDIT_FIELDS}
    row.update(event=event, decision=decision, reason=reason, ts_ms=int(time.time() * 1000))
    return row


def db_url(db: str) -> str:
    """A path → SQLite URL; anything with `://` is a SQLAlchemy URL. ``postgresql://``
    without a driver means the psycopg (3) driver, the one the `server` extra installs."""
    if "://" not in db:
        return f"sqlite:///{Path(db).expanduser().resolve()}"
    for bare in ("postgresql://", "postgres://"):
        if db.startswith(bare):
            return "postgresql+psycopg://" + db.removeprefix(bare)
    return db


class NonceLimit(Exception):
    """A challenge was refused to protect the nonce table: `scope` is "peer" (this peer
    has too many outstanding nonces) or "total" (the table is full)."""

    def __init__(self, scope: str) -> None:
        super().__init__(scope)
        self.scope = scope


@dataclass(frozen=True)
class ReleaseStart:
    """`Store.open_release`: the nonce's state and the bundle (None: not registered)."""

    nonce_outstanding: bool
    nonce_valid: bool
    bundle: BundleRecord | None
    sealed_key: bytes = field(repr=False, default=b"")  # `Store.unseal` opens it


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
    budget_spent: int = 0  # samples charged against policy.query_budget

    @property
    def budget_left(self) -> int | None:
        total = self.policy.query_budget
        return None if total is None else max(0, total - self.budget_spent)

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
            "budget_spent": self.budget_spent,
            "budget_left": self.budget_left,
        }


@dataclass(frozen=True)
class Slice:
    """`Store.grant`'s charge for one release: `size` samples (the licence's
    `query_budget`; None: the key is not metered), and what this client may still get
    after it (`left`: the smaller of the key's and the client's remainders). `size` 0:
    nothing was left; `spent` says whose budget ("key" or "client") of `total`."""

    size: int | None
    left: int | None = None
    spent: str = ""
    total: int | None = None


class _BudgetSpent(Exception):
    def __init__(self, got: Slice) -> None:
        super().__init__("budget spent")
        self.got = got


@dataclass(frozen=True)
class UsageOutcome:
    """`Store.report_usage`: "credited" (`credited` samples back), "replayed" (this
    licence's report was already counted), "unknown_licence" or "exceeds_slice"."""

    outcome: str
    credited: int = 0
    slice: int = 0
    key_left: int | None = None


class Store:
    def __init__(self, db: str, kek: bytes, *, migrate: bool = True) -> None:
        url = db_url(db)
        self.sqlite = url.startswith("sqlite")
        self.postgresql = url.startswith("postgresql")
        kw: dict[str, Any] = {}
        if self.sqlite:
            kw["connect_args"] = {"check_same_thread": False}
            path = url.removeprefix("sqlite:///")
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                if not Path(path).exists():  # created 0600: it holds wrapped keys
                    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        else:
            # No pre-ping (a round trip per checkout): a connection the server dropped
            # fails its request with 503 and is replaced; idle ones are recycled.
            kw.update(pool_size=8, max_overflow=12, pool_timeout=10, pool_recycle=600)
        self.engine: Engine = create_engine(url, **kw)
        # PostgreSQL: reads and challenges run on their own pool in autocommit (no
        # BEGIN/COMMIT round trips), and a challenge's commit does not wait for the
        # disk: a nonce lost in a database crash only makes its client ask again.
        self._auto = (
            create_engine(
                url,
                **kw,
                isolation_level="AUTOCOMMIT",
                connect_args={"options": "-c synchronous_commit=off"},
            )
            if self.postgresql
            else self.engine
        )
        if self.sqlite:
            _sqlite_transactions(self.engine)
        # SQLite has one writer per file anyway: threads of this process queue here
        # rather than in SQLite's busy handler (which sleeps and retries).
        self._local = threading.Lock() if self.sqlite else None
        self._aead = AESGCM(kek)
        self._purged_ms = 0  # last deletion of expired nonces
        self._policies: dict[str, Policy] = {}
        if migrate:
            upgrade_schema(self)

    def __repr__(self) -> str:
        return f"Store({self.engine.url.render_as_string(hide_password=True)!r})"

    def close(self) -> None:
        self.engine.dispose()
        self._auto.dispose()

    # -- transactions ---------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction, holding the database's write lock on SQLite."""
        with self._local or nullcontext(), self.engine.begin() as c:
            yield c

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """Reads: deferred BEGIN on SQLite, autocommit on PostgreSQL."""
        with self._auto.connect().execution_options(ennclave_read=True) as c:
            yield c

    # -- meta ---------------------------------------------------------------------

    def get_meta(self, k: str) -> str | None:
        with self.read() as c:
            r = c.execute(select(meta_t.c.v).where(meta_t.c.k == k)).first()
        return r[0] if r else None

    def set_meta(self, k: str, v: str) -> None:
        with self.write() as c:
            if c.execute(select(meta_t.c.k).where(meta_t.c.k == k)).first():
                c.execute(update(meta_t).where(meta_t.c.k == k).values(v=v))
            else:
                c.execute(insert(meta_t).values(k=k, v=v))

    def add_meta(self, k: str, v: str, audit: dict[str, Any] | None = None) -> bool:
        """Insert `k` = `v` unless `k` exists (then False, nothing written)."""
        with self.write() as c:
            if not self._insert_new(c, meta_t, k=k, v=v):
                return False
            if audit:
                self._append_audit(c, audit)
        return True

    # -- bundles ------------------------------------------------------------------

    def _seal(self, key_id: str, key: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, key, key_id.encode())

    def unseal(self, key_id: str, blob: bytes) -> bytes:
        """The data key from its stored form (raises if the KEK does not open it)."""
        return self._unseal(key_id, blob)

    def _unseal(self, key_id: str, blob: bytes) -> bytes:
        return self._aead.decrypt(blob[:12], blob[12:], key_id.encode())

    def register(
        self,
        key_id: str,
        key: bytes,
        manifest_sha256: str | None,
        policy: Policy,
        audit: dict[str, Any] | None = None,
    ) -> bool:
        """Insert (and audit, in the same transaction); False if the key id exists
        (keys are never replaced)."""
        now = int(time.time())
        with self.write() as c:
            ok = self._insert_new(
                c,
                bundles_t,
                key_id=key_id,
                sealed_key=self._seal(key_id, key),
                manifest_sha256=manifest_sha256,
                policy=json.dumps(policy.to_json()),
                revoked=False,
                created_at=now,
                updated_at=now,
            )
            if audit:
                outcome = ("done", "ok") if ok else ("refused", "exists")
                self._append_audit(c, {**audit, "decision": outcome[0], "reason": outcome[1]})
        return ok

    def _policy(self, text: str) -> Policy:
        """The parsed policy (a copy; parsed once per distinct policy text)."""
        pol = self._policies.get(text)
        if pol is None:
            if len(self._policies) >= 1024:
                self._policies.clear()
            pol = self._policies[text] = Policy.from_json(json.loads(text))
        return copy.deepcopy(pol)

    def _record(self, r: Any, clients: int = 0) -> BundleRecord:
        return BundleRecord(
            r.key_id,
            r.manifest_sha256,
            self._policy(r.policy),
            bool(r.revoked),
            r.revoked_reason,
            r.created_at,
            r.updated_at,
            clients,
            int(r.budget_spent or 0),
        )

    def get(self, key_id: str) -> BundleRecord | None:
        with self.read() as c:
            r = c.execute(select(bundles_t).where(bundles_t.c.key_id == key_id)).first()
            if r is None:
                return None
            n = c.execute(
                select(func.count()).select_from(clients_t).where(clients_t.c.key_id == key_id)
            ).scalar_one()
        return self._record(r, n)

    def list(self) -> list[BundleRecord]:
        with self.read() as c:
            counts = dict(
                c.execute(
                    select(clients_t.c.key_id, func.count()).group_by(clients_t.c.key_id)
                ).all()
            )
            rows = c.execute(select(bundles_t).order_by(bundles_t.c.created_at)).all()
        return [self._record(r, counts.get(r.key_id, 0)) for r in rows]

    def set_policy(self, key_id: str, policy: Policy, audit: dict[str, Any] | None = None) -> bool:
        with self.write() as c:
            res = c.execute(
                update(bundles_t)
                .where(bundles_t.c.key_id == key_id)
                .values(policy=json.dumps(policy.to_json()), updated_at=int(time.time()))
            )
            if res.rowcount and audit:
                self._append_audit(c, audit)
        return bool(res.rowcount)

    def revoke(self, key_id: str, reason: str, audit: dict[str, Any] | None = None) -> bool:
        with self.write() as c:
            res = c.execute(
                update(bundles_t)
                .where(bundles_t.c.key_id == key_id)
                .values(revoked=True, revoked_reason=reason, updated_at=int(time.time()))
            )
            if res.rowcount and audit:
                self._append_audit(c, audit)
        return bool(res.rowcount)

    # -- challenge nonces ------------------------------------------------------------

    def issue_nonce(self, key_id: str, peer: str, ttl_s: int, per_peer: int, total: int) -> bytes:
        """A new single-use nonce for `key_id`, valid `ttl_s` seconds. Expired nonces
        are deleted (at most once a second per process); a peer with `per_peer`
        outstanding nonces, or a table with `total`, gets `NonceLimit` — nobody's
        unexpired nonce is ever evicted. On PostgreSQL the commit does not wait for
        the disk: a nonce lost in a database crash only makes its client ask again."""
        nonce = secrets.token_bytes(32)
        now = _now_ms()
        params = {
            "n": nonce.hex(),
            "k": key_id,
            "p": peer[:64],
            "now": now,
            "exp": now + ttl_s * 1000,
            "cap": per_peer,
            "total": total,
        }
        # PostgreSQL: each statement its own transaction (autocommit); SQLite: one
        # write transaction. The insert checks both caps in the same statement.
        with self._local or nullcontext(), self._nonce_conn() as c:
            if now - self._purged_ms >= 1000:
                c.execute(_PURGE_NONCES, params)
                self._purged_ms = now
            if c.execute(_ISSUE_NONCE, params).first() is not None:
                return nonce
            full = c.execute(_PEER_NONCES, params).scalar_one() >= per_peer
        raise NonceLimit("peer" if full else "total")

    @contextmanager
    def _nonce_conn(self) -> Iterator[Connection]:
        if self.postgresql:
            with self._auto.connect() as c:
                yield c
        else:
            with self.engine.begin() as c:
                yield c

    @staticmethod
    def _nonce_valid(row: Any, key_id: str) -> bool:
        return (
            row is not None
            and row.expires_ms > _now_ms()
            and hmac.compare_digest(row.key_id.encode(), key_id.encode())
        )

    def consume_nonce(self, nonce: bytes, key_id: str) -> bool:
        """Remove the nonce (whatever the outcome: single use, also across replicas —
        one DELETE decides); True if it existed, was unexpired and was for `key_id`."""
        with self.write() as c:
            got = self._delete_nonce(c, nonce)
        return self._nonce_valid(got, key_id)

    def _delete_nonce(self, c: Connection, nonce: bytes) -> Any:
        return c.execute(_SPEND_NONCE, {"n": nonce.hex()}).first()

    def spend_nonce(self, nonce: bytes, audit: dict[str, Any] | None = None) -> None:
        """Delete the nonce and (in the same transaction) append `audit`."""
        with self.write() as c:
            self._delete_nonce(c, nonce)
            if audit:
                self._append_audit(c, audit)

    def outstanding_nonces(self) -> int:
        with self.read() as c:
            return c.execute(select(func.count()).select_from(nonces_t)).scalar_one()

    # -- release ------------------------------------------------------------------

    def load_for_release(
        self, key_id: str, nonce: bytes | None = None
    ) -> tuple[BundleRecord, bytes] | None:
        """The bundle and its data key (None if unknown); see `open_release` for the
        nonce as well."""
        got = self.open_release(key_id, nonce or b"")
        if got.bundle is None:
            return None
        return got.bundle, self.unseal(key_id, got.sealed_key)

    def open_release(self, key_id: str, nonce: bytes) -> ReleaseStart:
        """What a release request needs to be decided, read together: whether its nonce
        is outstanding (and valid for `key_id`), and the bundle with its data key. The
        nonce is spent later, by `grant` or `spend_nonce`, in the transaction that
        records the outcome."""
        with self.read() as c:  # one statement: the nonce's columns, then the bundle's
            r = c.execute(_OPEN_RELEASE, {"n": nonce.hex(), "k": key_id}).one()
        n = None if r.nonce_key is None else _NonceRow(r.nonce_key, r.nonce_expires_ms)
        found = r.key_id is not None
        rec = self._record(r) if found else None
        sealed = bytes(r.sealed_key) if found else b""
        return ReleaseStart(n is not None, self._nonce_valid(n, key_id), rec, sealed)

    def grant(
        self,
        key_id: str,
        client_id: str,
        max_clients: int | None,
        audit: dict[str, Any],
        nonce: bytes | None = None,
        refused: dict[str, dict[str, Any]] | None = None,
        slice_out: list[Slice] | None = None,
    ) -> str:
        """Decide a release in one transaction: spend `nonce` (if given: another replica
        may have spent it first → "nonce_invalid"), admit `client_id` for `key_id`
        (a new client beyond `max_clients` → "too_many_clients"), charge a slice of a
        metered budget for the licence `audit["licence_id"]` (nothing left →
        "budget_spent"; the slice goes to `slice_out`) and append `audit` (the grant)
        → "granted". A refusal appends `refused[outcome]` instead; a grant's
        admission, slice and audit row commit together or not at all."""
        try:
            with self.write() as c:
                known = None
                if nonce is not None and self.postgresql:  # one round trip: spend, look up
                    spent, known = c.execute(
                        _SPEND_AND_KNOWN, {"n": nonce.hex(), "k": key_id, "c": client_id}
                    ).one()
                else:
                    spent = nonce is None or self._delete_nonce(c, nonce) is not None
                if not spent:
                    outcome = "nonce_invalid"
                elif not self._admit(c, key_id, client_id, max_clients, known):
                    outcome = "too_many_clients"
                else:
                    got = self._charge(c, key_id, client_id, audit.get("licence_id") or "")
                    if slice_out is not None:
                        slice_out.append(got)
                    if got.size == 0:
                        raise _BudgetSpent(got)  # rolls back: nothing admitted or charged
                    if got.size is not None:
                        left = "unlimited" if got.left is None else got.left
                        detail = f"{audit.get('detail') or ''}; slice {got.size}, left {left}"
                        audit = {**audit, "detail": detail}
                    self._append_audit(c, audit)
                    return "granted"
                if refused is not None and outcome in refused:
                    self._append_audit(c, refused[outcome])
            return outcome
        except _BudgetSpent as e:
            row = (refused or {}).get("budget_spent")
            row = {**row, "detail": spent_reason(key_id, e.got)} if row else None
            if nonce is not None:
                self.spend_nonce(nonce, row)
            elif row is not None:
                self.append_audit(row)
            return "budget_spent"

    def _charge(self, c: Connection, key_id: str, client_id: str, licence_id: str) -> Slice:
        """Inside the grant's transaction: charge one slice of the key's (and the
        client's) remaining budget. The bundle and client rows are locked (SQLite: the
        write lock taken at BEGIN; PostgreSQL: ``FOR UPDATE``) and the policy is read
        under that lock, so concurrent releases on any replica never hand out more than
        the total together."""
        from .evidence import DEFAULT_SLICE

        b = c.execute(_LOCK_BUDGET, {"k": key_id}).first()
        if b is None:
            return Slice(None)
        pol = self._policy(b.policy)
        total, per_client = pol.query_budget, pol.client_budget
        if total is None and per_client is None:
            return Slice(None)
        size = pol.budget_slice or DEFAULT_SLICE
        lefts: list[int] = []
        if total is not None:
            lefts.append(max(0, total - int(b.budget_spent)))
            if lefts[-1] == 0:
                return Slice(0, 0, "key", total)
        if per_client is not None:
            spent = c.execute(_LOCK_CLIENT_BUDGET, {"k": key_id, "c": client_id}).scalar() or 0
            lefts.append(max(0, per_client - int(spent)))
            if lefts[-1] == 0:
                return Slice(0, 0, "client", per_client)
            c.execute(_CHARGE_CLIENT, {"k": key_id, "c": client_id, "n": min(size, *lefts)})
        size = min(size, *lefts)
        c.execute(_CHARGE_KEY, {"k": key_id, "n": size})
        c.execute(
            insert(slices_t).values(
                licence_id=licence_id,
                key_id=key_id,
                client_id=client_id,
                slice=size,
                issued_ms=_now_ms(),
            )
        )
        return Slice(size, min(lefts) - size, "", total)

    def report_usage(
        self, key_id: str, licence_id: str, used: int, audit: dict[str, Any]
    ) -> UsageOutcome:
        """Count one licence's final usage report, once, in one transaction: mark its
        slice reported (a conditional UPDATE: only the first report of a licence
        matches) and credit what it did not use back to the key and the client. A
        report for more than the slice credits nothing. `audit` is appended with the
        outcome."""
        with self.write() as c:
            row = c.execute(
                select(slices_t).where(
                    slices_t.c.licence_id == licence_id, slices_t.c.key_id == key_id
                )
            ).first()
            if row is None:
                out = UsageOutcome("unknown_licence")
            elif used > row.slice:
                out = UsageOutcome("exceeds_slice", slice=int(row.slice))
            else:
                marked = c.execute(
                    update(slices_t)
                    .where(slices_t.c.licence_id == licence_id, slices_t.c.reported_ms.is_(None))
                    .values(used=used, reported_ms=_now_ms())
                ).rowcount
                if not marked:
                    out = UsageOutcome("replayed", slice=int(row.slice))
                else:
                    back = int(row.slice) - used
                    p = {"k": key_id, "c": row.client_id, "n": -back}
                    c.execute(_CHARGE_KEY, p)
                    c.execute(_CHARGE_CLIENT, p)
                    b = c.execute(_LOCK_BUDGET, {"k": key_id}).first()
                    total = self._policy(b.policy).query_budget if b is not None else None
                    left = None if total is None else max(0, total - int(b.budget_spent))
                    out = UsageOutcome("credited", back, int(row.slice), left)
            decision = "done" if out.outcome == "credited" else "refused"
            detail = f"used {used} of slice {out.slice}; credited {out.credited}"
            self._append_audit(
                c,
                {**audit, "decision": decision, "reason": out.outcome, "detail": detail},
            )
        return out

    def admit_client(self, key_id: str, client_id: str, max_clients: int | None) -> bool:
        """Record `client_id` for `key_id`; False if that would exceed `max_clients`."""
        with self.write() as c:
            return self._admit(c, key_id, client_id, max_clients)

    def _admit(
        self,
        c: Connection,
        key_id: str,
        client_id: str,
        max_clients: int | None,
        known: bool | None = None,
    ) -> bool:
        """Admit `client_id` (`known`: whether it is already, if looked up)."""
        if known is None:
            known = c.execute(_KNOWN_CLIENT, {"k": key_id, "c": client_id}).first() is not None
        if known:
            return True
        if max_clients is not None:
            if self.postgresql:  # new clients of one key are counted one at a time
                c.execute(_LOCK_BUNDLE, {"k": key_id})
            n = c.execute(_COUNT_CLIENTS, {"k": key_id}).scalar_one()
            if n >= max_clients:
                return False
        self._insert_new(
            c, clients_t, key_id=key_id, client_id=client_id, first_seen=int(time.time())
        )
        return True

    def _insert_new(self, c: Connection, table: Table, **values: Any) -> bool:
        """INSERT … ON CONFLICT DO NOTHING; True if the row was inserted."""
        if self.sqlite:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        elif self.postgresql:
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:  # another database: check first (under its own locking)
            pk = {col.name: values[col.name] for col in table.primary_key}
            if c.execute(select(table).filter_by(**pk)).first():
                return False
            c.execute(insert(table).values(**values))
            return True
        first = next(iter(table.primary_key))  # rowcount is -1 here on PostgreSQL: RETURNING
        q = dialect_insert(table).values(**values).on_conflict_do_nothing().returning(first)
        return c.execute(q).first() is not None

    # -- audit --------------------------------------------------------------------

    def _append_audit(self, c: Connection, row: dict[str, Any]) -> None:
        """Extend the chain inside transaction `c`, under the database lock: the last
        hash is read and the new row inserted while no other writer can append."""
        if self.postgresql:
            c.execute(_AUDIT_LOCK, {"k": _signed(AUDIT_LOCK)})
        prev = c.execute(_LAST_HASH).scalar() or GENESIS
        c.execute(_APPEND_AUDIT, {**row, "prev_hash": prev, "hash": _row_hash(prev, row)})

    def audit(self, event: str, decision: str, reason: str, **kw: Any) -> None:
        with self.write() as c:
            self._append_audit(c, audit_row(event, decision, reason, **kw))

    def append_audit(self, row: dict[str, Any]) -> None:
        with self.write() as c:
            self._append_audit(c, row)

    def audit_count(self) -> int:
        with self.read() as c:
            return c.execute(select(func.count()).select_from(audit_t)).scalar_one()

    def audit_log(self, key_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        q = select(audit_t).order_by(audit_t.c.id.desc()).limit(max(1, min(limit, 10000)))
        if key_id:
            q = q.where(audit_t.c.key_id == key_id)
        with self.read() as c:
            rows = c.execute(q).mappings().all()
        return [dict(r) for r in reversed(rows)]

    def verify_audit_chain(self) -> int:
        """Re-hash the whole log; returns the row count, raises ValueError on a break."""
        prev = GENESIS
        n = 0
        with self.read() as c:
            for r in c.execute(select(audit_t).order_by(audit_t.c.id)).mappings():
                if r["prev_hash"] != prev or _row_hash(prev, dict(r)) != r["hash"]:
                    raise ValueError(f"the audit log is broken at row {r['id']}")
                prev = r["hash"]
                n += 1
        return n


# Statements of the hot paths, built once (SQLAlchemy then reuses their compiled form).
_LIVE = nonces_t.c.expires_ms > bindparam("now")
_PEER_NONCES = (
    select(func.count()).select_from(nonces_t).where(nonces_t.c.peer == bindparam("p"), _LIVE)
)
_ISSUE_NONCE = (
    insert(nonces_t)
    .from_select(
        ["nonce", "key_id", "peer", "expires_ms"],
        select(bindparam("n"), bindparam("k"), bindparam("p"), bindparam("exp")).where(
            _PEER_NONCES.scalar_subquery() < bindparam("cap"),
            select(func.count()).select_from(nonces_t).scalar_subquery() < bindparam("total"),
        ),
    )
    .returning(nonces_t.c.nonce)
)
_PURGE_NONCES = delete(nonces_t).where(nonces_t.c.expires_ms <= bindparam("now"))
_SPEND_NONCE = (
    delete(nonces_t)
    .where(nonces_t.c.nonce == bindparam("n"))
    .returning(nonces_t.c.key_id, nonces_t.c.expires_ms)
)
_ONE = select(literal(1).label("one")).subquery("one")
_OPEN_RELEASE = select(
    select(nonces_t.c.key_id)
    .where(nonces_t.c.nonce == bindparam("n"))
    .scalar_subquery()
    .label("nonce_key"),
    select(nonces_t.c.expires_ms)
    .where(nonces_t.c.nonce == bindparam("n"))
    .scalar_subquery()
    .label("nonce_expires_ms"),
    *bundles_t.c,
).select_from(_ONE.outerjoin(bundles_t, bundles_t.c.key_id == bindparam("k")))
_KNOWN_CLIENT = select(clients_t.c.client_id).where(
    clients_t.c.key_id == bindparam("k"), clients_t.c.client_id == bindparam("c")
)
_SPENT = _SPEND_NONCE.cte("spent")  # PostgreSQL: a DELETE in a WITH clause
_SPEND_AND_KNOWN = select(
    select(func.count()).select_from(_SPENT).scalar_subquery() > 0,
    exists(_KNOWN_CLIENT),
)
_LOCK_BUNDLE = (
    select(bundles_t.c.key_id).where(bundles_t.c.key_id == bindparam("k")).with_for_update()
)
_LOCK_BUDGET = (
    select(bundles_t.c.policy, bundles_t.c.budget_spent)
    .where(bundles_t.c.key_id == bindparam("k"))
    .with_for_update()
)
_LOCK_CLIENT_BUDGET = (
    select(clients_t.c.budget_spent)
    .where(clients_t.c.key_id == bindparam("k"), clients_t.c.client_id == bindparam("c"))
    .with_for_update()
)
_CHARGE_KEY = (
    update(bundles_t)
    .where(bundles_t.c.key_id == bindparam("k"))
    .values(budget_spent=bundles_t.c.budget_spent + bindparam("n"))
)
_CHARGE_CLIENT = (
    update(clients_t)
    .where(clients_t.c.key_id == bindparam("k"), clients_t.c.client_id == bindparam("c"))
    .values(budget_spent=clients_t.c.budget_spent + bindparam("n"))
)
_COUNT_CLIENTS = (
    select(func.count()).select_from(clients_t).where(clients_t.c.key_id == bindparam("k"))
)
_LAST_HASH = select(audit_t.c.hash).order_by(audit_t.c.id.desc()).limit(1)
_AUDIT_LOCK = text("SELECT pg_advisory_xact_lock(:k)")
_APPEND_AUDIT = insert(audit_t)


@dataclass(frozen=True)
class _NonceRow:
    key_id: str
    expires_ms: int


def spent_reason(key_id: str, got: Slice) -> str:
    """The one sentence a release refused for a spent budget carries."""
    if got.spent == "client":
        return (
            f"This client's query budget of {got.total} samples for key {key_id} is spent; "
            f"ask the owner to raise it (ennclave keys policy {key_id} --client-budget N)."
        )
    return (
        f"The key's query budget of {got.total} samples is spent; ask the owner to raise "
        f"it (ennclave keys policy {key_id} --query-budget N)."
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


def _signed(k: int) -> int:
    """A 64-bit lock id as PostgreSQL's signed bigint."""
    return k - (1 << 64) if k >= 1 << 63 else k


def _sqlite_transactions(engine: Engine) -> None:
    """SQLite: WAL, and write transactions that take the write lock at BEGIN
    (``BEGIN IMMEDIATE``), so that a transaction which read the chain's last hash is
    the only writer until it commits; reads (`Store.read`) begin deferred."""

    @event.listens_for(engine, "connect")
    def _connect(conn: Any, _rec: Any) -> None:
        conn.isolation_level = None  # the driver leaves BEGIN to us (below)
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=10000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        read = conn.get_execution_options().get("ennclave_read", False)
        conn.exec_driver_sql("BEGIN" if read else "BEGIN IMMEDIATE")


def schema_revision(store: Store) -> str | None:
    """The database's Alembic revision (None before migrations existed or when empty)."""
    with store.read() as c:
        if "alembic_version" not in inspect(c).get_table_names():
            return None
        return c.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade_schema(store: Store) -> None:
    """Bring the database to the newest schema, in one transaction holding the
    migration lock (several replicas may start at once). A database made before
    migrations existed is stamped with the first revision, whose schema it has."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with store.write() as c:
        if store.postgresql:
            c.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _signed(MIGRATE_LOCK)})
        cfg.attributes["connection"] = c
        tables = set(inspect(c).get_table_names())
        if "alembic_version" not in tables and "bundles" in tables:
            command.stamp(cfg, FIRST_REVISION)
        command.upgrade(cfg, "head")
