"""Plan and split Keras models: every valid cut verifies, invalid cuts explain themselves."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from ennclave.adapters import load_model
from ennclave.errors import CutError, ModelLoadError, UnsupportedOpError
from ennclave.graph import find_cut_points
from ennclave.plan import make_plan
from ennclave.program import Program
from ennclave.split import split_model
from support.keras_models import nested_model, residual_cnn, sequential_cnn, transfer_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    paths = {}
    for name, build in (("seq", sequential_cnn), ("res", residual_cnn), ("nested", nested_model)):
        m = build()
        paths[name] = d / f"{name}.keras"
        m.save(paths[name])
    return paths


def _split_every_cut(model_path: Path, tmp: Path) -> list[dict]:
    adapter = load_model(model_path)
    cuts = find_cut_points(adapter.graph)
    reports = []
    for c in cuts:
        out = tmp / f"bundle{c.index}"
        res = split_model(adapter, c.index, out, keystore=tmp / "ks.json", n_random=8)
        v = json.loads((out / "verification.json").read_text())
        assert v["passed"] and v["max_abs_error"] <= 1e-4, (c.name, v)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["cut"]["index"] == c.index and manifest["cut"]["name"] == c.name
        assert (out / "public.keras").exists() == (c.index > 0)
        assert res.verification.samples == 8
        reports.append(manifest)
    return reports


def test_sequential_every_cut_verifies(saved, tmp_path):
    cuts = find_cut_points(load_model(saved["seq"]).graph)
    # A chain: every layer output but the last is a cut, plus the input.
    assert [c.name for c in cuts] == ["image", "c1", "bn1", "p1", "c2", "flat", "fc1", "drop"]
    _split_every_cut(saved["seq"], tmp_path)


def test_residual_offers_only_articulation_points(saved, tmp_path):
    adapter = load_model(saved["res"])
    names = [c.name for c in find_cut_points(adapter.graph)]
    assert names == ["img", "stem", "block1_add", "block1_out", "block2_add", "block2_out", "gap"]
    for inside in ("block1_conv1", "block1_bn", "block1_relu", "block2_conv2"):
        assert inside not in names
    _split_every_cut(saved["res"], tmp_path)


def test_cut_inside_residual_block_explains_and_names_nearest(saved, tmp_path):
    with pytest.raises(CutError) as e:
        split_model(saved["res"], "block2_bn", tmp_path / "b", keystore=tmp_path / "ks.json")
    msg = str(e.value)
    assert "skip connection" in msg
    assert "'block1_out' (index 3)" in msg and "'block2_add' (index 4)" in msg
    assert not (tmp_path / "b").exists()


def test_unknown_cut_name_and_index(saved, tmp_path):
    with pytest.raises(CutError, match="No layer named 'nope'"):
        split_model(saved["seq"], "nope", tmp_path / "b", keystore=tmp_path / "ks.json")
    with pytest.raises(CutError, match="valid indices are 0 to 7"):
        split_model(saved["seq"], 99, tmp_path / "b", keystore=tmp_path / "ks.json")


def test_nested_model_is_flattened_and_cut_inside(saved, tmp_path):
    adapter = load_model(saved["nested"])
    names = [c.name for c in find_cut_points(adapter.graph)]
    assert names == ["x", "backbone/conv_a", "backbone/conv_b", "backbone/gmp", "fc"]
    manifests = _split_every_cut(saved["nested"], tmp_path)
    # The cut inside the backbone: the public part is a model ending at conv_a.
    assert manifests[1]["public"]["outputs"][0]["shape"] == [None, 8, 8, 4]


def test_legacy_h5_loads_and_splits(tmp_path):
    m = sequential_cnn()
    path = tmp_path / "seq.h5"
    m.save(path)
    res = split_model(path, "flat", tmp_path / "b", keystore=tmp_path / "ks.json")
    assert res.verification.passed


def test_batchnorm_is_folded_into_conv(saved, tmp_path):
    adapter = load_model(saved["seq"])
    program = __import__("ennclave.passes", fromlist=["optimize"]).optimize(
        adapter.lower_private(find_cut_points(adapter.graph)[0])
    )
    # c1 has a relu, so bn1 cannot fold into it; the residual model's bn follows a
    # linear conv and must fold.
    assert [n.op for n in program.nodes][:2] == ["conv", "scale_shift"]
    res = load_model(saved["res"])
    folded = __import__("ennclave.passes", fromlist=["optimize"]).optimize(
        res.lower_private(find_cut_points(res.graph)[0])
    )
    assert "scale_shift" not in [n.op for n in folded.nodes]


def test_transfer_plan_recommends_after_last_frozen_and_public_base(tmp_path):
    base, model = transfer_model()
    base_path = tmp_path / "base.keras"
    base.save(base_path)
    model_path = tmp_path / "model.keras"
    model.save(model_path)
    plan = make_plan(load_model(model_path))
    rec = plan.cut_points[plan.recommended]
    assert rec.name == "base/b_gap"  # everything after the frozen backbone is private
    assert plan.private_layers == ["head1", "head2"]

    # Fine-tune the backbone's last conv: with --public-base it must become private.
    conv2 = model.get_layer("base").get_layer("b_conv2")
    conv2.kernel.assign(conv2.kernel.numpy() + 0.01)
    tuned_path = tmp_path / "tuned.keras"
    model.save(tuned_path)
    plan2 = make_plan(load_model(tuned_path), public_base=load_model(base_path))
    assert "base/b_conv2" in plan2.private_layers
    assert plan2.cut_points[plan2.recommended].name == "base/b_conv1"
    # Without the base, trainable flags alone cannot see the change.
    plan3 = make_plan(load_model(tuned_path))
    assert plan3.cut_points[plan3.recommended].name == "base/b_gap"


def test_plan_budget_too_small_says_why(saved):
    plan = make_plan(load_model(saved["seq"]), budget_mib=0.0001)
    assert plan.recommended is None
    assert "budget" in plan.reason and "raise --budget" in plan.reason


def test_small_head_warning(saved):
    plan = make_plan(load_model(saved["seq"]))
    assert any("re-learn" in w for w in plan.warnings)


def test_unsupported_layer_names_layer_type_and_list(tmp_path):
    import keras

    inp = keras.Input((6,))
    x = keras.layers.Dense(4, name="d")(inp)
    x = keras.layers.PReLU(name="prelu")(x)
    out = keras.layers.Dense(2, name="o")(x)
    path = tmp_path / "m.keras"
    keras.Model(inp, out).save(path)
    with pytest.raises(UnsupportedOpError) as e:
        split_model(path, 0, tmp_path / "b", keystore=tmp_path / "ks.json")
    msg = str(e.value)
    assert "'prelu'" in msg and "PReLU" in msg and "Conv2D" in msg and "Dense" in msg
    assert not (tmp_path / "b").exists()
    # Cutting after the unsupported layer works.
    assert split_model(path, "prelu", tmp_path / "b2", keystore=tmp_path / "ks.json")


def test_failed_split_leaves_nothing(saved, tmp_path):
    from ennclave.errors import VerificationError

    out = tmp_path / "bundle"
    with pytest.raises(VerificationError):
        split_model(saved["seq"], "flat", out, tolerance=-1.0, keystore=tmp_path / "ks.json")
    assert list(tmp_path.iterdir()) == []


def test_existing_bundle_is_not_overwritten_silently(saved, tmp_path):
    from ennclave.errors import BundleError

    out = tmp_path / "b"
    split_model(saved["seq"], "flat", out, keystore=tmp_path / "ks.json")
    with pytest.raises(BundleError, match="already exists"):
        split_model(saved["seq"], "fc1", out, keystore=tmp_path / "ks.json")
    split_model(saved["seq"], "fc1", out, keystore=tmp_path / "ks.json", overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["cut"]["name"] == "fc1"


def test_samples_are_verified_too(saved, tmp_path):
    samples = np.random.default_rng(5).uniform(-3, 3, (5, 12, 12, 3)).astype("float32")
    res = split_model(
        saved["seq"],
        "p1",
        tmp_path / "b",
        samples=samples,
        keystore=tmp_path / "ks.json",
        n_random=4,
    )
    assert res.verification.samples == 9


def test_program_container_round_trip(saved):
    adapter = load_model(saved["res"])
    prog = adapter.lower_private(find_cut_points(adapter.graph)[2])
    container = prog.to_container()
    again = Program.from_container(container)
    assert again.graph_json() == prog.graph_json()
    assert all(np.array_equal(again.weights[k], v) for k, v in prog.weights.items())
    # What ships stores every dense kernel in 32-column panels, zero-padded.
    n_json = struct.unpack("<Q", container[8:16])[0]
    graph = json.loads(container[16 : 16 + n_json])
    dense = [n for n in graph["nodes"] if n["op"] == "dense"]
    assert dense
    shipped = safetensors.numpy.load(container[16 + n_json :])
    for node in dense:
        kernel = prog.weights[node["weights"]["kernel"]]
        k, n = kernel.shape
        assert node["attrs"]["kernel_layout"] == "panels32" and node["attrs"]["units"] == n
        panels = shipped[node["weights"]["kernel"]]
        assert panels.shape == (-(-n // 32), k, 32)
        np.testing.assert_array_equal(panels[0, :, : min(n, 32)], kernel[:, :32])
        np.testing.assert_array_equal(panels[-1, :, n - 32 * (panels.shape[0] - 1) :], 0)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ennclave", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_plan_json_and_plot(saved, tmp_path):
    png = tmp_path / "plan.png"
    r = _cli("plan", str(saved["res"]), "--json", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"cut_points", "recommended", "warnings"}
    keys = {
        "index",
        "name",
        "op_type",
        "tensor_shape",
        "enclave_params",
        "enclave_bytes",
        "public_params",
        "enclave_flops",
        "private_layers_inside",
    }
    assert all(keys <= set(c) for c in out["cut_points"])
    assert out["cut_points"][0]["enclave_params"] > out["cut_points"][-1]["enclave_params"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors_are_one_sentence(tmp_path):
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"this is not a zip file")
    r = _cli("plan", str(bad))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "broken.keras" in r.stderr
    r = _cli("plan", str(tmp_path / "missing.onnx"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    (tmp_path / "model.pt").write_bytes(b"torch")
    r = _cli("plan", str(tmp_path / "model.pt"))
    assert r.returncode == 2 and "Keras" in r.stderr and "ONNX" in r.stderr


def test_unreadable_model_error_type(tmp_path):
    bad = tmp_path / "broken.h5"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match=r"broken\.h5"):
        load_model(bad)


def test_samples_of_wrong_shape_are_refused(saved, tmp_path):
    from ennclave.errors import InputError

    with pytest.raises(InputError, match=r"takes \(N, 12, 12, 3\)"):
        split_model(
            saved["seq"],
            "p1",
            tmp_path / "b",
            samples=np.zeros((2, 5), "float32"),
            keystore=tmp_path / "ks.json",
        )
    assert list(tmp_path.iterdir()) == []


def test_keras_mask_stays_public(tmp_path):
    """A mask (Embedding(mask_zero=True)) is a second tensor beside the embeddings, so
    no cut is offered between the embedding and the masked pooling."""
    import keras

    inp = keras.Input((12,), dtype="int32", name="tokens")
    e = keras.layers.Embedding(50, 4, mask_zero=True, name="emb")(inp)
    p = keras.layers.GlobalAveragePooling1D(name="pool")(e)
    out = keras.layers.Dense(2, activation="softmax", name="head")(p)
    path = tmp_path / "masked.keras"
    keras.Model(inp, out).save(path)
    adapter = load_model(path)
    names = [c.name for c in find_cut_points(adapter.graph)]
    assert "emb" not in names and "pool" in names
    res = split_model(adapter, "pool", tmp_path / "b", keystore=tmp_path / "ks.json")
    assert res.verification.passed


def test_malformed_panels_kernel_is_a_clear_error(saved):
    from ennclave.errors import ProgramError

    adapter = load_model(saved["res"])
    prog = adapter.lower_private(find_cut_points(adapter.graph)[2])
    container = prog.to_container()
    n_json = struct.unpack("<Q", container[8:16])[0]
    graph = json.loads(container[16 : 16 + n_json])
    dense = next(n for n in graph["nodes"] if n["op"] == "dense")
    del dense["attrs"]["units"]
    with pytest.raises(ProgramError, match="units"):
        Program.from_parts(json.dumps(graph).encode(), container[16 + n_json :])
    dense["attrs"]["units"] = 10_000  # does not match the kernel's panel count
    with pytest.raises(ProgramError, match="does not fit"):
        Program.from_parts(json.dumps(graph).encode(), container[16 + n_json :])
