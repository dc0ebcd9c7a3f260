"""The examples in examples/ run as documented and compute what they say."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from support.enclave_bundle import needs_worker

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@needs_worker
def test_transformer_classifier_splits_after_block_4_and_matches_keras(tmp_path, capsys):
    if os.environ.get("CI"):  # .ci/run installs it: a missing one is a failure there
        import keras_hub  # noqa: F401
    else:
        pytest.importorskip("keras_hub")
    ex = _example("transformer_classifier")
    r = ex.run(tmp_path, seq=12, hidden=16, heads=2)
    out = capsys.readouterr().out
    # The plan table lists every block boundary, and recommends the cut after the frozen
    # blocks; the bundle holds the last two blocks and the head.
    for i in range(1, ex.BLOCKS + 1):
        assert f"encoder_{i}" in out
    assert "Recommended: Cut 5 after 'encoder_4'" in out
    assert r.cut == "encoder_4"
    # The split model computes the Keras model's logits (independently recomputed here
    # from the saved model file), on ids that reach every class of the vocabulary.
    import keras

    model = keras.models.load_model(tmp_path / "text_classifier.keras")
    want = np.asarray(model(r.ids))
    assert want.std() > 1e-3  # not a constant output
    np.testing.assert_allclose(r.enclave_logits, want, atol=1e-4, rtol=1e-4)
    assert "predicted class the same for 8/8" in out


def test_plan_counts_transformer_flops(tmp_path):
    # An encoder block's FLOPs per sample: 2 × tokens × params for its dense weights,
    # plus 4 × seq² × hidden for the attention scores and weighted values.
    if os.environ.get("CI"):
        import keras_hub  # noqa: F401
    else:
        pytest.importorskip("keras_hub")
    ex = _example("transformer_classifier")
    model = ex.build_classifier(vocab=50, seq=10, hidden=16, heads=2, classes=3)
    path = tmp_path / "m.keras"
    model.save(path)
    import ennclave

    plan = ennclave.plan_model(str(path))
    by_name = {c.name: c for c in plan.cut_points}
    block = model.get_layer("encoder_6")
    expected = 2 * 10 * block.count_params() + 4 * 10**2 * 16
    got = by_name["encoder_5"].enclave_flops - by_name["encoder_6"].enclave_flops
    assert got == expected
