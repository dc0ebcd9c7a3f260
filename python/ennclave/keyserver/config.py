"""Owner-side files: the admin token and the server's key-encryption key (KEK).

Both live in the owner's config directory (``platformdirs.user_config_dir("ennclave")``,
``$ENNCLAVE_CONFIG_DIR`` overrides), created 0600 in a 0700 directory:

* ``keyserver-owner.json`` — ``{"v": 2, "servers": {URL: {"token": …}}}``: one entry per
  server URL, added by the server at its first start on a database (or by a replica
  that finds its database's token saved under another URL), read by ``ennclave keys``
  and ``ennclave split --keyserver``, which use the entry of the URL they talk to. The
  first version's single ``{"url": …, "token": …}`` is read as one entry;
* ``keyserver.kek`` — 32 random bytes (base64) encrypting the data keys in the database,
  so a database dump alone does not reveal them.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..errors import EnnclaveError

OWNER_FILE = "keyserver-owner.json"
KEK_FILE = "keyserver.kek"
DEFAULT_PORT = 8470


def config_dir() -> Path:
    env = os.environ.get("ENNCLAVE_CONFIG_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir("ennclave"))


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_private(path: Path) -> bytes:
    st = path.stat()
    if st.st_mode & 0o077:
        raise EnnclaveError(
            f"{path} is readable by other users; run `chmod 600 {path}` and consider it exposed."
        )
    return path.read_bytes()


@dataclass(frozen=True)
class OwnerConfig:
    url: str
    token: str

    def __repr__(self) -> str:  # never show the token
        return f"OwnerConfig(url={self.url!r}, token=<hidden>)"


def normalise_url(url: str) -> str:
    return url.strip().rstrip("/")


def split_urls(urls: str | list[str] | tuple[str, ...]) -> list[str]:
    """Several key-server URLs (replicas): comma-separated and/or a list, in order,
    without duplicates."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        for u in item.split(","):
            u = normalise_url(u)
            if u and u not in out:
                out.append(u)
    return out


def load_owner_tokens(directory: Path | None = None) -> dict[str, str]:
    """Every saved owner token, by server URL."""
    path = (directory or config_dir()) / OWNER_FILE
    try:
        d = json.loads(_read_private(path))
    except FileNotFoundError:
        return {}
    except ValueError:
        raise EnnclaveError(f"{path} is damaged; delete it and pass --token.") from None
    if not isinstance(d, dict):
        raise EnnclaveError(f"{path} is damaged; delete it and pass --token.")
    if "servers" in d:
        servers = d["servers"] if isinstance(d["servers"], dict) else {}
        return {
            normalise_url(str(u)): str(e.get("token", ""))
            for u, e in servers.items()
            if isinstance(e, dict) and e.get("token")
        }
    if d.get("url") and d.get("token"):  # the first version: one server
        return {normalise_url(str(d["url"])): str(d["token"])}
    return {}


def save_owner_config(url: str, token: str, directory: Path | None = None) -> Path:
    """Add (or replace) the entry for `url`; entries of other servers are kept."""
    path = (directory or config_dir()) / OWNER_FILE
    tokens = load_owner_tokens(directory)
    tokens[normalise_url(url)] = token
    body = {"v": 2, "servers": {u: {"token": t} for u, t in sorted(tokens.items())}}
    _write_private(path, json.dumps(body, indent=1).encode())
    return path


def load_owner_config(url: str | None = None, directory: Path | None = None) -> OwnerConfig | None:
    """The saved entry for `url` (any of several, comma-separated: the first saved), or
    — without a URL — the only saved entry (None when there are several)."""
    tokens = load_owner_tokens(directory)
    if url is None:
        if len(tokens) != 1:
            return None
        [(u, t)] = tokens.items()
        return OwnerConfig(u, t)
    for u in split_urls(url):
        if u in tokens:
            return OwnerConfig(u, tokens[u])
    return None


def load_or_create_kek(path: Path | None = None) -> bytes:
    path = path or config_dir() / KEK_FILE
    try:
        kek = base64.b64decode(_read_private(path), validate=True)
    except FileNotFoundError:
        kek = secrets.token_bytes(32)
        _write_private(path, base64.b64encode(kek))
        return kek
    if len(kek) != 32:
        raise EnnclaveError(f"The key-encryption key {path} is damaged; restore it from a backup.")
    return kek


def resolve_admin(url: str | None, token: str | None) -> OwnerConfig:
    """`--keyserver URL[,URL…]` / `--token` override the saved owner config; the token
    is the saved one of the URL (of the first of several URLs that has one)."""
    saved = load_owner_config(url) if url else load_owner_config()
    if url:
        u = ",".join(split_urls(url))
    elif saved:
        u = saved.url
    else:
        u = f"http://127.0.0.1:{DEFAULT_PORT}"
        saved = load_owner_config(u)
    env = os.environ.get("ENNCLAVE_OWNER_TOKEN") or os.environ.get("ENNCLAVE_KEYSERVER_TOKEN")
    t = token or env or (saved.token if saved else None)
    if not t:
        raise EnnclaveError(
            f"No key-server owner token for {u}: start `ennclave keyserver` on this machine "
            "once (it saves the token for its URL), pass --keyserver with that URL, or give the "
            "token with --token-file FILE or ENNCLAVE_OWNER_TOKEN."
        )
    return OwnerConfig(u, t)
