"""Transformers in the enclave: token ids and embeddings, attention, encoder blocks.

Small Keras encoders (random weights) built from Embedding, MultiHeadAttention,
LayerNormalization and gelu MLPs split at every block boundary, verify, and run through
the real worker with and without AVX-512 kernels."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

import ennclave
from ennclave.adapters.keras import KerasAdapter
from ennclave.errors import ProgramError, WorkerError
from ennclave.graph import find_cut_points
from ennclave.passes import optimize
from ennclave.reference import execute
from ennclave.split import split_model
from support import kernels as kernel_families

L = keras.layers
SEQ, VOCAB, HIDDEN = 6, 40, 16


def _block(x, i: int, causal: bool = False):
    a = L.MultiHeadAttention(2, HIDDEN // 2, name=f"attn{i}")(x, x, use_causal_mask=causal)
    x = L.LayerNormalization(epsilon=1e-5, name=f"ln_a{i}")(L.Add(name=f"res_a{i}")([x, a]))
    f = L.Dense(2 * HIDDEN, activation="gelu", name=f"ff1_{i}")(x)
    f = L.Dense(HIDDEN, name=f"ff2_{i}")(f)
    return L.LayerNormalization(epsilon=1e-5, name=f"ln_f{i}")(L.Add(name=f"res_f{i}")([x, f]))


def encoder_classifier(blocks: int = 3, causal: bool = False) -> keras.Model:
    """Token ids → embedding → `blocks` encoder blocks → mean pool → head."""
    ids = keras.Input((SEQ,), dtype="int32", name="ids")
    x = L.Embedding(VOCAB, HIDDEN, name="tok")(ids)
    for i in range(blocks):
        x = _block(x, i, causal)
    x = L.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(ids, L.Dense(3, name="head")(x))


def _ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (n, SEQ)).astype("int32")


def _block_cuts(adapter: KerasAdapter) -> list:
    names = {f"ln_f{i}" for i in range(10)}
    return [c for c in find_cut_points(adapter.graph) if c.tensor.name in names]


def test_embedding_in_the_enclave_rejects_out_of_range_ids_and_keeps_serving(tmp_path):
    ids = keras.Input((SEQ,), dtype="int32")
    x = L.Embedding(VOCAB, HIDDEN)(ids)
    model = keras.Model(ids, L.Dense(3)(_block(x, 0)))
    adapter = KerasAdapter.from_model(model)
    cut = find_cut_points(adapter.graph)[0]
    program = optimize(adapter.lower_private(cut))
    assert program.inputs[0].dtype == "int32"
    x = _ids(5)
    expected = np.asarray(model(x))
    np.testing.assert_allclose(execute(program, x), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ProgramError, match=r"not an integer in 0\.\.40"):
        execute(program, np.full((1, SEQ), VOCAB))
    split_model(adapter, cut.index, tmp_path / "b", keystore=tmp_path / "ks.json", n_random=4)
    with ennclave.load(tmp_path / "b", keystore=tmp_path / "ks.json") as m:
        np.testing.assert_allclose(m.predict(x), expected, atol=1e-4, rtol=1e-4)
        for bad in (VOCAB, -1, 2**31 - 1):
            x_bad = x.copy()
            x_bad[2, 3] = bad
            with pytest.raises(WorkerError, match=r"sample 2, position 3\) is not an integer"):
                m.predict(x_bad)
        # the worker keeps serving
        np.testing.assert_allclose(m.predict(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernels", kernel_families.KERNELS)
def test_encoder_splits_at_every_block_boundary(kernels, tmp_path, monkeypatch):
    kernel_families.use(kernels, monkeypatch)
    model = encoder_classifier(3)
    adapter = KerasAdapter.from_model(model)
    cuts = _block_cuts(adapter)
    assert [c.tensor.name for c in cuts] == ["ln_f0", "ln_f1", "ln_f2"]
    x = _ids(7, seed=1)
    expected = np.asarray(model(x))
    for c in cuts[:2]:
        out = tmp_path / f"b{c.index}"
        split_model(adapter, c.index, out, keystore=tmp_path / "ks.json", n_random=4)
        with ennclave.load(out, keystore=tmp_path / "ks.json") as m:
            got = m.predict(x, batch_size=4)  # a ragged last batch
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_causal_encoder_matches_keras():
    model = encoder_classifier(2, causal=True)
    adapter = KerasAdapter.from_model(model)
    (cut,) = [c for c in _block_cuts(adapter) if c.tensor.name == "ln_f0"]
    program = optimize(adapter.lower_private(cut))
    h = np.asarray(adapter.build_public(cut)(_ids(4, seed=2)))
    np.testing.assert_allclose(
        execute(program, h), np.asarray(model(_ids(4, seed=2))), atol=1e-5, rtol=1e-4
    )


def _keras_hub_classifier(blocks: int = 3) -> keras.Model:
    if os.environ.get("CI"):  # .ci/run installs it: a missing one is a failure there
        import keras_hub
    else:
        keras_hub = pytest.importorskip("keras_hub")
    ids = keras.Input((SEQ,), dtype="int32", name="ids")
    x = keras_hub.layers.TokenAndPositionEmbedding(VOCAB, SEQ, HIDDEN, name="embed")(ids)
    for i in range(blocks):
        x = keras_hub.layers.TransformerEncoder(
            2 * HIDDEN,
            2,
            activation="gelu",
            layer_norm_epsilon=1e-5,
            normalize_first=i % 2 == 1,
            name=f"block{i}",
        )(x)
    x = L.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(ids, L.Dense(3, name="head")(x))


def test_keras_hub_encoder_splits_at_every_block_boundary(tmp_path):
    # keras-hub with random weights (nothing downloaded); skipped outside CI without it.
    model = _keras_hub_classifier(3)
    adapter = KerasAdapter.from_model(model)
    by_name = {c.tensor.name: c for c in find_cut_points(adapter.graph)}
    cuts = [by_name[n] for n in ("ids", "embed", "block0", "block1", "block2")]
    x = _ids(5, seed=3)
    expected = np.asarray(model(x))
    for c in cuts:
        program = optimize(adapter.lower_private(c))
        h = x if c.tensor.name == "ids" else np.asarray(adapter.build_public(c)(x))
        np.testing.assert_allclose(execute(program, h), expected, atol=1e-5, rtol=1e-4)
    for c in (cuts[0], cuts[2]):  # token ids into the enclave; a cut between blocks
        out = tmp_path / f"b{c.index}"
        split_model(adapter, c.index, out, keystore=tmp_path / "ks.json", n_random=4)
        with ennclave.load(out, keystore=tmp_path / "ks.json") as m:
            np.testing.assert_allclose(m.predict(x), expected, atol=1e-4, rtol=1e-4)


def test_onnx_attention_matmul_of_computed_tensors(tmp_path, monkeypatch):
    # Self-attention as exporters write it: MatMul/Reshape/Transpose/Softmax chains, the
    # keys' Transpose read in place by matmul (transpose_b), an additive causal mask.
    pytest.importorskip("onnxruntime")
    from onnx import helper

    from test_onnx_adapter import c, check_all_cuts, save_model, w
    from test_onnx_ops import through_worker

    n = helper.make_node
    heads = [0, 4, 2, 4]
    nodes = [
        n("MatMul", ["x", "wq"], ["q"]),
        n("MatMul", ["x", "wk"], ["k"]),
        n("MatMul", ["x", "wv"], ["v"]),
        n("Reshape", ["q", "heads"], ["q4"]),
        n("Reshape", ["k", "heads"], ["k4"]),
        n("Reshape", ["v", "heads"], ["v4"]),
        n("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
        n("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        n("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
        n("MatMul", ["qh", "kt"], ["s"]),
        n("Div", ["s", "sqrt_d"], ["s2"]),
        n("Add", ["s2", "mask"], ["s3"]),
        n("Softmax", ["s3"], ["p"], axis=-1),
        n("MatMul", ["p", "vh"], ["o"]),
        n("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
        n("Reshape", ["ot", "merged"], ["om"]),
        n("MatMul", ["om", "wo"], ["y"]),
    ]
    mask = np.where(np.tril(np.ones((4, 4), bool)), 0.0, -1e9)
    inits = [
        w("wq", 8, 8),
        w("wk", 8, 8),
        w("wv", 8, 8),
        w("wo", 8, 5),
        c("heads", heads, np.int64),
        c("merged", [0, 4, 8], np.int64),
        c("sqrt_d", 2.0),
        c("mask", mask),
    ]
    path = save_model(tmp_path, "attention", nodes, [4, 8], [4, 5], inits)
    check_all_cuts(path, tmp_path)
    for kernel in kernel_families.available():
        monkeypatch.setenv("ENNCLAVE_KERNEL", kernel)
        (tmp_path / kernel).mkdir()
        through_worker(path, tmp_path / kernel)


def test_onnx_token_ids_gather_and_cls_pooling(tmp_path):
    # int64 token ids → Cast → Gather of an embedding table → dense → Gather of position 0
    # ([CLS] pooling) → dense: the ids may enter the enclave, every cut matches ONNX Runtime.
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx import TensorProto, helper

    from test_onnx_adapter import c, check_all_cuts, w
    from test_onnx_ops import through_worker

    n = helper.make_node
    nodes = [
        n("Cast", ["x"], ["ids"], to=TensorProto.INT32),
        n("Gather", ["table", "ids"], ["e"], axis=0),
        n("MatMul", ["e", "w1"], ["h"]),
        n("Gather", ["h", "zero"], ["cls"], axis=1),
        n("Gather", ["h", "pair"], ["two"], axis=1),
        n("ReduceMean", ["two"], ["m"], axes=[1], keepdims=0),
        n("Add", ["cls", "m"], ["s"]),
        n("MatMul", ["s", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "ids",
        [helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializer=[
            w("table", 30, 8),
            w("w1", 8, 8),
            w("w2", 8, 3),
            c("zero", 0, np.int64),
            c("pair", [-1, 2], np.int64),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "ids.onnx"
    onnx.save(model, str(path))
    cuts = check_all_cuts(path, tmp_path)
    assert cuts[0].tensor.dtype == "int64"
    through_worker(path, tmp_path)


def test_keras_hub_padding_mask_from_the_ids(tmp_path):
    # The padding mask computed from the enclaved token ids (not_equal(ids, 0)) masks the
    # padded keys; padded and unpadded rows match Keras, in the reference and the worker.
    if os.environ.get("CI"):  # .ci/run installs it: a missing one is a failure there
        import keras_hub
    else:
        keras_hub = pytest.importorskip("keras_hub")
    ids = keras.Input((SEQ,), dtype="int32", name="ids")
    mask = keras.ops.not_equal(ids, 0)
    x = keras_hub.layers.TokenAndPositionEmbedding(VOCAB, SEQ, HIDDEN)(ids)
    for i in range(2):
        x = keras_hub.layers.TransformerEncoder(
            2 * HIDDEN, 2, normalize_first=i == 1, name=f"block{i}"
        )(x, padding_mask=mask)
    model = keras.Model(ids, L.Dense(3)(L.GlobalAveragePooling1D()(x)))
    adapter = KerasAdapter.from_model(model)
    x = _ids(4, seed=4) % (VOCAB - 1) + 1
    x[1, 3:] = 0
    x[2, 1:] = 0
    expected = np.asarray(model(x))
    unmasked = np.asarray(model(np.where(x == 0, 7, x)))
    assert not np.allclose(expected[1:3], unmasked[1:3], atol=1e-3)  # the mask matters
    cut = find_cut_points(adapter.graph)[0]
    program = optimize(adapter.lower_private(cut))
    np.testing.assert_allclose(execute(program, x), expected, atol=1e-5, rtol=1e-4)
    split_model(adapter, cut.index, tmp_path / "b", keystore=tmp_path / "ks.json", n_random=4)
    with ennclave.load(tmp_path / "b", keystore=tmp_path / "ks.json") as m:
        np.testing.assert_allclose(m.predict(x), expected, atol=1e-4, rtol=1e-4)
    # Between blocks the ids cross the cut beside the residual stream, and the enclave
    # computes the mask again from them.
    (between,) = [c for c in find_cut_points(adapter.graph) if c.tensor.name == "block0"]
    assert [t.name for t in between.extra_inputs] == ["ids"]
    program = optimize(adapter.lower_private(between))
    assert [t.name for t in program.inputs] == ["block0", "ids"]
    split_model(adapter, between.index, tmp_path / "c", keystore=tmp_path / "ks.json", n_random=4)
    with ennclave.load(tmp_path / "c", keystore=tmp_path / "ks.json") as m:
        np.testing.assert_allclose(m.predict(x), expected, atol=1e-4, rtol=1e-4)


def test_onnx_integer_arithmetic_on_ids_is_refused(tmp_path):
    # Integer Div rounds differently from float32 division: ids may only be looked up.
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx import TensorProto, helper

    from ennclave.adapters.onnx import OnnxAdapter
    from ennclave.errors import UnsupportedOpError
    from test_onnx_adapter import c, w

    n = helper.make_node
    nodes = [
        n("Div", ["x", "two"], ["half"], name="halve"),
        n("Gather", ["table", "half"], ["e"], axis=0),
        n("ReduceMean", ["e"], ["y"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "ids_div",
        [helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[w("table", 30, 4), c("two", 2, np.int64)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "ids_div.onnx"
    onnx.save(model, str(path))
    ad = OnnxAdapter(path)
    with pytest.raises(UnsupportedOpError, match=r"halve.*integer tensor"):
        ad.lower_private(find_cut_points(ad.graph)[0])
