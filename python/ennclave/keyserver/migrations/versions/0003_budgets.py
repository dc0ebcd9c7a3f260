"""Metered budgets (issue #14): what each key and each client has been charged
(`budget_spent`, against the policy's `query_budget` and `client_budget` totals), and
one row per slice handed out in a licence, with the worker's final usage report once
it arrives (`used`, `reported_ms`: a report is credited once).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    zero = sa.text("0")
    op.add_column(
        "bundles", sa.Column("budget_spent", sa.BigInteger, nullable=False, server_default=zero)
    )
    op.add_column(
        "clients", sa.Column("budget_spent", sa.BigInteger, nullable=False, server_default=zero)
    )
    op.create_table(
        "slices",
        sa.Column("licence_id", sa.String(32), primary_key=True),
        sa.Column("key_id", sa.String(128), nullable=False),
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("slice", sa.BigInteger, nullable=False),
        sa.Column("issued_ms", sa.BigInteger, nullable=False),
        sa.Column("used", sa.BigInteger),
        sa.Column("reported_ms", sa.BigInteger),
    )
    op.create_index("ix_slices_key_id", "slices", ["key_id"])
