"""Models as other people ship them (issue #12): old ONNX opsets with -1 batch dims,
exporters' Shape→Gather→Unsqueeze→Concat→Reshape flatten, dynamic spatial sizes fixed
with --input-shape, integer model inputs, Keras 2 era .h5 files, and keras.applications
architectures with random weights. Each model is split at every cut `plan` marks
splittable (the large keras.applications ones at a spread of them), run through the
real worker and compared with the framework; `plan` and `split` must agree cut by cut.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
keras = pytest.importorskip("keras")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import ennclave  # noqa: E402
from ennclave import reference  # noqa: E402
from ennclave.adapters import load_model, parse_input_shape  # noqa: E402
from ennclave.errors import EnnclaveError, ModelLoadError  # noqa: E402
from ennclave.graph import find_cut_points  # noqa: E402
from ennclave.passes import optimize  # noqa: E402
from ennclave.plan import make_plan  # noqa: E402
from ennclave.runtime.public import PublicPart  # noqa: E402
from ennclave.split import split_model  # noqa: E402
from ennclave.verify import WORSE_THAN_FRAMEWORK  # noqa: E402
from support.enclave_bundle import needs_worker  # noqa: E402

RNG = np.random.default_rng(7)
N = helper.make_node


def _w(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _i64(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, np.int64), name)


def _save(tmp: Path, name: str, nodes, inputs, outputs, inits, opset: int) -> Path:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 6
    path = tmp / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def _vi(name: str, dims, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, dims)


def opset11_torch_flatten(tmp: Path) -> Path:
    """What torch.onnx wrote for `x.view(x.size(0), -1)` in opset 11, with its batch
    dimension stored as -1."""
    nodes = [
        N("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        N("Relu", ["c1"], ["r1"]),
        N("Shape", ["r1"], ["s"]),
        N("Gather", ["s", "zero"], ["n"], axis=0),
        N("Unsqueeze", ["n"], ["n1"], axes=[0]),
        N("Concat", ["n1", "minus1"], ["shape"], axis=0),
        N("Reshape", ["r1", "shape"], ["f"]),
        N("Gemm", ["f", "w2", "b2"], ["y"], transB=1),
    ]
    inits = [_w("w1", 4, 3, 3, 3), _w("b1", 4), _i64("zero", 0), _i64("minus1", [-1])]
    inits += [_w("w2", 5, 4 * 6 * 6, scale=0.05), _w("b2", 5)]
    return _save(
        tmp, "op11", nodes, [_vi("x", [-1, 3, 6, 6])], [_vi("y", [-1, 5])], inits, opset=11
    )


def detector_dynamic_hw(tmp: Path) -> Path:
    nodes = [
        N("Conv", ["images", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        N("Relu", ["c1"], ["r1"]),
        N(
            "Conv",
            ["r1", "w2", "b2"],
            ["c2"],
            pads=[1, 1, 1, 1],
            kernel_shape=[3, 3],
            strides=[2, 2],
        ),
        N("Sigmoid", ["c2"], ["s2"]),
        N("Mul", ["c2", "s2"], ["m2"]),  # SiLU, as YOLO exports write it
        N("GlobalAveragePool", ["m2"], ["g"]),
        N("Flatten", ["g"], ["f"]),
        N("Gemm", ["f", "w3", "b3"], ["y"], transB=1),
    ]
    inits = [_w("w1", 4, 3, 3, 3), _w("b1", 4), _w("w2", 6, 4, 3, 3), _w("b2", 6)]
    inits += [_w("w3", 5, 6), _w("b3", 5)]
    return _save(
        tmp,
        "detector",
        nodes,
        [_vi("images", ["N", 3, "H", "W"])],
        [_vi("y", ["N", 5])],
        inits,
        opset=13,
    )


def byte_histogram_int32(tmp: Path) -> Path:
    """An int32 input (ids) with an embedding-like public part: only cuts after the
    lookup carry floats into the enclave."""
    nodes = [
        N("Gather", ["emb", "ids"], ["e"], axis=0),
        N("ReduceMean", ["e"], ["m"], axes=[1], keepdims=0),
        N("Gemm", ["m", "w2", "b2"], ["h"], transB=1),
        N("Relu", ["h"], ["y"]),
    ]
    inits = [_w("emb", 40, 16), _w("w2", 5, 16), _w("b2", 5)]
    return _save(
        tmp,
        "ids",
        nodes,
        [_vi("ids", ["N", 12], TensorProto.INT32)],
        [_vi("y", ["N", 5])],
        inits,
        opset=13,
    )


def flatten_axis2(tmp: Path) -> Path:
    """Flatten(axis=2) on [N, C, H, W] merges the batch with C: the Gemm after it runs
    row by row, and the Reshape back splits the batch out again."""
    nodes = [
        N("Relu", ["x"], ["r"]),
        N("Flatten", ["r"], ["f"], axis=2),  # [N*4, 9]
        N("Gemm", ["f", "w", "b"], ["g"], transB=1),  # [N*4, 3]
        N("Reshape", ["g", "back"], ["y"]),  # [N, 12]
    ]
    inits = [_w("w", 3, 9), _w("b", 3), _i64("back", [-1, 12])]
    return _save(tmp, "flat2", nodes, [_vi("x", ["N", 4, 3, 3])], [_vi("y", ["N", 12])], inits, 13)


def keras2_h5_with_groups(tmp: Path) -> Path:
    """A Keras 2 era .h5: its DepthwiseConv2D config carries `groups: 1`, which Keras 3
    refuses."""
    import h5py

    L = keras.layers
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            L.DepthwiseConv2D(3, padding="same", name="dw"),
            L.ReLU(),
            L.Flatten(),
            L.Dense(4),
        ]
    )
    path = tmp / "keras2.h5"
    model.save(path)
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        for layer in config["config"]["layers"]:
            if layer["class_name"] == "DepthwiseConv2D":
                layer["config"]["groups"] = 1
        f.attrs["model_config"] = json.dumps(config)
    return path


def _probe(adapter, n: int = 4) -> np.ndarray:
    return adapter.random_inputs(n, np.random.default_rng(3))


def _float64_reference(adapter, index: int, bundle: Path, x: np.ndarray) -> np.ndarray:
    """The enclave program run in float64 on the bundle's own public output."""
    cut = find_cut_points(adapter.graph)[index]
    program = optimize(adapter.lower_private(cut))
    manifest = json.loads((bundle / "manifest.json").read_text())
    pub = manifest["public"]
    mid = PublicPart(bundle / pub["file"], pub["framework"])(x) if pub else x
    return reference.execute(program, np.asarray(mid, np.float32), exact=True)


def check_plan_agrees_with_split(
    path: Path, tmp: Path, *, input_shapes=None, cuts: list[int] | None = None
) -> list[int]:
    """Split at each cut (all, or `cuts`): splittable ones must split, verify and run
    through the worker equal to the framework; the others must be refused."""
    adapter = load_model(path, input_shapes)
    plan = make_plan(adapter)
    x = _probe(adapter)
    want = np.asarray(adapter.predict(x), np.float64)
    split_ok = []
    for report in plan.cut_points:
        if cuts is not None and report.index not in cuts:
            continue
        out = tmp / f"{path.stem}-{report.index}"
        try:
            split_model(adapter, report.index, out, keystore=tmp / "ks.json", n_random=4)
        except EnnclaveError as e:
            assert not report.splittable, f"cut {report.index} is splittable but split said: {e}"
            continue
        assert report.splittable, f"cut {report.index} split but plan said {report.blocked_by}"
        with ennclave.load(out, keystore=tmp / "ks.json") as m:
            got = np.asarray(m.predict(x), np.float64)
        got = got.reshape(want.shape)
        err = float(np.abs(got - want).max())
        if err > 1e-4 + 1e-4 * float(np.abs(want).max()):
            # Deep CNNs: judge the worker as verification does, against float64.
            exact = _float64_reference(adapter, report.index, out, x)
            worker64 = float(np.abs(got - exact).max())
            framework64 = float(np.abs(want - exact).max())
            assert worker64 <= WORSE_THAN_FRAMEWORK * framework64 + 1e-4, (
                f"cut {report.index}: worker off float64 by {worker64}, Keras by {framework64}"
            )
        split_ok.append(report.index)
    return split_ok


@needs_worker
def test_opset11_with_minus_one_batch_and_shape_chain_flatten(tmp_path: Path) -> None:
    path = opset11_torch_flatten(tmp_path)
    ok = check_plan_agrees_with_split(path, tmp_path)
    assert ok == list(range(len(make_plan(load_model(path)).cut_points)))


@needs_worker
def test_dynamic_spatial_size_needs_input_shape(tmp_path: Path) -> None:
    path = detector_dynamic_hw(tmp_path)
    with pytest.raises(ModelLoadError, match=r"--input-shape images=1x3x"):
        load_model(path)
    shapes = dict([parse_input_shape("images=1x3x10x10")])
    ok = check_plan_agrees_with_split(path, tmp_path, input_shapes=shapes)
    assert len(ok) >= 6
    with pytest.raises(ModelLoadError, match="does not take"):
        load_model(path, {"pixels": (1, 3, 10, 10)})


@needs_worker
def test_int32_input_splits_everywhere(tmp_path: Path) -> None:
    # The ids themselves may enter the enclave (its Gather becomes a checked `gather`);
    # later cuts carry floats. Either way the bundle takes integer ids only.
    path = byte_histogram_int32(tmp_path)
    plan = make_plan(load_model(path))
    assert plan.cut_points[0].splittable
    ok = check_plan_agrees_with_split(path, tmp_path)
    assert ok == [c.index for c in plan.cut_points]
    for i in ok[:2]:
        with ennclave.load(tmp_path / f"{path.stem}-{i}", keystore=tmp_path / "ks.json") as m:
            with pytest.raises(EnnclaveError, match="integer ids"):
                m.predict(np.zeros((1, 12), np.float32))


@needs_worker
def test_flatten_on_axis_2(tmp_path: Path) -> None:
    path = flatten_axis2(tmp_path)
    ok = check_plan_agrees_with_split(path, tmp_path)
    assert 0 in ok


@needs_worker
def test_keras2_h5_with_groups_on_depthwise(tmp_path: Path) -> None:
    path = keras2_h5_with_groups(tmp_path)
    with pytest.raises(Exception, match="groups"):
        keras.saving.load_model(path, compile=False)  # what a user hit before
    ok = check_plan_agrees_with_split(path, tmp_path)
    assert ok and 0 in ok


def test_unreadable_keras_file_shows_the_whole_reason(tmp_path: Path) -> None:
    path = tmp_path / "broken.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match=r"The framework said: .{20,}"):
        load_model(path)


def test_ancient_opset_and_bad_input_shape_are_one_sentence(tmp_path: Path) -> None:
    nodes = [N("Relu", ["x"], ["y"])]
    path = _save(tmp_path, "old", nodes, [_vi("x", ["N", 3])], [_vi("y", ["N", 3])], [], opset=6)
    with pytest.raises(ModelLoadError, match="opset 6; ennclave reads opset 7 and later"):
        load_model(path)
    with pytest.raises(ModelLoadError, match="is not NAME="):
        parse_input_shape("images:1x3")


# -- keras.applications with random weights ------------------------------------------


def _recalibrate_batchnorm(model, x: np.ndarray) -> None:
    """Random weights make activations explode layer by layer; set every BatchNorm's
    moving statistics to the statistics of a real batch (momentum 0, one step with a
    zero learning rate), as a trained network's would be."""
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="mse")
    model.train_on_batch(x, np.zeros((len(x), *model.output.shape[1:]), np.float32))


APPLICATIONS = {
    "EfficientNetB0": "efficientnet",
    "ResNet50": "resnet",
    "DenseNet121": "densenet",
}


@needs_worker
@pytest.mark.parametrize("arch", sorted(APPLICATIONS))
def test_keras_applications_split(arch: str, tmp_path: Path) -> None:
    ctor = getattr(keras.applications, arch)
    # Seeded: with unseeded random weights one run in many drew a model whose float32
    # rounding (in Keras and in the worker alike) was far above the usual.
    keras.utils.set_random_seed(1)
    model = ctor(weights=None, input_shape=(32, 32, 3), classes=10)
    x = np.random.default_rng(0).random((16, 32, 32, 3), dtype=np.float32)
    _recalibrate_batchnorm(model, x)
    path = tmp_path / f"{arch}.keras"
    model.save(path)
    plan = make_plan(load_model(path))
    splittable = [c.index for c in plan.cut_points if c.splittable]
    blocked = [c for c in plan.cut_points if not c.splittable]
    assert len(splittable) >= len(plan.cut_points) - 2, [c.blocked_by for c in blocked]
    # Every cut's `splittable` is what lowering says; split through the worker at a
    # spread of them (all ~40-85 would take minutes) and at every blocked one.
    picks = sorted({splittable[0], splittable[len(splittable) // 2], splittable[-1]})
    picks += [c.index for c in blocked]
    ok = check_plan_agrees_with_split(path, tmp_path, cuts=picks)
    assert ok == [i for i in picks if i in splittable]


def test_random_probe_inputs_are_in_a_realistic_range(tmp_path: Path) -> None:
    path = opset11_torch_flatten(tmp_path)
    x = _probe(load_model(path), 64)
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() < 1.0


def test_cli_input_shape(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = detector_dynamic_hw(tmp_path)
    cmd = [sys.executable, "-m", "ennclave", "plan", str(path), "--json"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--input-shape images=1x3x" in run.stderr + run.stdout
    run = subprocess.run(
        [*cmd, "--input-shape", "images=1x3x10x10"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    assert all(c["splittable"] for c in plan["cut_points"])
    assert plan["cut_points"][1]["tensor_shape"] == [None, 4, 10, 10]
