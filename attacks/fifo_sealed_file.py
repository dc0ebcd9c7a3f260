"""Attack: replace private.sealed with a FIFO so that opening the bundle blocks forever
(reading a FIFO with no writer never returns). Claim: a bundle holds regular files only,
and anything else is refused before it is opened."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from _common import error_within, small_bundle, step

import ennclave
from ennclave.errors import BundleError


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        b = small_bundle(Path(d))
        sealed = b.path / "private.sealed"
        sealed.unlink()
        os.mkfifo(sealed)
        # Forge the integrity digest too: the digest of a folder with no files, which is
        # what a FIFO hashed as before (it is not a file), so that only opening it is left.
        mpath = b.path / "manifest.json"
        m = json.loads(mpath.read_text())
        m["integrity"]["files"][sealed.name] = hashlib.sha256(b"").hexdigest()
        mpath.write_text(json.dumps(m))
        step(f"replaced {sealed.name} with a FIFO and forged its digest; loading the bundle")
        err = error_within(lambda: ennclave.load(b.path, keystore=b.keystore).close(), 10)
        assert isinstance(err, BundleError), f"ATTACK SUCCEEDED: load() returned {err!r}"
        assert "not a regular file" in str(err), err
        step(f"refused: {err}")
    print("fifo_sealed_file: the attack failed, as it should")


if __name__ == "__main__":
    main()
