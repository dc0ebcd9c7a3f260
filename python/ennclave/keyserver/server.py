"""`ennclave keyserver`: open the store, make the owner token on first start, serve."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

from .app import TOKEN_META, ServerSettings, create_app, hash_token
from .config import load_or_create_kek, save_owner_config
from .store import Store


def open_store(db: str, kek_file: str | None = None) -> Store:
    return Store(db, load_or_create_kek(Path(kek_file) if kek_file else None))


def ensure_owner_token(store: Store, url: str) -> str | None:
    """First start: create the owner token, store its hash, save it (0600) in the owner's
    config dir. Returns the config path written, or None when a token already existed."""
    if store.get_meta(TOKEN_META):
        return None
    token = secrets.token_urlsafe(32)
    store.set_meta(TOKEN_META, hash_token(token))
    path = save_owner_config(url, token)
    store.audit("owner_token", "done", "created")
    del token
    return str(path)


def serve(
    db: str,
    host: str = "127.0.0.1",
    port: int = 8470,
    *,
    kek_file: str | None = None,
    settings: ServerSettings | None = None,
    log_level: str = "warning",
) -> None:
    import uvicorn

    store = open_store(db, kek_file)
    url = f"http://{host}:{port}"
    written = ensure_owner_token(store, url)
    if written:
        print(
            f"ennclave keyserver: owner token created and saved to {written} (0600)",
            file=sys.stderr,
        )
    print(f"ennclave keyserver: serving {store!r} on {url}", file=sys.stderr, flush=True)
    uvicorn.run(
        create_app(store, settings),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        server_header=False,
        limit_concurrency=512,
        timeout_keep_alive=30,
    )
