"""ONNX transformers as exporters write them: the mask ops (Where/Equal/Cast/Expand/
Not), decomposed layer norm and Erf gelu fused back into `layer_norm` and `gelu`, a
keras-hub classifier exported with tf2onnx and a torch.onnx-style BERT graph split at
every block boundary, each checked against ONNX Runtime and through the worker."""

from __future__ import annotations

import os
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


# -- a torch.onnx-style BERT encoder, built by hand -------------------------------------
V, S, H, HEADS, FF, LAYERS = 30, 8, 16, 2, 32, 3
DH = H // HEADS


def _shape_of(nodes: list, x: str, dims: list[int], out: str) -> None:
    """torch's x.view(x.size(0), x.size(1), *rest) for dynamic axes: Shape → Gather →
    Unsqueeze per kept dim, Concat with the constant rest → the target shape `out`."""
    nodes.append(N("Shape", [x], [f"{out}_shape"]))
    parts = []
    for d in dims:
        nodes.append(N("Gather", [f"{out}_shape", f"i{d}"], [f"{out}_g{d}"], axis=0))
        nodes.append(N("Unsqueeze", [f"{out}_g{d}", "ax0"], [f"{out}_u{d}"]))
        parts.append(f"{out}_u{d}")
    nodes.append(N("Concat", [*parts, f"{out}_rest"], [out], axis=0))


def _linear(nodes: list, inits: list, x: str, name: str, k: int, n: int) -> str:
    inits += [w(f"{name}.w", k, n, scale=k**-0.5), w(f"{name}.b", n, scale=0.1)]
    nodes.append(N("MatMul", [x, f"{name}.w"], [f"{name}.mm"]))
    nodes.append(N("Add", [f"{name}.mm", f"{name}.b"], [name]))
    return name


def _layer_norm(nodes: list, inits: list, x: str, name: str, decomposed: bool) -> str:
    gamma = np.random.default_rng(len(inits)).uniform(0.5, 1.5, H).astype(np.float32)
    inits += [c(f"{name}.g", gamma), w(f"{name}.b", H, scale=0.1)]
    if not decomposed:
        nodes.append(
            N("LayerNormalization", [x, f"{name}.g", f"{name}.b"], [name], axis=-1, epsilon=1e-12)
        )
        return name
    nodes += [  # torch.onnx before opset 17
        N("ReduceMean", [x], [f"{name}.mean"], axes=[-1]),
        N("Sub", [x, f"{name}.mean"], [f"{name}.d"]),
        N("Pow", [f"{name}.d", "two"], [f"{name}.sq"]),
        N("ReduceMean", [f"{name}.sq"], [f"{name}.var"], axes=[-1]),
        N("Add", [f"{name}.var", "eps"], [f"{name}.ve"]),
        N("Sqrt", [f"{name}.ve"], [f"{name}.std"]),
        N("Div", [f"{name}.d", f"{name}.std"], [f"{name}.n"]),
        N("Mul", [f"{name}.n", f"{name}.g"], [f"{name}.s"]),
        N("Add", [f"{name}.s", f"{name}.b"], [name]),
    ]
    return name


def bert_graph(tmp: Path, masked: bool, sdpa: bool = False, layers: int = LAYERS) -> Path:
    """What torch.onnx writes for a BERT encoder with dynamic batch (and fixed
    sequence) axes: Gather embeddings (position ids sliced from a buffer, token types
    an input or an expanded buffer), LayerNormalization for the embeddings and the
    decomposed form in the blocks, attention as MatMul/Transpose/Reshape with Shape
    subgraphs, the extended mask (1 − mask)·min_float via Unsqueeze/Cast/Sub/Mul, Erf
    gelu; the last hidden state is the output. The sequence axis is dynamic (pinned
    by `input_shapes` on load). `sdpa`: attention as torch exports
    scaled_dot_product_attention (q and kᵀ each scaled by √(1/√d), the scale computed
    from Shape(q)), the mask expanded to [N, 1, S, S] and applied by Where(bool(1 −
    mask), min_float, 1 − mask)."""
    nodes: list = []
    inits: list = [
        w("word", V, H),
        w("pos", S + 4, H),
        w("type", 2, H),
        c("pos_ids", np.arange(S + 4)[None], I64),
        c("i0", 0, I64),
        c("i1", 1, I64),
        c("ax0", [0], I64),
        c("ax1", [1], I64),
        c("ax2", [2], I64),
        c("seq", [S], I64),
        c("two", 2.0),
        c("eps", 1e-12),
        c("one", 1.0),
        c("half", 0.5),
        c("sqrt2", 1.4142135381698608),
        c("sqrt_dh", float(np.sqrt(DH))),
        c("minf", MIN),
        c("heads_rest", [HEADS, DH], I64),
        c("hidden_rest", [H], I64),
        c("zeros_types", np.zeros((1, S + 4)), I64),
        c("minus1", [-1], I64),
        c("big", [2**62], I64),
    ]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "seq"])]
    nodes += [
        N("Gather", ["word", "input_ids"], ["e_word"], axis=0),
        # position_ids[:, :seq] with seq = input_ids.size(1)
        N("Shape", ["input_ids"], ["ids_shape"]),
        N("Gather", ["ids_shape", "i1"], ["seq_len"], axis=0),
        N("Unsqueeze", ["seq_len", "ax0"], ["seq_end"]),
        N("Slice", ["pos_ids", "ax0", "seq_end", "ax1"], ["pos_slice"]),
        N("Gather", ["pos", "pos_slice"], ["e_pos"], axis=0),
    ]
    if masked:
        inputs += [
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "seq"]),
            helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["N", "seq"]),
        ]
        types = "token_type_ids"
    else:  # token types from the buffer, expanded to the input's shape
        nodes += [
            N("Slice", ["zeros_types", "ax0", "seq_end", "ax1"], ["types_slice"]),
            N("Expand", ["types_slice", "ids_shape"], ["types_full"]),
        ]
        types = "types_full"
    nodes += [
        N("Gather", ["type", types], ["e_type"], axis=0),
        N("Add", ["e_word", "e_type"], ["e_sum"]),
        N("Add", ["e_sum", "e_pos"], ["e_all"]),
    ]
    h = _layer_norm(nodes, inits, "e_all", "emb_ln", decomposed=False)
    if sdpa:
        nodes += [
            N("Gather", ["ids_shape", "i0"], ["batch"], axis=0),
            N("Unsqueeze", ["batch", "ax0"], ["ids_shape_b"]),
        ]
        inits.append(c("one_i", [1], I64))
    if masked and not sdpa:
        nodes += [
            N("Unsqueeze", ["attention_mask", "ax1"], ["m1"]),
            N("Unsqueeze", ["m1", "ax2"], ["m2"]),
            N("Cast", ["m2"], ["mf"], to=TensorProto.FLOAT),
            N("Sub", ["one", "mf"], ["inv"]),
            N("Mul", ["inv", "minf"], ["ext_mask"]),
        ]
    elif masked:  # transformers' _prepare_4d_attention_mask_for_sdpa
        nodes += [
            N("Unsqueeze", ["attention_mask", "ax1"], ["m1"]),
            N("Unsqueeze", ["m1", "ax2"], ["m2"]),
            N("Concat", ["ids_shape_b", "one_i", "seq_end", "seq_end"], ["m_shape"], axis=0),
            N("Expand", ["m2", "m_shape"], ["m4"]),
            N("Cast", ["m4"], ["mf"], to=TensorProto.FLOAT),
            N("Sub", ["one", "mf"], ["inv"]),
            N("Cast", ["inv"], ["inv_b"], to=TensorProto.BOOL),
            N("Where", ["inv_b", "minf", "inv"], ["ext_mask"]),
        ]

    for i in range(layers):
        p = f"l{i}"
        heads = {}
        for role in ("q", "k", "v"):
            t = _linear(nodes, inits, h, f"{p}.{role}", H, H)
            _shape_of(nodes, t, [0, 1], f"{p}.{role}.target")
            _ = inits.append(c(f"{p}.{role}.target_rest", [HEADS, DH], I64))
            nodes.append(N("Reshape", [t, f"{p}.{role}.target"], [f"{p}.{role}4"]))
            perm = [0, 2, 3, 1] if role == "k" else [0, 2, 1, 3]
            nodes.append(N("Transpose", [f"{p}.{role}4"], [f"{p}.{role}h"], perm=perm))
            heads[role] = f"{p}.{role}h"
        if sdpa:  # torch's SDPA symbolic: √(1/√d) from Shape(q)[-1], on q and on kᵀ
            nodes += [
                N("Shape", [heads["q"]], [f"{p}.qs"]),
                N("Slice", [f"{p}.qs", "minus1", "big", "ax0"], [f"{p}.qd"]),
                N("Cast", [f"{p}.qd"], [f"{p}.qdf"], to=TensorProto.FLOAT),
                N("Sqrt", [f"{p}.qdf"], [f"{p}.sq"]),
                N("Div", ["one", f"{p}.sq"], [f"{p}.scale"]),
                N("Sqrt", [f"{p}.scale"], [f"{p}.root"]),
                N("Mul", [heads["q"], f"{p}.root"], [f"{p}.qsc"]),
                N("Mul", [heads["k"], f"{p}.root"], [f"{p}.ksc"]),
                N("MatMul", [f"{p}.qsc", f"{p}.ksc"], [f"{p}.scaled"]),
            ]
        else:
            nodes += [
                N("MatMul", [heads["q"], heads["k"]], [f"{p}.scores"]),
                N("Div", [f"{p}.scores", "sqrt_dh"], [f"{p}.scaled"]),
            ]
        scores = f"{p}.scaled"
        if masked:
            nodes.append(N("Add", [scores, "ext_mask"], [f"{p}.masked"]))
            scores = f"{p}.masked"
        nodes += [
            N("Softmax", [scores], [f"{p}.probs"], axis=-1),
            N("MatMul", [f"{p}.probs", heads["v"]], [f"{p}.ctx"]),
            N("Transpose", [f"{p}.ctx"], [f"{p}.ctx_t"], perm=[0, 2, 1, 3]),
        ]
        _shape_of(nodes, f"{p}.ctx_t", [0, 1], f"{p}.merge")
        inits.append(c(f"{p}.merge_rest", [H], I64))
        nodes.append(N("Reshape", [f"{p}.ctx_t", f"{p}.merge"], [f"{p}.ctx_m"]))
        a = _linear(nodes, inits, f"{p}.ctx_m", f"{p}.o", H, H)
        nodes.append(N("Add", [a, h], [f"{p}.res1"]))
        h1 = _layer_norm(nodes, inits, f"{p}.res1", f"{p}.ln1", decomposed=i % 2 == 0)
        f = _linear(nodes, inits, h1, f"{p}.ff1", H, FF)
        nodes += [  # gelu as torch writes it
            N("Div", [f, "sqrt2"], [f"{p}.g0"]),
            N("Erf", [f"{p}.g0"], [f"{p}.g1"]),
            N("Add", [f"{p}.g1", "one"], [f"{p}.g2"]),
            N("Mul", [f, f"{p}.g2"], [f"{p}.g3"]),
            N("Mul", [f"{p}.g3", "half"], [f"{p}.gelu"]),
        ]
        f2 = _linear(nodes, inits, f"{p}.gelu", f"{p}.ff2", FF, H)
        nodes.append(N("Add", [f2, h1], [f"{p}.res2"]))
        h = _layer_norm(nodes, inits, f"{p}.res2", f"{p}.out", decomposed=True)
    nodes.append(N("Identity", [h], ["last_hidden_state"]))
    graph = helper.make_graph(
        nodes,
        "bert",
        inputs,
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["N", "seq", H])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = tmp / f"bert_{'masked' if masked else 'plain'}{'_sdpa' if sdpa else ''}.onnx"
    onnx.save(model, str(path))
    return path


def _bert_block_cuts(ad: OnnxAdapter) -> list:
    by_name = {cut.tensor.name: cut for cut in find_cut_points(ad.graph)}
    return [by_name[n] for n in ("emb_ln", *[f"l{i}.out" for i in range(LAYERS - 1)])]


@pytest.mark.parametrize("sdpa", [False, True], ids=["eager", "sdpa"])
def test_torch_style_bert_splits_at_every_block_boundary(sdpa: bool, tmp_path: Path) -> None:
    import ennclave
    from ennclave.reference import execute
    from ennclave.runtime.public import PublicPart
    from ennclave.split import split_model

    path = bert_graph(tmp_path, masked=False, sdpa=sdpa)
    ad = OnnxAdapter(path, input_shapes={"input_ids": (1, S)})  # dynamic seq pinned
    cuts = find_cut_points(ad.graph)
    assert cuts[0].tensor.dtype == "int64"
    blocks = _bert_block_cuts(ad)  # every block boundary is a cut point
    x = ad.random_inputs(5, np.random.default_rng(5))
    want = ad.predict(x)  # ONNX Runtime
    for cut in cuts:
        program = optimize(ad.lower_private(cut))
        if cut.position == 0:
            hidden = x
        else:
            pub = tmp_path / f"public_{cut.index}.onnx"
            ad.save_public(cut, pub)
            hidden = PublicPart(pub, "onnx", ["CPUExecutionProvider"])(x)
        np.testing.assert_allclose(execute(program, hidden), want, atol=1e-5, rtol=1e-4)
        if cut is cuts[0] or cut in blocks:
            # The decomposed layer norms and the Erf gelus are fused.
            layer_norms = 1 + 2 * LAYERS if cut is cuts[0] else 2 * (LAYERS - blocks.index(cut))
            assert [n.op for n in program.nodes].count("layer_norm") == layer_norms
            assert not any(
                n.op == "activation" and n.attrs["activation"]["fn"] == "erf" for n in program.nodes
            )
    for cut in (cuts[0], blocks[1]):  # ids into the enclave; between blocks
        out = tmp_path / f"b{cut.index}"
        split_model(ad, cut.index, out, keystore=tmp_path / "ks.json", n_random=4)
        with ennclave.load(out, keystore=tmp_path / "ks.json") as m:
            np.testing.assert_allclose(m.predict(x, batch_size=2), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sdpa", [False, True], ids=["eager", "sdpa"])
def test_torch_style_bert_with_attention_mask(sdpa: bool, tmp_path: Path) -> None:
    # input_ids, attention_mask and token_type_ids: after a cut the private side gets
    # the attention mask passed through and computes the extended mask again; padded
    # rows match ONNX Runtime, and their unpadded positions match the same sequences
    # run unpadded (a model pinned to the shorter length).
    import ennclave
    from ennclave.reference import execute
    from ennclave.runtime.public import PublicPart
    from ennclave.split import split_model

    path = bert_graph(tmp_path, masked=True, sdpa=sdpa)
    pins = {"input_ids": (1, S), "attention_mask": (1, S), "token_type_ids": (1, S)}
    ad = OnnxAdapter(path, input_shapes=pins)
    by_name = {cut.tensor.name: cut for cut in find_cut_points(ad.graph)}
    blocks = [by_name[n] for n in ("emb_ln", *[f"l{i}.out" for i in range(LAYERS - 1)])]
    assert all([t.name for t in b.extra_inputs] == ["attention_mask"] for b in blocks)
    rng = np.random.default_rng(6)
    keep = 5
    ids = rng.integers(1, V, (4, S))
    types = rng.integers(0, 2, (4, S))
    mask = np.ones((4, S), np.int64)
    mask[1:3, keep:] = 0  # rows 1 and 2 padded after `keep` tokens
    ids[1:3, keep:] = 0
    x = [ids, mask, types]
    want = ad.predict(x)
    unmasked = ad.predict([ids, np.ones_like(mask), types])
    assert not np.allclose(want[1:3], unmasked[1:3], atol=1e-3)  # the mask matters
    short = OnnxAdapter(path, input_shapes={k: (1, keep) for k in pins})
    alone = short.predict([ids[1:3, :keep], mask[1:3, :keep], types[1:3, :keep]])
    np.testing.assert_allclose(want[1:3, :keep], alone, atol=1e-5, rtol=1e-4)
    cuts = [find_cut_points(ad.graph)[0], *blocks]
    for cut in cuts:
        program = optimize(ad.lower_private(cut))
        assert [t.name for t in program.inputs[1:]] == [t.name for t in cut.extra_inputs]
        assert "softmax" in {n.op for n in program.nodes}  # the mask fused into it
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        if cut.position == 0:
            private = [feed[t.name] for t in program.inputs]
        else:
            pub = tmp_path / f"public_{cut.index}.onnx"
            ad.save_public(cut, pub)
            pub_part = PublicPart(pub, "onnx", ["CPUExecutionProvider"])
            ins = [i.name for i in onnx.load(str(pub)).graph.input]
            hidden = pub_part([feed[n] for n in ins] if len(ins) > 1 else feed[ins[0]])
            private = [hidden, *[feed[t.name] for t in cut.extra_inputs]]
        np.testing.assert_allclose(execute(program, private), want, atol=1e-5, rtol=1e-4)
    for cut in (cuts[0], blocks[1]):
        out = tmp_path / f"b{cut.index}"
        split_model(ad, cut.index, out, keystore=tmp_path / "ks.json", n_random=4)
        with ennclave.load(out, keystore=tmp_path / "ks.json") as m:
            got = m.predict(x, batch_size=3)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


# -- a keras-hub BertBackbone (three inputs, padding mask) exported with tf2onnx --------
@pytest.fixture(scope="module")
def bert_backbone_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    tf2onnx = pytest.importorskip("tf2onnx")
    if os.environ.get("CI"):  # .ci/run installs it: a missing one is a failure there
        import keras_hub
    else:
        keras_hub = pytest.importorskip("keras_hub")
    import keras
    import tensorflow as tf

    names = ("token_ids", "segment_ids", "padding_mask")
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=V,
        num_layers=3,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=S,
    )
    ins = {n: keras.Input((S,), dtype="int32", name=n) for n in names}
    out = keras.layers.Dense(3, name="head")(backbone(ins)["pooled_output"])
    model = keras.Model([ins[n] for n in names], out)
    spec = [tf.TensorSpec((None, S), tf.int32, name=n) for n in names]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    path = tmp_path_factory.mktemp("bert_backbone") / "bert_backbone.onnx"
    onnx.save(proto, str(path))
    return path, model


def test_tf2onnx_bert_backbone_with_padding_mask(bert_backbone_onnx, tmp_path: Path) -> None:
    # The padding mask crosses every block boundary beside the hidden state; padded rows
    # match ONNX Runtime (and Keras) in the reference at every cut and in the worker.
    import ennclave
    from ennclave.reference import execute
    from ennclave.runtime.public import PublicPart
    from ennclave.split import split_model

    path, model = bert_backbone_onnx
    ad = OnnxAdapter(path)
    rng = np.random.default_rng(7)
    ids = rng.integers(1, V, (4, S)).astype(np.int32)
    segments = rng.integers(0, 2, (4, S)).astype(np.int32)
    mask = np.ones((4, S), np.int32)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    x = [ids, segments, mask]
    want = ad.predict(x)
    np.testing.assert_allclose(want, np.asarray(model(x)), atol=1e-5)
    assert not np.allclose(want[1:3], ad.predict([ids, segments, np.ones_like(mask)])[1:3])
    feed = dict(zip(("token_ids", "segment_ids", "padding_mask"), x, strict=True))
    cuts = find_cut_points(ad.graph)
    # Block i's output: the last cut inside tf2onnx's name scope of layer i.
    blocks = {}
    for cut in cuts:
        for i in range(3):
            if f"/transformer_layer_{i}_1/" in cut.tensor.name:
                blocks[i] = cut
    assert sorted(blocks) == [0, 1, 2]
    assert [t.name for t in blocks[0].extra_inputs] == ["padding_mask"]
    for cut in cuts:
        program = optimize(ad.lower_private(cut))
        if cut.position == 0:
            hidden = feed[cut.tensor.name]
        else:
            pub = tmp_path / f"public_{cut.index}.onnx"
            ad.save_public(cut, pub)
            names = [i.name for i in onnx.load(str(pub)).graph.input]
            ins = [feed[n] for n in names]
            hidden = PublicPart(pub, "onnx", ["CPUExecutionProvider"])(
                ins if len(ins) > 1 else ins[0]
            )
        private = [hidden, *[feed[t.name] for t in cut.extra_inputs]]
        np.testing.assert_allclose(execute(program, private), want, atol=1e-5, rtol=1e-4)
    for cut in (cuts[0], blocks[0], blocks[1]):
        out = tmp_path / f"b{cut.index}"
        split_model(ad, cut.index, out, keystore=tmp_path / "ks.json", n_random=4)
        with ennclave.load(out, keystore=tmp_path / "ks.json") as m:
            np.testing.assert_allclose(m.predict(x, batch_size=3), want, atol=1e-4, rtol=1e-4)
