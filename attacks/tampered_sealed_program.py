"""Attack: a hostile host edits the sealed program and forges the bundle's integrity
digest, so that only the worker stands between the edit and a running model. The
sealed program spans many transfer chunks, which the worker receives straight into
its secret memory while a second thread faults that memory in (docs/worker-protocol.md),
so the edits go where that path could slip: a flipped byte in the first chunk, in the
second, mid-way and in the tag, two blocks swapped, the last byte cut, a byte appended.
Claim: every edit is refused (the AES-GCM tag over the whole program, the manifest as
associated data), and no edited program answers an inference."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
from _common import step

import ennclave
from ennclave.errors import BundleError
from support.enclave_bundle import IN, OUT, reference, write_bundle

HID = 131072  # ~7 MB of weights: more than one 4 MiB chunk of the shared region
CHUNK = 4 << 20  # the shared region of this small-input model (runtime/worker.py)


def edits(sealed: bytes) -> dict[str, bytes]:
    n, mid, block = len(sealed), len(sealed) // 2, 4096

    def flip(at: int) -> bytes:
        b = bytearray(sealed)
        b[at] ^= 0x40
        return bytes(b)

    a, c = mid - 2 * block, mid + block  # two whole blocks, swapped
    swapped = sealed[:a] + sealed[c : c + block] + sealed[a + block : c] + sealed[a : a + block]
    swapped += sealed[c + block :]
    return {
        "byte flipped in the first chunk": flip(64),
        "byte flipped in the second chunk": flip(CHUNK + 100),
        "byte flipped mid-way": flip(mid),
        "byte flipped in the tag": flip(n - 1),
        "two 4 KiB blocks swapped": swapped,
        "last byte cut": sealed[:-1],
        "one byte appended": sealed + b"\0",
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        rng = np.random.default_rng(0)
        w = {
            "fc1.kernel": rng.standard_normal((IN, HID)).astype(np.float32),
            "fc1.bias": rng.standard_normal(HID).astype(np.float32) * 0.1,
            "fc2.kernel": rng.standard_normal((HID, OUT)).astype(np.float32) / 100,
            "fc2.bias": rng.standard_normal(OUT).astype(np.float32) * 0.1,
        }
        b = write_bundle(Path(d) / "bundle", Path(d) / "keystore.json", weights=w)
        x = rng.standard_normal((3, IN)).astype(np.float32)
        with ennclave.load(b.path, keystore=b.keystore) as model:  # the control
            np.testing.assert_allclose(model.predict(x), reference(w, x), rtol=1e-4, atol=1e-4)
        sealed_path, manifest_path = b.path / "private.sealed", b.path / "manifest.json"
        sealed, manifest = sealed_path.read_bytes(), json.loads(manifest_path.read_text())
        assert len(sealed) > CHUNK + 4096, "the sealed program must span several chunks"
        step(f"the untampered bundle answers; its sealed program is {len(sealed):,} bytes")
        for what, edited in edits(sealed).items():
            sealed_path.write_bytes(edited)
            m = json.loads(json.dumps(manifest))
            m["integrity"]["files"][sealed_path.name] = hashlib.sha256(edited).hexdigest()
            manifest_path.write_text(json.dumps(m))
            try:
                with ennclave.load(b.path, keystore=b.keystore) as model:
                    y = model.predict(x)
            except BundleError as e:
                step(f"{what}, digest forged: refused ({type(e).__name__}: {e})")
                continue
            raise AssertionError(f"ATTACK SUCCEEDED: {what} ran and answered {y[0][:3]}")
    print("tampered_sealed_program: the attack failed, as it should")


if __name__ == "__main__":
    main()
