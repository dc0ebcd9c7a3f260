"""Models of several outputs, and sentence encoders as exporters ship them: a
torch.onnx-style BERT with a second output (`pooler_output`) splits once one output is
chosen (`output=` / `--model-output`; a Keras model of two heads too), and the
sentence-transformers head (masked mean pooling, L2 normalisation) splits at
block boundaries with the pooling in the enclave, checked against ONNX Runtime on
padded sequences and through the worker."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from ennclave.adapters import load_model  # noqa: E402
from ennclave.errors import ModelLoadError  # noqa: E402
from ennclave.graph import find_cut_points  # noqa: E402
from test_onnx_adapter import c, w  # noqa: E402
from test_onnx_transformers import H, S, V, bert_graph  # noqa: E402

N = helper.make_node
PINS = {"input_ids": (1, S), "attention_mask": (1, S), "token_type_ids": (1, S)}


def _with_heads(tmp: Path, norm: str) -> Path:
    """A 2-layer masked BERT whose outputs are `last_hidden_state`, the pooler's
    `pooler_output` (tanh(W·h[:, 0] + b)) and `sentence_embedding` as
    sentence-transformers exports it: mask unsqueezed, expanded and cast, Mul,
    ReduceSum over the sequence, Clip(min=1e-9) of the mask sum, Div; then L2
    normalisation, `norm` = "reducel2" (torch's F.normalize: ReduceL2, Clip(1e-12),
    Expand, Div) or "pow" (Pow, ReduceSum, Sqrt, Max, Div)."""
    m = onnx.load(str(bert_graph(tmp, masked=True, layers=2)))
    g = m.graph
    h = "last_hidden_state"
    g.initializer.extend(
        [
            w("pool.w", H, H, scale=H**-0.5),
            w("pool.b", H, scale=0.1),
            c("cls", 0, np.int64),
            c("axm1", [-1], np.int64),
            c("tiny", 1e-9),
            c("eps12", 1e-12),
        ]
    )
    nodes = [
        N("Gather", [h, "cls"], ["cls_h"], axis=1),
        N("Gemm", ["cls_h", "pool.w", "pool.b"], ["pool_mm"], transB=1),
        N("Tanh", ["pool_mm"], ["pooler_output"]),
        N("Unsqueeze", ["attention_mask", "axm1"], ["pm3"]),
        N("Shape", [h], ["h_shape"]),
        N("Expand", ["pm3", "h_shape"], ["pm_exp"]),
        N("Cast", ["pm_exp"], ["pm_f"], to=TensorProto.FLOAT),
        N("Mul", [h, "pm_f"], ["masked_h"]),
        N("ReduceSum", ["masked_h", "ax1"], ["sum_h"], keepdims=0),
        N("ReduceSum", ["pm_f", "ax1"], ["sum_m"], keepdims=0),
        N("Clip", ["sum_m", "tiny", ""], ["sum_mc"]),
        N("Div", ["sum_h", "sum_mc"], ["mean"]),
    ]
    if norm == "reducel2":
        nodes += [
            N("ReduceL2", ["mean"], ["l2"], axes=[1], keepdims=1),
            N("Clip", ["l2", "eps12", ""], ["l2c"]),
            N("Shape", ["mean"], ["mean_shape"]),
            N("Expand", ["l2c", "mean_shape"], ["l2e"]),
            N("Div", ["mean", "l2e"], ["sentence_embedding"]),
        ]
    else:
        nodes += [
            N("Pow", ["mean", "two"], ["sq"]),
            N("ReduceSum", ["sq", "ax1"], ["ssq"], keepdims=1),
            N("Sqrt", ["ssq"], ["l2"]),
            N("Max", ["l2", "eps12"], ["l2c"]),
            N("Div", ["mean", "l2c"], ["sentence_embedding"]),
        ]
    g.node.extend(nodes)
    g.output.extend(
        [
            helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT, ["N", H]),
            helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["N", H]),
        ]
    )
    onnx.checker.check_model(m, full_check=True)
    path = tmp / f"encoder_{norm}.onnx"
    onnx.save(m, str(path))
    return path


@pytest.fixture(scope="module")
def encoder_of(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """encoder_of(norm) -> the encoder with that normalise form, built once per module."""
    built: dict[str, Path] = {}

    def get(norm: str) -> Path:
        if norm not in built:
            built[norm] = _with_heads(tmp_path_factory.mktemp(norm), norm)
        return built[norm]

    return get


@pytest.fixture(params=["reducel2", "pow"])
def encoder(request: pytest.FixtureRequest, encoder_of: Callable[[str], Path]) -> Path:
    return encoder_of(request.param)


def _padded() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    ids = rng.integers(1, V, (4, S))
    mask = np.ones((4, S), np.int64)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    return [ids, mask, rng.integers(0, 2, (4, S))]


def test_several_outputs_need_a_choice(encoder: Path) -> None:
    with pytest.raises(ModelLoadError) as e:
        load_model(encoder, PINS)
    msg = str(e.value)
    assert all(n in msg for n in ("last_hidden_state", "pooler_output", "sentence_embedding"))
    assert "--model-output" in msg and msg.count(". ") == msg.count("e.g. ")  # one sentence
    with pytest.raises(ModelLoadError, match="its outputs are"):
        load_model(encoder, PINS, output="logits")


# The pooler does not read the normalise head: one norm variant is enough for it.
@pytest.mark.parametrize(
    "norm, name",
    [
        ("reducel2", "last_hidden_state"),
        ("pow", "last_hidden_state"),
        ("reducel2", "pooler_output"),
    ],
)
def test_chosen_output_prunes_the_graph(
    encoder_of: Callable[[str], Path], norm: str, name: str, tmp_path: Path
) -> None:
    from ennclave.reference import execute
    from ennclave.runtime.public import PublicPart

    encoder = encoder_of(norm)
    ad = load_model(encoder, PINS, output=name)
    assert [o.name for o in ad.graph.outputs] == [name]
    assert not any(n.op_type in ("ReduceL2", "ReduceSum") for n in ad.graph.nodes)
    x = _padded()
    full = onnx.load(str(encoder))
    import onnxruntime as ort

    sess = ort.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run([name], dict(zip(PINS, x, strict=True)))[0]
    np.testing.assert_allclose(ad.predict(x), want, atol=1e-5, rtol=1e-5)
    cut = {c.tensor.name: c for c in find_cut_points(ad.graph)}["l0.out"]
    pub = tmp_path / "public.onnx"
    ad.save_public(cut, pub)
    feed = dict(zip(PINS, x, strict=True))
    hidden = PublicPart(pub, "onnx", ["CPUExecutionProvider"])(
        [feed[i.name] for i in onnx.load(str(pub)).graph.input]
    )
    got = execute(ad.lower_private(cut), [hidden, x[1]])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_mean_pooling_and_normalize_split_after_block_1(encoder: Path, tmp_path: Path) -> None:
    import ennclave
    from ennclave.passes import optimize
    from ennclave.reference import execute

    ad = load_model(encoder, PINS, output="sentence_embedding")
    by_name = {c.tensor.name: c for c in find_cut_points(ad.graph)}
    assert {"emb_ln", "l0.out"} <= set(by_name)  # block boundaries stay cut points
    # Not inside a decomposed layer norm (x − mean, / std, · gamma): that is fused.
    assert not [t for t in by_name if t.endswith((".d", ".n", ".s"))]
    assert "l0.res1" in by_name  # the residual sum before it still is
    cut = by_name["l0.out"]
    assert [t.name for t in cut.extra_inputs] == ["attention_mask"]
    x = _padded()
    want = ad.predict(x)
    np.testing.assert_allclose(np.linalg.norm(want, axis=1), 1.0, atol=1e-5)
    # The padding matters: the same ids unmasked give other embeddings.
    assert not np.allclose(want[1:3], ad.predict([x[0], np.ones_like(x[1]), x[2]])[1:3])
    program = optimize(ad.lower_private(cut))
    assert "reduce" in {n.op for n in program.nodes}  # the pooling is private
    out = tmp_path / "bundle"
    ennclave.split_model(ad, cut.index, out, keystore=tmp_path / "ks.json", n_random=4)
    with ennclave.load(out, keystore=tmp_path / "ks.json") as m:
        got = m.predict(x, batch_size=3)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    assert execute(program, [np.zeros((1, S, H), np.float32), x[1][:1]]).shape == (1, H)


def test_cli_plan_and_split_with_model_output(
    encoder_of: Callable[[str], Path], tmp_path: Path, capsys
) -> None:
    import json

    from ennclave import cli

    encoder = encoder_of("reducel2")  # the CLI does not depend on the normalise form
    pins = [a for k in PINS for a in ("--input-shape", f"{k}=1x{S}")]
    assert cli.main(["plan", str(encoder), *pins, "--json"]) == 2
    err = capsys.readouterr().err
    assert "pooler_output" in err and "--model-output NAME" in err
    assert cli.main(["plan", str(encoder), *pins, "--output", "sentence_embedding", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["cut_points"] and all(c["splittable"] for c in plan["cut_points"])
    argv = ["split", str(encoder), *pins, "--model-output", "sentence_embedding", "--cut", "1"]
    out = tmp_path / "b"
    rc = cli.main([*argv, "-o", str(out), "--keystore", str(tmp_path / "ks.json")])
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [t["shape"] for t in manifest["private"]["outputs"]] == [[None, H]]


def test_keras_model_of_two_heads(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    from ennclave.passes import optimize
    from ennclave.reference import execute

    i = keras.Input((4,), name="x")
    h = keras.layers.Dense(8, activation="relu", name="d1")(i)
    a = keras.layers.Dense(3, name="head_a")(h)
    b = keras.layers.Dense(2, name="head_b")(h)
    model = keras.Model(i, [a, b])
    path = tmp_path / "two.keras"
    model.save(path)
    with pytest.raises(ModelLoadError, match=r"2 outputs \(head_a, head_b\)"):
        load_model(path)
    ad = load_model(path, output="head_b")
    x = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    want = model.predict(x, verbose=0)[1]
    np.testing.assert_allclose(ad.predict(x), want, atol=1e-6)
    cut = find_cut_points(ad.graph)[0]
    np.testing.assert_allclose(execute(optimize(ad.lower_private(cut)), x), want, atol=1e-5)
