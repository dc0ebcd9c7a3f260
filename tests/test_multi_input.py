"""Private programs of several inputs: the cut tensor plus model inputs the private side
reads itself (a padding mask, segment ids), passed through by the host.

A two-input Keras model (features and a per-feature gate the last layers read) splits at
every cut, verifies, and runs through the real worker with the inputs as a list or a dict;
the enclave layer, the numpy reference and the bench take the same inputs, and wrong
inputs are one clear sentence while the worker keeps serving."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import ennclave
from ennclave.adapters.keras import KerasAdapter
from ennclave.bench import bench_bundle
from ennclave.errors import InputError
from ennclave.graph import find_cut_points
from ennclave.passes import optimize
from ennclave.reference import execute
from ennclave.split import split_model

L = keras.layers


def gated_model() -> keras.Model:
    """x [4] → dense → dense → × gate [8] (a model input read after the cut) → head."""
    x = keras.Input((4,), name="x")
    gate = keras.Input((8,), name="gate")
    h = L.Dense(8, activation="relu", name="d1")(x)
    h = L.Dense(8, name="d2")(h)
    h = L.Multiply(name="gated")([h, gate])
    return keras.Model([x, gate], L.Dense(3, name="head")(h))


def _inputs(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, 4)).astype("float32"), rng.random((n, 8), dtype="float32")]


@pytest.fixture(scope="module")
def gated():
    model = gated_model()
    return model, KerasAdapter.from_model(model)


@pytest.fixture(scope="module")
def bundles(gated, tmp_path_factory):
    """One bundle per cut of the gated model (all in one keystore)."""
    _, adapter = gated
    root = tmp_path_factory.mktemp("multi")
    out = {}
    for cut in find_cut_points(adapter.graph):
        res = split_model(adapter, cut.index, root / f"b{cut.index}", keystore=root / "ks.json")
        assert res.verification.passed
        out[cut.name] = (root / f"b{cut.index}", res.manifest)
    return root / "ks.json", out


def test_cut_points_pass_the_gate_through(gated):
    _, adapter = gated
    cuts = {c.name: [t.name for t in c.extra_inputs] for c in find_cut_points(adapter.graph)}
    # Before the multiply the gate crosses beside the cut tensor; after it nothing does.
    assert cuts == {"x": ["gate"], "d1": ["gate"], "d2": ["gate"], "gated": []}


@pytest.mark.parametrize("cut", ["x", "d1", "d2", "gated"])
def test_every_cut_matches_keras_through_the_worker(gated, bundles, cut):
    model, adapter = gated
    keystore, by_cut = bundles
    path, manifest = by_cut[cut]
    xs = _inputs(7, seed=1)
    expected = np.asarray(model(xs))
    # The numpy reference on the program's own inputs (list and dict).
    point = next(c for c in find_cut_points(adapter.graph) if c.name == cut)
    program = optimize(adapter.lower_private(point))
    names = [t.name for t in program.inputs]
    assert names == [point.tensor.name, *(t.name for t in point.extra_inputs)]
    assert [t["name"] for t in manifest["private"]["inputs"]] == names
    assert [t["name"] for t in manifest["inputs"]] == ["x", "gate"]
    with ennclave.load(path, keystore=keystore) as m:
        assert m.input_names == ["x", "gate"]
        np.testing.assert_allclose(m.predict(xs), expected, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(
            m.predict({"gate": xs[1], "x": xs[0]}, batch_size=3), expected, atol=1e-5, rtol=1e-5
        )
        feed = m._private_feed(xs)
        np.testing.assert_allclose(execute(program, feed), expected, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(
            execute(program, dict(zip(names, feed, strict=True))), expected, atol=1e-5, rtol=1e-5
        )
        # predict_private takes the private inputs the same ways.
        np.testing.assert_allclose(m.predict_private(feed), expected, atol=1e-5, rtol=1e-5)
        if len(names) > 1:
            np.testing.assert_allclose(
                m.predict_private(dict(zip(names, feed, strict=True))),
                expected,
                atol=1e-5,
                rtol=1e-5,
            )


def test_wrong_inputs_are_clear_and_the_worker_keeps_serving(gated, bundles):
    model, _ = gated
    keystore, by_cut = bundles
    xs = _inputs(3)
    expected = np.asarray(model(xs))
    with ennclave.load(by_cut["d1"][0], keystore=keystore) as m:
        with pytest.raises(InputError, match=r"takes 2 inputs \['x', 'gate'\]; pass a list"):
            m.predict(xs[0])
        with pytest.raises(InputError, match=r"takes 2 inputs \['x', 'gate'\], got 1"):
            m.predict(xs[:1])
        with pytest.raises(InputError, match=r"lacks \['gate'\] and has unknown \['mask'\]"):
            m.predict({"x": xs[0], "mask": xs[1]})
        with pytest.raises(InputError, match=r"different batch sizes \[3, 2\]"):
            m.predict([xs[0], xs[1][:2]])
        with pytest.raises(InputError, match=r"Input 'gate' has shape \(3, 7\) but the model"):
            m.predict([xs[0], xs[1][:, :7]])
        with pytest.raises(InputError, match=r"Input 'gate' contains NaN"):
            m.predict([xs[0], np.full_like(xs[1], np.nan)])
        with pytest.raises(InputError, match=r"Private input 'gate' has shape \(3, 5\)"):
            m.predict_private([np.zeros((3, 8), "float32"), np.zeros((3, 5), "float32")])
        with pytest.raises(InputError, match=r"Each sample must have 16 values"):
            m.worker.infer([np.zeros((3, 8), "float32"), np.zeros((3, 5), "float32")])
        np.testing.assert_allclose(m.predict(xs), expected, atol=1e-5, rtol=1e-5)


def test_reference_names_missing_and_misshapen_inputs(gated):
    _, adapter = gated
    point = next(c for c in find_cut_points(adapter.graph) if c.name == "d2")
    program = adapter.lower_private(point)
    h = np.zeros((2, 8), "float32")
    with pytest.raises(InputError, match=r"\['gate'\] missing from the dict"):
        execute(program, {"d2": h})
    with pytest.raises(InputError, match=r"takes 2 input\(s\) \['d2', 'gate'\], got 1"):
        execute(program, h)
    with pytest.raises(InputError, match=r"'gate' has shape \(3, 8\), expected \(2, 8\)"):
        execute(program, [h, np.zeros((3, 8), "float32")])


def test_enclave_layer_takes_the_cut_tensor_and_the_gate(gated, bundles):
    from ennclave.runtime.keras_layer import EnclaveLayer

    model, adapter = gated
    keystore, by_cut = bundles
    point = next(c for c in find_cut_points(adapter.graph) if c.name == "d2")
    public = adapter.build_public(point)
    x, gate = keras.Input((4,), name="x"), keras.Input((8,), name="gate")
    layer = EnclaveLayer(by_cut["d2"][0], keystore=str(keystore))
    try:
        assert layer.enclaved.private_input_names == ["d2", "gate"]
        combined = keras.Model([x, gate], layer([public(x), gate]))
        xs = _inputs(5, seed=2)
        np.testing.assert_allclose(
            combined.predict(xs, verbose=0), np.asarray(model(xs)), atol=1e-5, rtol=1e-5
        )
    finally:
        layer.close()


def test_bench_feeds_every_input(bundles):
    keystore, by_cut = bundles
    rec = bench_bundle(by_cut["d1"][0], (1, 4), 0.2, keystore=keystore)
    assert [r["batch"] for r in rec["results"]] == [1, 4]
    assert all(r["enclave_ms"] > 0 and r["public_ms"] > 0 for r in rec["results"])


def test_cli_takes_npz_samples_and_inputs(gated, tmp_path, capsys):
    from ennclave import cli

    model, _ = gated
    path = tmp_path / "gated.keras"
    model.save(path)
    xs = _inputs(4, seed=3)
    np.savez(tmp_path / "x.npz", x=xs[0], gate=xs[1])
    ks = str(tmp_path / "ks.json")
    argv = ["split", str(path), "--cut", "d2", "-o", str(tmp_path / "b"), "--keystore", ks]
    assert cli.main([*argv, "--samples", str(tmp_path / "x.npz")]) == 0
    out = tmp_path / "y.npy"
    run = ["run", str(tmp_path / "b"), "--input", str(tmp_path / "x.npz"), "--output", str(out)]
    assert cli.main([*run, "--keystore", ks]) == 0
    np.testing.assert_allclose(np.load(out), np.asarray(model(xs)), atol=1e-5, rtol=1e-5)
    capsys.readouterr()


def test_audit_refuses_a_bundle_of_several_inputs(bundles):
    from ennclave.audit.runner import Dataset, audit_bundle

    keystore, by_cut = bundles
    data = Dataset(np.zeros((4, 4), "float32"), np.zeros(4, "int64"))
    with pytest.raises(InputError, match=r"audits single-input bundles only"):
        audit_bundle(by_cut["d1"][0], data, data, keystore=keystore)
