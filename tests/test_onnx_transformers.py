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
