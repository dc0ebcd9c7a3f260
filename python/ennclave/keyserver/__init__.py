"""The model owner's key server: attested release of bundle data keys.

* `app`       — FastAPI application (`ennclave keyserver`), routes under `/v1`.
* `store`     — SQLAlchemy store (SQLite by default, PostgreSQL by URL): keys (encrypted
                at rest under the server's key-encryption key), policies, clients, and an
                append-only, hash-chained audit log.
* `evidence`  — evidence verification: software evidence and the SGX (DCAP quote v3) slot.
* `sgx`       — parser for SGX ECDSA quotes, version 3.
* `licence`   — the licence that travels with a released key (expiry, query budget).
* `client`    — HTTP client: owner (admin) calls and the host's relay (`KeyserverRelease`).

Protocol and threat model: docs/key-release.md.
"""
