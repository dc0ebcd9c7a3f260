"""Split → seal → load → predict through the real Rust worker, for every op and whole models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ennclave
from ennclave.adapters import load_model
from ennclave.adapters.keras import KerasAdapter
from ennclave.errors import AuthenticationError, BundleError, EnnclaveError
from ennclave.graph import find_cut_points
from ennclave.passes import optimize
from ennclave.reference import execute
from ennclave.split import split_model
from support import kernels as kernel_families
from support.keras_models import nested_model, residual_cnn, sequential_cnn
from support.op_cases import CASES


@pytest.mark.parametrize("kernels", kernel_families.KERNELS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_op_worker_equals_reference(case, kernels, tmp_path, monkeypatch):
    # Every fp32 kernel family of the worker (ENNCLAVE_KERNEL) this CPU can run, under
    # the same sandbox.
    kernel_families.use(kernels, monkeypatch)
    model = CASES[case]()
    adapter = KerasAdapter.from_model(model)
    program = optimize(adapter.lower_private(find_cut_points(adapter.graph)[0]))
    split_model(adapter, 0, tmp_path / "b", keystore=tmp_path / "ks.json", n_random=4)
    x = (adapter.random_inputs(7, np.random.default_rng(1)) - 0.5) * 4  # both signs
    with ennclave.load(tmp_path / "b", keystore=tmp_path / "ks.json") as m:
        got = m.predict(x, batch_size=4)  # 7 samples in batches of 4: a ragged last batch
    np.testing.assert_allclose(got, execute(program, x), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got, np.asarray(model(x)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("build", [sequential_cnn, residual_cnn, nested_model])
def test_keras_models_split_and_run_end_to_end(build, tmp_path):
    model = build()
    path = tmp_path / "m.keras"
    model.save(path)
    cuts = find_cut_points(load_model(path).graph)
    x = np.random.default_rng(2).standard_normal((9, *model.input_shape[1:])).astype("float32")
    expected = np.asarray(model(x))
    for c in (cuts[0], cuts[len(cuts) // 2], cuts[-1]):
        out = tmp_path / f"b{c.index}"
        split_model(path, c.index, out, keystore=tmp_path / "ks.json", n_random=4)
        with ennclave.load(out, keystore=tmp_path / "ks.json") as m:
            np.testing.assert_allclose(m.predict(x, batch_size=4), expected, atol=1e-4)


def test_onnx_model_split_and_run_end_to_end(tmp_path):
    model = residual_cnn()
    x = np.random.default_rng(3).standard_normal((5, 10, 10, 4)).astype("float32")
    expected = np.asarray(model(x))
    model.export(tmp_path / "m.onnx", format="onnx", verbose=False)
    adapter = load_model(tmp_path / "m.onnx")
    cuts = find_cut_points(adapter.graph)
    assert len(cuts) >= 4
    for c in (cuts[0], cuts[2], cuts[-1]):
        out = tmp_path / f"b{c.index}"
        split_model(adapter, c.index, out, keystore=tmp_path / "ks.json", n_random=4)
        assert (out / "public.onnx").exists() == (c.index > 0)
        with ennclave.load(out, keystore=tmp_path / "ks.json") as m:
            np.testing.assert_allclose(m.predict(x), expected, atol=1e-4)


def test_cli_run(tmp_path):
    model = sequential_cnn()
    model.save(tmp_path / "m.keras")
    x = np.random.default_rng(4).standard_normal((40, 12, 12, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    ks = str(tmp_path / "ks.json")
    cli = [sys.executable, "-m", "ennclave"]
    r = subprocess.run(
        [
            *cli,
            "split",
            str(tmp_path / "m.keras"),
            "--cut",
            "auto",
            "-o",
            str(tmp_path / "b"),
            "--keystore",
            ks,
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [
            *cli,
            "run",
            str(tmp_path / "b"),
            "--input",
            str(tmp_path / "x.npy"),
            "--output",
            str(tmp_path / "y.npy"),
            "--keystore",
            ks,
            "--batch-size",
            "16",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), np.asarray(model(x)), atol=1e-4)
    # A wrong input shape is one sentence, not a traceback.
    np.save(tmp_path / "bad.npy", x[:, :5])
    r = subprocess.run(
        [
            *cli,
            "run",
            str(tmp_path / "b"),
            "--input",
            str(tmp_path / "bad.npy"),
            "--output",
            str(tmp_path / "y2.npy"),
            "--keystore",
            ks,
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and "shape" in r.stderr
    assert not (tmp_path / "y2.npy").exists()


@pytest.fixture(scope="module")
def flip_bundle(tmp_path_factory):
    """A bundle with a Keras public part, its inputs and its correct outputs."""
    tmp = tmp_path_factory.mktemp("flip")
    model = sequential_cnn()
    model.save(tmp / "m.keras")
    split_model(tmp / "m.keras", "flat", tmp / "b", keystore=tmp / "ks.json", n_random=4)
    x = np.random.default_rng(5).standard_normal((3, 12, 12, 3)).astype("float32")
    with ennclave.load(tmp / "b", keystore=tmp / "ks.json") as m:
        expected = m.predict(x)
    return tmp / "b", tmp / "ks.json", x, expected


def _flip(path: Path, offset: int, mask: int) -> bytes:
    data = bytearray(path.read_bytes())
    original = bytes(data)
    data[offset] ^= mask
    path.write_bytes(bytes(data))
    return original


def test_1000_random_byte_flips_fail_cleanly(flip_bundle):
    """Any single flipped byte in any bundle file: a clear error, or (for a flip that
    changes nothing meaningful, e.g. JSON whitespace) exactly the right answer."""
    bundle, ks, x, expected = flip_bundle
    files = sorted(p for p in bundle.iterdir() if p.is_file())
    sizes = np.array([p.stat().st_size for p in files], dtype=float)
    rng = np.random.default_rng(6)
    outcomes: dict[str, int] = {}
    for _ in range(1000):
        f = files[rng.choice(len(files), p=sizes / sizes.sum())]
        original = _flip(f, int(rng.integers(f.stat().st_size)), int(rng.integers(1, 256)))
        try:
            with ennclave.load(bundle, keystore=ks) as m:
                got = m.predict(x)
            np.testing.assert_array_equal(got, expected)
            outcomes["harmless"] = outcomes.get("harmless", 0) + 1
        except EnnclaveError as e:
            assert str(e) and "Traceback" not in str(e)
            outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
        finally:
            f.write_bytes(original)
    assert outcomes.get("harmless", 0) < 50, outcomes  # only verification.json/whitespace
    assert sum(outcomes.values()) == 1000


def test_flips_behind_forged_digests_are_caught_by_the_enclave(flip_bundle):
    """An attacker who also rewrites the integrity digests: the GCM tag still fails."""
    import hashlib

    bundle, ks, x, _ = flip_bundle
    sealed, manifest_path = bundle / "private.sealed", bundle / "manifest.json"
    manifest_original = manifest_path.read_bytes()
    rng = np.random.default_rng(7)
    size = sealed.stat().st_size
    try:
        for i in range(60):
            offset = int(rng.integers(8, size)) if i else size - 1  # past the magic; tag too
            original = _flip(sealed, offset, int(rng.integers(1, 256)))
            m = json.loads(manifest_original)
            m["integrity"]["files"]["private.sealed"] = hashlib.sha256(
                sealed.read_bytes()
            ).hexdigest()
            manifest_path.write_text(json.dumps(m))
            try:
                with pytest.raises(AuthenticationError):
                    with ennclave.load(bundle, keystore=ks) as model:
                        model.predict(x)
            finally:
                sealed.write_bytes(original)
    finally:
        manifest_path.write_bytes(manifest_original)


def test_truncated_sealed_file(flip_bundle):
    import hashlib

    bundle, ks, x, _ = flip_bundle
    sealed, manifest_path = bundle / "private.sealed", bundle / "manifest.json"
    original, manifest_original = sealed.read_bytes(), manifest_path.read_bytes()
    try:
        for cut in (0, 10, 30, len(original) // 2, len(original) - 1):
            sealed.write_bytes(original[:cut])
            with pytest.raises(BundleError):
                ennclave.load(bundle, keystore=ks)
            m = json.loads(manifest_original)
            m["integrity"]["files"]["private.sealed"] = hashlib.sha256(original[:cut]).hexdigest()
            manifest_path.write_text(json.dumps(m))
            with pytest.raises((AuthenticationError, BundleError)):
                with ennclave.load(bundle, keystore=ks) as model:
                    model.predict(x)
            manifest_path.write_bytes(manifest_original)
    finally:
        sealed.write_bytes(original)
        manifest_path.write_bytes(manifest_original)


def test_demo_runs(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "ennclave", "demo", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "agreement with the original 1.000" in r.stdout
    assert (tmp_path / "bundle" / "private.sealed").exists()
