"""Alembic migrations of the key server's database (`Store` runs them at start-up).

* `versions/0001_initial.py` — the schema as the first key server made it (meta, bundles,
  clients, audit; SQLite triggers keeping the audit log append-only);
* `versions/0002_replicas.py` — what several replicas on one database need: nonces in
  the database, 64-bit audit timestamps, append-only triggers on PostgreSQL.

A database made before migrations existed (tables, no ``alembic_version``) is stamped
0001 and upgraded from there. New revision: a file in `versions/` with the next number,
``down_revision`` the previous one.
"""
