"""Alembic environment: runs on the connection `Store` hands over (already in a
transaction, holding the migration lock); never opens its own."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None)
with context.begin_transaction():
    context.run_migrations()
