"""The owner's local keystore: data keys by key id, in a 0600 JSON file.

Written atomically (temp file in the same directory, fsync, rename) so a crash never
leaves a half-written keystore, and created with 0600 from the first byte.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path

from ..errors import EnnclaveError


class KeyNotFound(EnnclaveError):
    pass


def default_keystore_path() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("ennclave")) / "keystore.json"


class Keystore:
    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else default_keystore_path()

    def __repr__(self) -> str:  # never show keys
        return f"Keystore({str(self.path)!r})"

    def _read(self) -> dict[str, dict[str, str]]:
        if not self.path.exists():
            return {}
        try:
            return json.loads(self.path.read_text())
        except ValueError:
            raise EnnclaveError(
                f"The keystore {self.path} is damaged (not JSON); restore it from a backup."
            ) from None

    def put(self, key_id: str, key: bytes) -> None:
        entries = self._read()
        entries[key_id] = {"key": base64.b64encode(key).decode()}
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
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

    def get(self, key_id: str) -> bytes:
        entry = self._read().get(key_id)
        if entry is None:
            raise KeyNotFound(
                f"The data key {key_id} is not in the keystore {self.path}; pass the owner's "
                "keystore with --keystore, or use the key server the bundle names."
            )
        return base64.b64decode(entry["key"])
