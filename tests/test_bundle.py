"""The bundle on disk (bundle.py): what a damaged or hostile bundle directory gets, and
that a failed write leaves nothing behind."""

from __future__ import annotations

import json
import os
import threading

import pytest

import ennclave
from ennclave.bundle import BundleWriter, read_manifest
from ennclave.errors import BundleError


def _load_within(path, keystore, seconds: float = 10.0) -> BaseException | None:
    """Load in a thread so that a hang fails the test instead of blocking CI."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            ennclave.load(path, keystore=keystore).close()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert outcome, f"loading the bundle hung for {seconds} s"
    return outcome[0]


def test_fifo_in_place_of_the_sealed_file_is_refused(enclave_bundle):
    sealed = enclave_bundle.path / "private.sealed"
    sealed.unlink()
    os.mkfifo(sealed)
    err = _load_within(enclave_bundle.path, enclave_bundle.keystore)
    assert isinstance(err, BundleError) and "not a regular file" in str(err)


def test_deeply_nested_manifest_is_a_bundle_error(enclave_bundle):
    (enclave_bundle.path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(enclave_bundle.path)


@pytest.mark.parametrize("shape", [[None, 2**62], [None, 2**20, 2**20], [None, True]])
def test_absurd_declared_shapes_are_bundle_errors(enclave_bundle, shape):
    mpath = enclave_bundle.path / "manifest.json"
    m = json.loads(mpath.read_text())
    m["private"]["inputs"][0]["shape"] = shape
    mpath.write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"no valid private\.inputs"):
        ennclave.load(enclave_bundle.path, keystore=enclave_bundle.keystore)


def test_writer_refuses_a_file_and_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a bundle")
    with pytest.raises(BundleError, match="is a file"):
        BundleWriter(target)
    out = tmp_path / "new"
    with pytest.raises(RuntimeError), BundleWriter(out) as w:
        w.write_json("verification.json", {"passed": False})
        raise RuntimeError("verification failed")
    assert not out.exists() and list(tmp_path.iterdir()) == [target]
