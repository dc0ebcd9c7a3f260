"""keras-hub BERT in the enclave: a BertBackbone classifier (random weights, no download)
of three inputs (token ids, segment ids, padding mask) splits at every block boundary,
verifies, and the worker's outputs equal Keras; the padding mask is a model input that
crosses the cut beside the residual stream, and padded and unpadded sequences match
Keras; out-of-range ids in an enclaved embedding are a clear error."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

import ennclave
from ennclave.adapters.keras import KerasAdapter
from ennclave.errors import WorkerError
from ennclave.graph import find_cut_points, input_ancestors
from ennclave.passes import optimize
from ennclave.plan import make_plan
from ennclave.reference import execute
from ennclave.split import split_model

if os.environ.get("CI"):  # .ci/run installs it: a missing one is a failure there
    import keras_hub
else:
    keras_hub = pytest.importorskip("keras_hub")

SEQ, VOCAB, LAYERS = 8, 50, 3
INPUTS = ("token_ids", "segment_ids", "padding_mask")


def bert_classifier(seq: int = SEQ) -> keras.Model:
    """keras-hub BertBackbone (3 layers, hidden 16) with a fixed sequence length and a
    3-class head on its pooled ([CLS], dense tanh) output."""
    keras.utils.set_random_seed(3)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB,
        num_layers=LAYERS,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=seq,
    )
    inputs = {k: keras.Input((seq,), dtype="int32", name=k) for k in INPUTS}
    out = backbone(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(out["pooled_output"]))
    # BERT's initialiser (stddev 0.02) makes every output nearly the same; weights of a
    # trained model's scale make the tokens, segments and the mask matter.
    rng = np.random.default_rng(3)
    for w in model.weights:
        if len(w.shape) >= 2:
            w.assign(rng.normal(0, 0.5, w.shape).astype("float32"))
        elif "gamma" not in w.path and "beta" not in w.path:
            w.assign(rng.normal(0, 0.1, w.shape).astype("float32"))
    return model


def batch(n: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """Sequences of different lengths (1 … SEQ), padded with id 0 and mask 0."""
    rng = np.random.default_rng(seed)
    lengths = np.array([SEQ, 1, 3, 5, SEQ - 1, 2][:n])
    keep = np.arange(SEQ) < lengths[:, None]
    ids = np.where(keep, rng.integers(1, VOCAB, (n, SEQ)), 0).astype("int32")
    seg = np.where(keep & (np.arange(SEQ) >= lengths[:, None] // 2), 1, 0).astype("int32")
    return {"token_ids": ids, "segment_ids": seg, "padding_mask": keep.astype("int32")}


def _public(adapter: KerasAdapter, point, x: dict[str, np.ndarray]) -> np.ndarray:
    """The cut tensor from the public part alone."""
    ins = [x[t.name] for t in input_ancestors(adapter.graph, {point.tensor.name})]
    return np.asarray(adapter.build_public(point)(ins[0] if len(ins) == 1 else ins))


@pytest.fixture(scope="module")
def bert():
    model = bert_classifier()
    return model, KerasAdapter.from_model(model)


# The embeddings' layer norm and every encoder block's output (the last one: only the
# pooler and the head stay private).
BOUNDARIES = ["bert_backbone/embeddings_layer_norm"] + [
    f"bert_backbone/transformer_layer_{i}" for i in range(LAYERS)
]


def test_plan_lists_the_block_boundaries(bert):
    _, adapter = bert
    cuts = {c.name: c for c in find_cut_points(adapter.graph)}
    assert set(BOUNDARIES) <= set(cuts)
    # Behind the embeddings only the padding mask crosses beside the residual stream.
    for name in BOUNDARIES[:-1]:
        assert [t.name for t in cuts[name].extra_inputs] == ["padding_mask"]
    assert cuts[BOUNDARIES[-1]].extra_inputs == ()
    reports = {c.name: c for c in make_plan(adapter).cut_points}
    assert all(reports[b].splittable for b in BOUNDARIES), [
        reports[b].blocked_by for b in BOUNDARIES
    ]
    assert reports[BOUNDARIES[1]].extra_inputs == ["padding_mask"]


@pytest.mark.parametrize("cut", BOUNDARIES)
def test_splits_at_every_block_boundary_and_matches_keras(bert, cut, tmp_path):
    model, adapter = bert
    x = batch()
    expected = np.asarray(model(x))
    point = next(c for c in find_cut_points(adapter.graph) if c.name == cut)
    program = optimize(adapter.lower_private(point))
    feed = [_public(adapter, point, x), *(x[t.name] for t in point.extra_inputs)]
    np.testing.assert_allclose(execute(program, feed), expected, atol=2e-5, rtol=1e-4)
    res = split_model(adapter, point.index, tmp_path / "b", keystore=tmp_path / "ks.json")
    assert res.verification.passed
    with ennclave.load(tmp_path / "b", keystore=tmp_path / "ks.json") as m:
        assert m.input_names == ["padding_mask", "segment_ids", "token_ids"]
        np.testing.assert_allclose(m.predict(x), expected, atol=1e-4, rtol=1e-4)
        ordered = [x[n] for n in m.input_names]
        np.testing.assert_allclose(m.predict(ordered, batch_size=4), expected, atol=1e-4)


@pytest.fixture(scope="module")
def after_block0(bert, tmp_path_factory):
    _, adapter = bert
    root = tmp_path_factory.mktemp("bert")
    split_model(adapter, BOUNDARIES[1], root / "b", keystore=root / "ks.json")
    with ennclave.load(root / "b", keystore=root / "ks.json") as m:
        yield m


def test_padding_mask_crosses_the_cut_and_matches_keras(bert, after_block0):
    model, _ = bert
    m = after_block0
    assert m.private_input_names == [BOUNDARIES[1], "padding_mask"]
    x = batch()
    expected = np.asarray(model(x))
    unmasked = dict(x, padding_mask=np.ones_like(x["padding_mask"]))
    # The mask matters for every padded row, and the worker applies it as Keras does.
    differ = np.abs(np.asarray(model(unmasked)) - expected).max(axis=1) > 1e-3
    assert differ.tolist() == [False, True, True, True, True, True]
    np.testing.assert_allclose(m.predict(x), expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(
        m.predict(unmasked), np.asarray(model(unmasked)), atol=1e-4, rtol=1e-4
    )
    # Ids under the mask change nothing, in Keras and in the split.
    noisy = dict(x, token_ids=np.where(x["padding_mask"] == 1, x["token_ids"], 7))
    np.testing.assert_allclose(np.asarray(model(noisy)), expected, atol=1e-5)
    np.testing.assert_allclose(m.predict(noisy), expected, atol=1e-4, rtol=1e-4)


def test_out_of_range_token_ids_are_clear_and_the_worker_keeps_serving(bert, tmp_path):
    # Cut at the model input: the token and segment ids enter the enclave.
    model, adapter = bert
    (first,) = [c for c in find_cut_points(adapter.graph) if c.index == 0]
    res = split_model(adapter, 0, tmp_path / "b", keystore=tmp_path / "ks.json", n_random=4)
    assert [t["name"] for t in res.manifest["private"]["inputs"]] == [
        "padding_mask",
        "segment_ids",
        "token_ids",
    ]
    assert first.tensor.name == "padding_mask"
    x = batch()
    expected = np.asarray(model(x))
    with ennclave.load(tmp_path / "b", keystore=tmp_path / "ks.json") as m:
        np.testing.assert_allclose(m.predict(x), expected, atol=1e-4, rtol=1e-4)
        for key, bad, limit in (("token_ids", VOCAB, VOCAB), ("token_ids", -1, VOCAB),
                                ("segment_ids", 2, 2)):  # fmt: skip
            x_bad = {k: v.copy() for k, v in x.items()}
            x_bad[key][2, 1] = bad
            with pytest.raises(
                WorkerError, match=rf"sample 2, position 1\) is not an integer in 0\.\.{limit}"
            ):
                m.predict(x_bad)
        np.testing.assert_allclose(m.predict(x), expected, atol=1e-4, rtol=1e-4)


def test_bert_text_classifier_of_dynamic_length_is_pinned_by_input_shapes(tmp_path):
    # keras-hub's own BertTextClassifier (no preprocessor) takes sequences of any length;
    # input_shapes (--input-shape) fixes it, and every shape is worked out again.
    keras.utils.set_random_seed(5)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=SEQ,
    )  # fmt: skip
    model = keras_hub.models.BertTextClassifier(backbone, num_classes=3, preprocessor=None)
    assert model.inputs[0].shape == (None, None)
    shapes = {k: (1, SEQ) for k in INPUTS}
    adapter = KerasAdapter.from_model(model, input_shapes=shapes)
    point = next(c for c in find_cut_points(adapter.graph) if c.name.endswith("layer_0"))
    assert point.tensor.shape == (None, SEQ, 16)
    x = batch(4)
    expected = np.asarray(model(x))
    program = optimize(adapter.lower_private(point))
    feed = [_public(adapter, point, x), x["padding_mask"]]
    np.testing.assert_allclose(execute(program, feed), expected, atol=2e-5, rtol=1e-4)
    split_model(adapter, point.index, tmp_path / "b", keystore=tmp_path / "ks.json", n_random=4)
    with ennclave.load(tmp_path / "b", keystore=tmp_path / "ks.json") as m:
        np.testing.assert_allclose(m.predict(x), expected, atol=1e-4, rtol=1e-4)


def test_mean_pooled_sentence_encoder_with_int64_inputs(tmp_path):
    # A sentence-encoder head (MiniLM style): the sequence output mean-pooled under the
    # padding mask, sum(h · mask) / max(sum(mask), 1e-9), on int64 inputs. The mask is
    # cast and expanded on the public side too, and the enclave recomputes both.
    keras.utils.set_random_seed(7)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=SEQ,
    )  # fmt: skip
    ops = keras.ops
    inputs = {k: keras.Input((SEQ,), dtype="int64", name=k) for k in INPUTS}
    h = backbone(inputs)["sequence_output"]
    mask = ops.expand_dims(ops.cast(inputs["padding_mask"], "float32"), -1)
    pooled = ops.sum(h * mask, axis=1) / ops.maximum(ops.sum(mask, axis=1), 1e-9)
    model = keras.Model(inputs, pooled)
    adapter = KerasAdapter.from_model(model)
    (point,) = [c for c in find_cut_points(adapter.graph) if c.name.endswith("layer_0")]
    assert [t.name for t in point.extra_inputs] == ["padding_mask"]
    x = {k: v.astype("int64") for k, v in batch().items()}
    expected = np.asarray(model(x))
    res = split_model(adapter, point.index, tmp_path / "b", keystore=tmp_path / "ks.json")
    assert res.manifest["private"]["inputs"][1]["dtype"] == "int64"
    with ennclave.load(tmp_path / "b", keystore=tmp_path / "ks.json") as m:
        np.testing.assert_allclose(m.predict(x), expected, atol=1e-5, rtol=1e-4)


def test_hand_built_encoder_with_an_attention_mask_input(tmp_path):
    # Keras MultiHeadAttention with attention_mask = expand_dims(padding_mask) [N, 1, S]:
    # the mask op is computed again in the enclave and every block boundary is a cut.
    L = keras.layers
    keras.utils.set_random_seed(11)
    ids = keras.Input((SEQ,), dtype="int32", name="input_ids")
    pad = keras.Input((SEQ,), dtype="int32", name="attention_mask")
    mask = keras.ops.expand_dims(pad, 1)
    x = L.Embedding(VOCAB, 16, name="emb")(ids)
    for i in range(2):
        a = L.MultiHeadAttention(2, 8, name=f"attn{i}")(x, x, attention_mask=mask)
        x = L.LayerNormalization(name=f"ln{i}")(L.Add()([x, a]))
    model = keras.Model([ids, pad], L.Dense(3)(L.GlobalAveragePooling1D()(x)))
    adapter = KerasAdapter.from_model(model)
    (point,) = [c for c in find_cut_points(adapter.graph) if c.name == "ln0"]
    assert [t.name for t in point.extra_inputs] == ["attention_mask"]
    b = batch()
    x = {"input_ids": b["token_ids"], "attention_mask": b["padding_mask"]}
    expected = np.asarray(model(x))
    unmasked = np.asarray(model(dict(x, attention_mask=np.ones_like(b["padding_mask"]))))
    assert np.abs(unmasked - expected).max() > 1e-3  # the mask matters
    split_model(adapter, point.index, tmp_path / "b", keystore=tmp_path / "ks.json")
    with ennclave.load(tmp_path / "b", keystore=tmp_path / "ks.json") as m:
        np.testing.assert_allclose(m.predict(x), expected, atol=1e-4, rtol=1e-4)
