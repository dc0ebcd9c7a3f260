"""OnnxAdapter: for every offered cut, public part + lowered private part == model.

Models come from two sources: Keras exported through tf2onnx (NHWC in, transposes
around every conv: the layout-tracking path) and small hand-built ONNX graphs that pin
down individual op semantics (Gemm transB, count_include_pad, groups, ...).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from ennclave import reference  # noqa: E402
from ennclave.adapters.onnx import OnnxAdapter  # noqa: E402
from ennclave.errors import ModelLoadError, UnsupportedOpError  # noqa: E402
from ennclave.graph import CutPoint, find_cut_points  # noqa: E402
from ennclave.passes import optimize  # noqa: E402
from ennclave.program import Program  # noqa: E402
from ennclave.runtime.public import PublicPart  # noqa: E402

TOL = 1e-4
RNG = np.random.default_rng(42)


def check_all_cuts(path: Path, tmp: Path, n: int = 3) -> list[CutPoint]:
    ad = OnnxAdapter(path)
    x = ad.random_inputs(n, np.random.default_rng(1))
    want = ad.predict(x)
    cuts = find_cut_points(ad.graph)
    assert cuts and cuts[0].index == 0
    for cut in cuts:
        if cut.position == 0:
            hidden = x
        else:
            pub = tmp / f"{path.stem}_public_{cut.index}.onnx"
            ad.save_public(cut, pub)
            hidden = PublicPart(pub, "onnx", ["CPUExecutionProvider"])(x)
        prog = ad.lower_private(cut)
        # As split uses it: through the shared optimizer and the sealed container form.
        shipped = Program.from_container(optimize(prog).to_container())
        for p in (prog, shipped):
            got = reference.execute(p, hidden)
            assert got.shape == want.shape, (cut, got.shape, want.shape)
            err = float(np.abs(got - want).max())
            assert err <= TOL, f"cut {cut.index} ({cut.name}, {cut.op_type}): max err {err}"
    return cuts


# -- hand-built ONNX models ---------------------------------------------------------
def w(name: str, *shape: int, scale: float = 0.5) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def c(name: str, value: object, dtype: type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def save_model(
    tmp: Path, name: str, nodes: list, in_shape: list, out_shape: list, inits: list, opset: int = 17
) -> Path:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *out_shape])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = tmp / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def tmp(tmp_path: Path) -> Path:
    return tmp_path


def test_nchw_conv_groups_bn_pools_gemm(tmp: Path) -> None:
    N = helper.make_node
    nodes = [
        N(
            "Conv",
            ["x", "w1", "b1"],
            ["c1"],
            group=2,
            auto_pad="SAME_UPPER",
            strides=[1, 2],
            name="conv_g",
        ),
        N("BatchNormalization", ["c1", "g", "bt", "m", "v"], ["bn"], epsilon=1e-3, name="bn"),
        N("Relu", ["bn"], ["r1"]),
        N("Conv", ["r1", "w2"], ["c2"], pads=[2, 1, 2, 3], dilations=[2, 2], name="conv_d"),
        N("LeakyRelu", ["c2"], ["l2"], alpha=0.1),
        N(
            "AveragePool",
            ["l2"],
            ["ap"],
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            count_include_pad=1,
            name="avg_inc",
        ),
        N(
            "AveragePool",
            ["ap"],
            ["ap2"],
            kernel_shape=[2, 2],
            pads=[1, 1, 0, 0],
            strides=[1, 1],
            name="avg_exc",
        ),
        N("MaxPool", ["ap2"], ["mp"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
        N("HardSigmoid", ["mp"], ["hs"], alpha=0.3, beta=0.4),
        N("GlobalMaxPool", ["hs"], ["gp"]),
        N("Flatten", ["gp"], ["fl"]),
        N("Gemm", ["fl", "wg", "bg"], ["gm"], transB=1, alpha=0.7, beta=1.3, name="gemm"),
        N("Softmax", ["gm"], ["y"], axis=-1),
    ]
    inits = [
        w("w1", 6, 2, 3, 3),
        w("b1", 6),
        c("g", RNG.uniform(0.5, 1.5, 6)),
        w("bt", 6),
        w("m", 6),
        c("v", RNG.uniform(0.5, 2, 6)),
        w("w2", 5, 6, 3, 3),
        w("wg", 3, 5),
        w("bg", 1, 3),
    ]
    path = save_model(tmp, "nchw", nodes, [4, 9, 10], [3], inits)
    cuts = check_all_cuts(path, tmp)
    assert len(cuts) == len(nodes)
    prog = optimize(OnnxAdapter(path).lower_private(cuts[0]))
    ops = [n.op for n in prog.nodes]
    # BN folded into the conv, relu fused; one transpose in (NCHW input), none between.
    assert "scale_shift" not in ops and ops.count("transpose") == 1, ops
    assert prog.nodes[1].op == "conv" and prog.nodes[1].attrs["activation"]["fn"] == "relu"


def test_conv1d_pad_reduce_layernorm(tmp: Path) -> None:
    N = helper.make_node
    nodes = [
        N("Pad", ["x", "pads", "pv"], ["p"], mode="constant"),
        N("Conv", ["p", "w1", "b1"], ["c1"], auto_pad="SAME_LOWER", strides=[2]),
        N("Transpose", ["c1"], ["t"], perm=[0, 2, 1]),
        N("LayerNormalization", ["t", "ln_g", "ln_b"], ["ln"], axis=-1, epsilon=1e-4),
        N("ReduceSum", ["ln", "ax1"], ["rs"], keepdims=1),
        N("Sub", ["ln", "rs"], ["d"]),
        N("ReduceMax", ["d"], ["rm"], axes=[1], keepdims=0),
        N("Unsqueeze", ["rm", "ax2"], ["u"]),
        N("ReduceMean", ["u"], ["y"], axes=[2], keepdims=0),
    ]
    inits = [
        c("pads", [0, 0, 1, 0, 0, 2], np.int64),
        c("pv", 0.5),
        w("w1", 4, 3, 3),
        w("b1", 4),
        w("ln_g", 4),
        w("ln_b", 4),
        c("ax1", [2], np.int64),
        c("ax2", [2], np.int64),
    ]
    path = save_model(tmp, "c1d", nodes, [3, 11], [4], inits, opset=17)
    check_all_cuts(path, tmp)


def test_layernorm_4d_and_reduce_opset18(tmp: Path) -> None:
    N = helper.make_node
    nodes = [
        N("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], group=3),
        N("LayerNormalization", ["c1", "g"], ["ln"], axis=1),
        N("ReduceMin", ["ln", "ax"], ["rmin"], keepdims=1),
        N("Mul", ["ln", "rmin"], ["m"]),
        N("ReduceMean", ["m", "ax"], ["y"], keepdims=0),
    ]
    inits = [w("w1", 3, 1, 3, 3), w("g", 3, 1, 1), c("ax", [2, 3], np.int64)]
    path = save_model(tmp, "ln4d", nodes, [3, 5, 5], [3], inits, opset=18)
    check_all_cuts(path, tmp)


def test_activations_and_elementwise(tmp: Path) -> None:
    N = helper.make_node
    nodes = [
        N("MatMul", ["x", "k1"], ["mm"]),
        N("Add", ["mm", "b1"], ["h"]),
        # Erf-based GELU, written out the way exporters do.
        N("Div", ["h", "sqrt2"], ["g0"]),
        N("Erf", ["g0"], ["g1"]),
        N("Add", ["g1", "one"], ["g2"]),
        N("Mul", ["h", "g2"], ["g3"]),
        N("Mul", ["g3", "half"], ["g4"]),
        N("Gelu", ["g4"], ["ge"], approximate="tanh"),
        N("HardSwish", ["ge"], ["hw"]),
        N("Clip", ["hw", "zero", "six"], ["r6"]),
        N("Clip", ["r6", "lo"], ["cl"]),
        N("PRelu", ["cl", "slope"], ["pr"]),
        N("Elu", ["pr"], ["el"], alpha=0.5),
        N("Selu", ["el"], ["se"]),
        N("Abs", ["se"], ["ab"]),
        N("Sqrt", ["ab"], ["sq"]),
        N("Exp", ["sq"], ["ex"]),
        N("Log", ["ex"], ["lg"]),
        N("Neg", ["lg"], ["ng"]),
        N("Tanh", ["ng"], ["th"]),
        N("Sigmoid", ["th"], ["sg"]),
        N("Reciprocal", ["sg"], ["rc"]),
        N("Pow", ["rc", "two"], ["pw"]),
        N("Max", ["pw", "mx"], ["mxo"]),
        N("Min", ["mxo", "mn"], ["mno"]),
        N("Sub", ["one", "mno"], ["sb"]),
        N("Cast", ["sb"], ["cs"], to=TensorProto.FLOAT),
        N("Identity", ["cs"], ["id"]),
        N("Dropout", ["id"], ["dr"]),
        N("Unsqueeze", ["dr", "ax1"], ["us"]),
        N("Concat", ["us", "us"], ["cc"], axis=1),
        N("Transpose", ["cc"], ["tr"], perm=[0, 2, 1]),
        N("Reshape", ["tr", "shp"], ["rsh"]),
        N("Sum", ["rsh", "rsh", "bias2"], ["y"]),
    ]
    inits = [
        w("k1", 5, 6),
        w("b1", 6),
        c("sqrt2", np.sqrt(2)),
        c("one", 1.0),
        c("half", 0.5),
        c("zero", 0.0),
        c("six", 6.0),
        c("lo", -0.5),
        w("slope", 6, scale=0.2),
        c("two", 2.0),
        w("mx", 6),
        w("mn", 6, scale=2.0),
        c("ax1", [1], np.int64),
        c("shp", [0, -1], np.int64),
        w("bias2", 12),
    ]
    path = save_model(tmp, "acts", nodes, [5], [12], inits, opset=20)
    check_all_cuts(path, tmp)


def test_dynamic_batch_reshape_chain(tmp: Path) -> None:
    """PyTorch-style flatten: Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    N = helper.make_node
    nodes = [
        N("Conv", ["x", "w1", "b1"], ["c1"]),
        N("Relu", ["c1"], ["r1"]),
        N("Shape", ["r1"], ["s"]),
        N("Gather", ["s", "i0"], ["b"], axis=0),
        N("Unsqueeze", ["b", "ax0"], ["bu"]),
        N("Concat", ["bu", "m1"], ["shape"], axis=0),
        N("Reshape", ["r1", "shape"], ["f"]),
        N("Gemm", ["f", "wg"], ["y"]),
    ]
    inits = [
        w("w1", 2, 3, 2, 2),
        w("b1", 2),
        c("i0", 0, np.int64),
        c("ax0", [0], np.int64),
        c("m1", [-1], np.int64),
        w("wg", 18, 4),
    ]
    path = save_model(tmp, "dynflat", nodes, [3, 4, 4], [4], inits)
    cuts = check_all_cuts(path, tmp)
    # The Shape chain is constant: it does not hide the cut after the relu.
    assert "r1" in {cut.tensor.name for cut in cuts}


def test_unsupported_op_names_node(tmp: Path) -> None:
    N = helper.make_node
    nodes = [
        N("Relu", ["x"], ["r"]),
        N("Sin", ["r"], ["s"], name="the_sine"),
        N("Relu", ["s"], ["y"]),
    ]
    path = save_model(tmp, "sin", nodes, [4], [4], [])
    ad = OnnxAdapter(path)
    cuts = find_cut_points(ad.graph)
    with pytest.raises(UnsupportedOpError, match=r"the_sine.*Sin.*supported ops:.*Conv"):
        ad.lower_private(cuts[0])
    # Past the unsupported node the private part lowers fine.
    tail = ad.lower_private(cuts[-1])
    assert reference.execute(tail, np.ones((2, 4), np.float32)).shape == (2, 4)


def test_dynamic_matmul_lowers_to_matmul(tmp: Path) -> None:
    # A product of two computed tensors (attention) is a `matmul` (tests/test_transformers.py
    # has the attention graph); one that would broadcast is an error naming the node.
    N = helper.make_node
    nodes = [N("Relu", ["x"], ["r"]), N("MatMul", ["r", "r"], ["y"], name="attn")]
    path = save_model(tmp, "mm", nodes, [4, 4], [4, 4], [])
    check_all_cuts(path, tmp)
    ad = OnnxAdapter(path)
    assert [n.op for n in ad.lower_private(find_cut_points(ad.graph)[0]).nodes][-1] == "matmul"
    nodes = [
        N("Relu", ["x"], ["r"]),
        N("ReduceMean", ["r"], ["m"], axes=[1], keepdims=0),
        N("MatMul", ["m", "r"], ["y"], name="attn"),
    ]
    path = save_model(tmp, "mm_bcast", nodes, [3, 4, 4], [3, 4, 4], [], opset=13)
    ad = OnnxAdapter(path)
    with pytest.raises(UnsupportedOpError, match=r"attn.*without broadcasting"):
        ad.lower_private(find_cut_points(ad.graph)[0])


def test_old_opset_and_corrupt_file(tmp: Path) -> None:
    # Opset 11 is upgraded on load (tests/test_real_models.py splits such models);
    # before opset 7 the version converter has nothing to start from.
    path = save_model(tmp, "old", [helper.make_node("Relu", ["x"], ["y"])], [4], [4], [], opset=11)
    assert OnnxAdapter(path).opset == 13
    path = save_model(tmp, "older", [helper.make_node("Relu", ["x"], ["y"])], [4], [4], [], opset=6)
    with pytest.raises(ModelLoadError, match="reads opset 7 and later"):
        OnnxAdapter(path)
    bad = tmp / "bad.onnx"
    bad.write_bytes(b"\x08\x07this is not a protobuf" * 3)
    with pytest.raises(ModelLoadError, match="not a readable ONNX model"):
        OnnxAdapter(bad)


def test_graph_view_params_flops_weights(tmp: Path) -> None:
    N = helper.make_node
    nodes = [
        N("MatMul", ["x", "k"], ["h"], name="mm1"),
        N("Add", ["h", "b"], ["a"]),
        N("MatMul", ["a", "k"], ["y"], name="mm2"),
    ]  # k shared: counted once
    path = save_model(tmp, "params", nodes, [3], [3], [w("k", 3, 3), w("b", 3)])
    ad = OnnxAdapter(path)
    by = {n.name: n for n in ad.graph.nodes}
    assert by["mm1"].params == 9 and by["mm2"].params == 0
    assert by["mm1"].flops == 2 * 3 * 3
    assert ad.graph.inputs[0].shape == (None, 3)
    assert set(ad.node_weights()) == {"mm1", "Add_1", "mm2"}


def test_static_batch_model_runs_in_chunks(tmp: Path) -> None:
    N = helper.make_node
    # Exported with batch 1 baked in, including a Reshape to [1, -1].
    graph = helper.make_graph(
        [N("Conv", ["x", "k"], ["h"]), N("Tanh", ["h"], ["t"]), N("Reshape", ["t", "shp"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        initializer=[w("k", 4, 2, 2, 2), c("shp", [1, -1], np.int64)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp / "fixed.onnx"
    onnx.save(model, str(path))
    check_all_cuts(path, tmp, n=4)


# -- Keras models exported through tf2onnx ------------------------------------------
@pytest.fixture(scope="module")
def keras_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    keras = pytest.importorskip("keras")
    pytest.importorskip("tf2onnx")
    from keras import layers

    out = tmp_path_factory.mktemp("keras_onnx")
    rng = np.random.default_rng(0)

    def export(model: object, name: str, shape: tuple[int, ...]) -> Path:
        model.predict(np.zeros((1, *shape), np.float32), verbose=0)  # type: ignore[attr-defined]
        # Non-trivial BN statistics and biases, so that folding is exercised.
        for var in model.weights:  # type: ignore[attr-defined]
            if "moving_variance" in var.path:
                var.assign(rng.uniform(0.5, 2, var.shape))
            elif len(var.shape) == 1:
                var.assign(rng.normal(0, 0.3, var.shape))
        path = out / f"{name}.onnx"
        model.export(str(path), format="onnx", verbose=False)  # type: ignore[attr-defined]
        return path

    models = {}
    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    x = layers.BatchNormalization()(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(6, 3, strides=2, activation="swish")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(10)(x)
    x = layers.Dropout(0.1)(x)
    x = layers.Dense(3, activation="softmax")(x)
    models["cnn"] = export(keras.Model(inp, x), "cnn", (8, 8, 3))

    inp = keras.Input((8, 8, 3))
    x = layers.ZeroPadding2D(1)(inp)
    x = layers.Conv2D(8, 3, activation="relu")(x)
    x = layers.BatchNormalization()(x)
    y = layers.DepthwiseConv2D(3, padding="same")(x)
    y = layers.Activation("swish")(y)
    y = layers.Conv2D(8, 1)(y)
    x = layers.Add()([x, y])
    x = layers.AveragePooling2D(2)(x)
    x = layers.SeparableConv2D(6, 3, padding="same", activation="relu6")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.LayerNormalization()(x)
    x = layers.Dense(5, activation="tanh")(x)
    models["residual"] = export(keras.Model(inp, x), "residual", (8, 8, 3))

    inp = keras.Input((16, 4))
    x = layers.Conv1D(6, 3, padding="causal", dilation_rate=2, activation="elu")(inp)
    x = layers.MaxPooling1D(2)(x)
    x = layers.Conv1D(6, 3, strides=2, padding="same", activation="leaky_relu")(x)
    x = layers.Concatenate()([x, layers.Activation("sigmoid")(x)])
    x = layers.GlobalMaxPooling1D()(x)
    x = layers.Dense(4, activation="hard_sigmoid")(x)
    x = layers.Dense(3, activation="selu")(x)
    models["conv1d"] = export(keras.Model(inp, x), "conv1d", (16, 4))

    inp = keras.Input((6,))
    x = layers.Dense(8, activation="swish")(inp)
    x = layers.Reshape((2, 4))(x)
    x = layers.LayerNormalization()(x)
    x = layers.Dense(4)(x)
    x = layers.Permute((2, 1))(x)
    x = layers.Flatten()(x)
    x = layers.Dense(3, activation="softmax")(x)
    models["mlp"] = export(keras.Model(inp, x), "mlp", (6,))
    return models


def test_keras_cnn(keras_models: dict[str, Path], tmp: Path) -> None:
    path = keras_models["cnn"]
    cuts = check_all_cuts(path, tmp)
    prog = optimize(OnnxAdapter(path).lower_private(cuts[0]))
    # tf2onnx's NHWC->NCHW transposes around each conv cancel out entirely.
    assert "transpose" not in [n.op for n in prog.nodes]


def test_keras_residual_block_offers_no_inner_cut(keras_models: dict[str, Path], tmp: Path) -> None:
    path = keras_models["residual"]
    cuts = check_all_cuts(path, tmp)
    graph = OnnxAdapter(path).graph
    # The residual Add: the only Add whose two inputs both depend on the model input.
    add = next(
        i
        for i, n in enumerate(graph.nodes)
        if n.op_type == "Add" and not set(n.inputs) & graph.constant_tensors
    )
    add_inputs = set(graph.nodes[add].inputs)
    skip = min(i for i, n in enumerate(graph.nodes) if set(n.outputs) & add_inputs)
    positions = {cut.position for cut in cuts}
    # Before the block and after the Add are cuts; nothing in between is.
    assert skip + 1 in positions and add + 1 in positions
    assert not positions & set(range(skip + 2, add + 1))


def test_keras_conv1d(keras_models: dict[str, Path], tmp: Path) -> None:
    check_all_cuts(keras_models["conv1d"], tmp)


def test_keras_mlp_reshape_permute_layernorm(keras_models: dict[str, Path], tmp: Path) -> None:
    cuts = check_all_cuts(keras_models["mlp"], tmp)
    # Dense on a 3-D input: tf2onnx reshapes [N, 2, 4] -> [N*2, 4] around the MatMul.
    # Those rows are not samples, so they are never offered as cuts.
    graph = OnnxAdapter(keras_models["mlp"]).graph
    assert graph.uncuttable
    assert not graph.uncuttable & {cut.tensor.name for cut in cuts}
