"""The owner's local keystore: data keys by key id, in a 0600 JSON file.

Written atomically (temp file in the same directory, fsync, rename) so a crash never
leaves a half-written keystore, and created with 0600 from the first byte. Concurrent
writers (two `ennclave split` runs) are serialised with an advisory lock file. Keys are
never logged, and `repr()` shows only the path.

Default location: `platformdirs.user_data_dir("ennclave")/keystore.json`
(`~/.local/share/ennclave/keystore.json` on Linux); `--keystore PATH` overrides it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import EnnclaveError, KeyNotFound

__all__ = ["KeyNotFound", "Keystore", "default_keystore_path"]

KEY_BYTES = 32


def default_keystore_path() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("ennclave")) / "keystore.json"


class Keystore:
    """Data keys by key id. `put(key_id, key)`, `get(key_id) -> bytes`."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path).expanduser() if path else default_keystore_path()

    def __repr__(self) -> str:  # never show keys
        return f"Keystore({str(self.path)!r})"

    # -- internals ---------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = self.path.with_name(f".{self.path.name}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise EnnclaveError(
                f"The keystore {self.path} cannot be read ({e.strerror}); check its permissions."
            ) from None
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise EnnclaveError(
                    f"The keystore {self.path} is not a regular file; fix the path."
                )
            if mode & 0o077:
                raise EnnclaveError(
                    f"The keystore {self.path} is readable by other users; run "
                    f"`chmod 600 {self.path}` and consider its keys exposed."
                )
            raw = f.read()
        try:
            entries = json.loads(raw)
        except ValueError:
            entries = None
        if not isinstance(entries, dict):
            raise EnnclaveError(
                f"The keystore {self.path} is damaged (not a JSON object); restore it from a backup."
            )
        return entries

    # -- API ---------------------------------------------------------------------

    def put(self, key_id: str, key: bytes) -> None:
        """Store (or replace) the data key for `key_id`."""
        if not isinstance(key_id, str) or not key_id:
            raise ValueError("key_id must be a non-empty string")
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
            raise ValueError(f"a data key must be {KEY_BYTES} bytes")
        with self._locked():
            entries = self._read()
            entries[key_id] = {"key": base64.b64encode(bytes(key)).decode()}
            fd, tmp = tempfile.mkstemp(prefix=".keystore.", dir=self.path.parent)
            try:
                os.fchmod(fd, 0o600)
                with os.fdopen(fd, "w") as f:
                    json.dump(entries, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            with contextlib.suppress(OSError):  # make the rename durable
                dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)

    def get(self, key_id: str) -> bytes:
        """The data key for `key_id`; `KeyNotFound` if absent."""
        entry = self._read().get(key_id)
        if entry is None:
            raise KeyNotFound(
                f"The data key {key_id} is not in the keystore {self.path}; pass the owner's "
                "keystore with --keystore, or use the key server the bundle names."
            )
        try:
            key = base64.b64decode(entry["key"], validate=True)
        except (KeyError, TypeError, binascii.Error):
            key = b""
        if len(key) != KEY_BYTES:
            raise EnnclaveError(
                f"The keystore entry for {key_id} in {self.path} is damaged; restore it from a backup."
            )
        return key

    def __contains__(self, key_id: object) -> bool:
        return isinstance(key_id, str) and key_id in self._read()

    def key_ids(self) -> list[str]:
        return sorted(self._read())
