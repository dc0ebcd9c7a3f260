"""Owner-side files: the admin token and the server's key-encryption key (KEK).

Both live in the owner's config directory (``platformdirs.user_config_dir("ennclave")``,
``$ENNCLAVE_CONFIG_DIR`` overrides), created 0600 in a 0700 directory:

* ``keyserver-owner.json`` — ``{"url": …, "token": …}``, written by the server at its
  first start, read by ``ennclave keys`` and ``ennclave split --keyserver``;
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


def save_owner_config(url: str, token: str, directory: Path | None = None) -> Path:
    path = (directory or config_dir()) / OWNER_FILE
    _write_private(path, json.dumps({"url": url, "token": token}).encode())
    return path


def load_owner_config(directory: Path | None = None) -> OwnerConfig | None:
    path = (directory or config_dir()) / OWNER_FILE
    try:
        d = json.loads(_read_private(path))
    except FileNotFoundError:
        return None
    except ValueError:
        raise EnnclaveError(f"{path} is damaged; delete it and pass --token.") from None
    return OwnerConfig(str(d.get("url", "")), str(d.get("token", "")))


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
    """`--keyserver URL` / `--token` override the saved owner config."""
    saved = load_owner_config()
    u = url or (saved.url if saved else None) or f"http://127.0.0.1:{DEFAULT_PORT}"
    t = token or os.environ.get("ENNCLAVE_KEYSERVER_TOKEN") or (saved.token if saved else None)
    if not t:
        raise EnnclaveError(
            "No key-server owner token: start `ennclave keyserver` once on this machine (it "
            "saves the token) or pass --token."
        )
    return OwnerConfig(u.rstrip("/"), t)
