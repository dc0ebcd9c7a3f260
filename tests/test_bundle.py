"""The bundle on disk (bundle.py): what a damaged or hostile bundle directory gets, and
that a failed write leaves nothing behind."""

from __future__ import annotations

import json

import pytest

import ennclave
from ennclave.bundle import BundleWriter, read_manifest
from ennclave.errors import BundleError

# A FIFO in place of private.sealed (which hung load()): attacks/fifo_sealed_file.py.


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
