"""`ennclave keyserver`: bind the port, open (and migrate) the store, make the owner
token on first start, serve.

The order matters: the listening socket is bound **before** anything is written, so a
second server on a port in use fails without touching the owner config of the first.

Slow and abusive clients are bounded here, per connection, below the ASGI app:
`DeadlineProtocol` closes a connection whose request headers do not arrive within
`header_timeout` seconds (slowloris; the body has its own deadline in `app.Guard`) and
refuses more than `max_connections_per_peer` open connections from one address;
uvicorn's `limit_concurrency` caps all connections of the replica (503 beyond) and
`timeout_keep_alive` closes idle ones. These are a backstop: in production run the
key server behind a reverse proxy (nginx, HAProxy, Envoy) that terminates TLS and
buffers requests (docs/key-release.md "Production").
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import EnnclaveError
from .app import TOKEN_META, ServerSettings, create_app, hash_token
from .config import load_or_create_kek, load_owner_tokens, save_owner_config
from .store import Store, audit_row


def open_store(db: str, kek_file: str | None = None) -> Store:
    return Store(db, load_or_create_kek(Path(kek_file) if kek_file else None))


def ensure_owner_token(store: Store, url: str) -> str | None:
    """First start on a database: create the owner token, store its hash (only if no
    replica did so first), save it (0600) in the owner's config under `url`. A replica
    whose database already has a token saves it under its own `url` too, when this
    machine's config holds it for another URL. Returns the config path written, or None."""
    want = store.get_meta(TOKEN_META)
    if want is None:
        token = secrets.token_hex(32)  # hex: never starts with "-", which argv would misread
        if store.add_meta(
            TOKEN_META, hash_token(token), audit=audit_row("owner_token", "done", "created")
        ):
            path = save_owner_config(url, token)
            del token
            return str(path)
        want = store.get_meta(TOKEN_META)  # another replica was first
    saved = load_owner_tokens()
    if url.rstrip("/") in saved:
        return None
    for token in saved.values():
        if want and secrets.compare_digest(hash_token(token), want):
            return str(save_owner_config(url, token))
    return None


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or an `EnnclaveError` saying the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise EnnclaveError(
            f"Cannot listen on {host}:{port} ({e.strerror}); another key server (or program) "
            "may be using it: choose another --port. Nothing was changed."
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def protocol_class(settings: ServerSettings) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools, else h11) with a header deadline and a
    per-peer connection limit (module docstring)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    per_peer: Counter[str] = Counter()  # one event loop: no lock needed
    timeout_response = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: 66\r\n\r\n"
        b'{"error": "too_slow", "reason": "The request arrived too slowly."}'
    )
    assert len(timeout_response.split(b"\r\n\r\n", 1)[1]) == 66

    class DeadlineProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _peer: str | None = None
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            peername = transport.get_extra_info("peername")
            peer = str(peername[0]) if peername else "?"
            if per_peer[peer] >= settings.max_connections_per_peer:
                transport.abort()  # refused: this address holds too many connections
                return
            self._peer = peer
            per_peer[peer] += 1
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._peer is not None:
                per_peer[self._peer] -= 1
                if per_peer[self._peer] <= 0:
                    del per_peer[self._peer]
                self._peer = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            cycle = getattr(self, "cycle", None)
            if cycle is not None and not cycle.response_complete:
                self._disarm()  # headers are in; the body's deadline is in Guard
            elif self._deadline is None and self._peer is not None:
                self._arm()  # a (next) request has begun: its headers have a deadline

        def _arm(self) -> None:
            self._disarm()
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(settings.header_timeout, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            cycle = getattr(self, "cycle", None)
            if cycle is not None and not cycle.response_complete:
                return  # a request is being served after all
            if not self.transport.is_closing():
                self.transport.write(timeout_response)
                self.transport.close()

    return DeadlineProtocol


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

    s = settings or ServerSettings()
    sock = bind(host, port)  # first: a port in use changes nothing
    try:
        store = open_store(db, kek_file)
        url = f"http://{host}:{port}"
        written = ensure_owner_token(store, url)
        if written:
            print(
                f"ennclave keyserver: owner token for {url} saved to {written} (0600)",
                file=sys.stderr,
            )
        print(f"ennclave keyserver: serving {store!r} on {url}", file=sys.stderr, flush=True)
        config = uvicorn.Config(
            create_app(store, s),
            log_level=log_level,
            access_log=False,
            server_header=False,
            http=protocol_class(s),
            limit_concurrency=s.max_connections,
            timeout_keep_alive=max(1, round(s.keep_alive)),
            h11_max_incomplete_event_size=16 * 1024,
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
