"""The schema as the first key server made it (``metadata.create_all`` + SQLite triggers).

Revision ID: 0001
Revises: —
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "meta", sa.Column("k", sa.String(64), primary_key=True), sa.Column("v", sa.Text)
    )
    op.create_table(
        "bundles",
        sa.Column("key_id", sa.String(128), primary_key=True),
        sa.Column("sealed_key", sa.LargeBinary, nullable=False),
        sa.Column("manifest_sha256", sa.String(64)),
        sa.Column("policy", sa.Text, nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False),
        sa.Column("revoked_reason", sa.Text),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.Integer, nullable=False),
    )
    op.create_table(
        "clients",
        sa.Column("key_id", sa.String(128), primary_key=True),
        sa.Column("client_id", sa.String(128), primary_key=True),
        sa.Column("first_seen", sa.Integer, nullable=False),
    )
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts_ms", sa.Integer, nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(128)),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text),
        sa.Column("client_id", sa.String(128)),
        sa.Column("peer", sa.String(64)),
        sa.Column("evidence", sa.String(32)),
        sa.Column("binary_sha256", sa.String(64)),
        sa.Column("licence_id", sa.String(32)),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    if op.get_bind().dialect.name == "sqlite":
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER IF NOT EXISTS audit_no_{verb.lower()} BEFORE {verb} ON audit "
                "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"
            )
