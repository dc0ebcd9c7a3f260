"""Several replicas on one database: challenge nonces in the database (single use across
replicas, expiry by time, a cap per peer), 64-bit audit timestamps on PostgreSQL (the
first schema's 32-bit `ts_ms` could not hold milliseconds there), an index for the
audit log per key, and the append-only triggers on PostgreSQL too.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nonces",
        sa.Column("nonce", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(128), nullable=False),
        sa.Column("peer", sa.String(64), nullable=False),
        sa.Column("expires_ms", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_nonces_peer", "nonces", ["peer"])
    op.create_index("ix_nonces_expires_ms", "nonces", ["expires_ms"])
    op.create_index("ix_audit_key_id", "audit", ["key_id", "id"])
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("audit", "ts_ms", type_=sa.BigInteger, existing_nullable=False)
        op.execute(
            "CREATE OR REPLACE FUNCTION ennclave_audit_append_only() RETURNS trigger "
            "LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$"
        )
        op.execute(
            "CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit "
            "FOR EACH ROW EXECUTE FUNCTION ennclave_audit_append_only()"
        )
        op.execute(
            "CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit "
            "FOR EACH STATEMENT EXECUTE FUNCTION ennclave_audit_append_only()"
        )
