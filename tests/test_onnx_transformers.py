"""ONNX transformers as exporters write them: the mask ops (Where/Equal/Cast/Expand/
Not), decomposed layer norm and Erf gelu fused back into `layer_norm` and `gelu`, a
keras-hub classifier exported with tf2onnx and a torch.onnx-style BERT graph split at
every block boundary, each checked against ONNX Runtime and through the worker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from ennclave.adapters.onnx import OnnxAdapter  # noqa: E402
from ennclave.graph import find_cut_points  # noqa: E402
from ennclave.passes import optimize  # noqa: E402
from test_onnx_adapter import c, check_all_cuts, save_model, w  # noqa: E402
from test_onnx_ops import through_worker  # noqa: E402

N = helper.make_node
I64 = np.int64
MIN = float(np.finfo(np.float32).min)


def test_mask_ops_where_equal_cast_expand_not(tmp_path: Path) -> None:
    # A float tensor truncated to int32, compared with a constant (Equal → bool), its
    # negation (Not), Expand along a new axis and Where picking the float32 minimum
    # where the comparison holds: every op on the private side, every cut vs ORT.
    nodes = [
        N("MatMul", ["x", "w1"], ["h"]),
        N("Mul", ["h", "three"], ["h3"]),
        N("Cast", ["h3"], ["hi"], to=TensorProto.INT32),
        N("Equal", ["hi", "zero_i"], ["eq"]),
        N("Not", ["eq"], ["ne"]),
        N("Cast", ["ne"], ["nef"], to=TensorProto.FLOAT),
        N("Unsqueeze", ["h", "ax1"], ["hu"]),
        N("Expand", ["hu", "shape3"], ["he"]),
        N("Unsqueeze", ["eq", "ax1"], ["equ"]),
        N("Where", ["equ", "minf", "he"], ["masked"]),
        N("Softmax", ["masked"], ["p"], axis=-1),
        N("Cast", ["h"], ["hb"], to=TensorProto.BOOL),
        N("Cast", ["hb"], ["hbf"], to=TensorProto.FLOAT),
        N("Add", ["nef", "hbf"], ["flags"]),
        N("Unsqueeze", ["flags", "ax1"], ["fu"]),
        N("Mul", ["p", "fu"], ["pm"]),
        N("ReduceSum", ["pm", "ax1"], ["s"], keepdims=0),
        N("MatMul", ["s", "w2"], ["y"]),
    ]
    inits = [
        w("w1", 6, 6, scale=0.8),
        w("w2", 6, 3),
        c("three", 3.0),
        c("zero_i", 0, np.int32),
        c("ax1", [1], I64),
        c("shape3", [1, 3, 6], I64),
        c("minf", MIN),
    ]
    path = save_model(tmp_path, "mask_ops", nodes, [6], [3], inits)
    cuts = check_all_cuts(path, tmp_path, n=8)
    ad = OnnxAdapter(path)
    ops = {n.op for n in ad.lower_private(cuts[0]).nodes}
    assert {"where", "equal", "cast", "expand"} <= ops, ops
    through_worker(path, tmp_path)


# -- a keras-hub classifier exported with tf2onnx -------------------------------------
@pytest.fixture(scope="module")
def hub_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The classifier of test_transformers (TokenAndPositionEmbedding, three
    TransformerEncoder blocks, post- and pre-norm, exact gelu), exported by tf2onnx."""
    tf2onnx = pytest.importorskip("tf2onnx")
    import tensorflow as tf

    from test_transformers import SEQ, _keras_hub_classifier

    model = _keras_hub_classifier(3)
    spec = (tf.TensorSpec((None, SEQ), tf.int32, name="ids"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    path = tmp_path_factory.mktemp("hub") / "hub.onnx"
    onnx.save(proto, str(path))
    return path


def _block_outputs(ad: OnnxAdapter) -> dict[int, object]:
    """Block i's output: the last cut inside tf2onnx's name scope of block i."""
    out: dict[int, object] = {}
    for cut in find_cut_points(ad.graph):
        for i in range(3):
            if f"/block{i}_1/" in cut.tensor.name:
                out[i] = cut
    return out


def test_tf2onnx_keras_hub_classifier_splits_at_every_block_boundary(
    hub_onnx: Path, tmp_path: Path
) -> None:
    import ennclave
    from ennclave.plan import make_plan
    from ennclave.reference import execute
    from ennclave.runtime.public import PublicPart
    from ennclave.split import split_model
    from test_transformers import _ids

    ad = OnnxAdapter(hub_onnx)
    blocks = _block_outputs(ad)
    assert sorted(blocks) == [0, 1, 2]
    plan = {r.index: r for r in make_plan(ad).cut_points}
    assert all(plan[c.index].splittable for c in blocks.values())
    x = _ids(5, seed=3)
    want = ad.predict(x)  # ONNX Runtime
    ids_cut = find_cut_points(ad.graph)[0]
    for cut in [ids_cut, *blocks.values()]:
        program = optimize(ad.lower_private(cut))
        ops = [n.op for n in program.nodes]
        # tf2onnx's decomposed layer norms and 0.5·x·erfc(−x/√2) gelus are fused back.
        if cut.index < blocks[2].index:
            assert "layer_norm" in ops
            assert not any(
                n.op == "activation" and n.attrs["activation"]["fn"] in ("erf", "erfc")
                for n in program.nodes
            )
        if cut is ids_cut:
            assert program.inputs[0].dtype == "int32" and "gather" in ops
            hidden = x
        else:
            pub = tmp_path / f"public_{cut.index}.onnx"
            ad.save_public(cut, pub)
            hidden = PublicPart(pub, "onnx", ["CPUExecutionProvider"])(x)
        np.testing.assert_allclose(execute(program, hidden), want, atol=1e-5, rtol=1e-4)
    for cut in (ids_cut, blocks[0], blocks[1]):  # ids into the enclave; between blocks
        out = tmp_path / f"b{cut.index}"
        split_model(ad, cut.index, out, keystore=tmp_path / "ks.json", n_random=4)
        with ennclave.load(out, keystore=tmp_path / "ks.json") as m:
            np.testing.assert_allclose(m.predict(x, batch_size=3), want, atol=1e-4, rtol=1e-4)
