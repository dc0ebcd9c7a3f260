"""Produce the committed leakage-audit results in experiments/audit/.

    . .venv/bin/activate && python experiments/audit/run.py [--only demo|fashion]

Two models:

* **demo** — `ennclave demo`'s model (frozen conv backbone + private 2-layer head on
  synthetic 16×16 shapes). Members = the demo's private training set (replayed from
  its seed); queries / test / non-members = fresh `make_shapes` draws.
* **fashion** — a Fashion-MNIST transfer model (Debian `dataset-fashion-mnist`): a conv
  backbone pretrained on classes 0–4 (the "public task") and frozen, then a private
  head trained on 3,000 images of all ten classes (small on purpose: a realistic
  owner dataset that the head overfits, which is what membership inference needs).
  Queries are 5,000 other training images (the attacker's in-distribution data).

Every result comes from the `ennclave audit` CLI; the JSON records the command, the
package versions and the machine. Inputs and bundles go to experiments/audit/_work/.
"""

from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORK = HERE / "_work"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
BUDGETS = "50,500,5000"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(ROOT / "python"))


def audit(*args: str) -> None:
    """Run `ennclave audit ARGS` as a user would (the JSON records this command)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    cmd = [sys.executable, "-m", "ennclave", "audit", *args]
    print("+ ennclave audit", " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


def rel(p: Path) -> str:
    return os.path.relpath(p, ROOT)


def save(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64))


# -- demo ------------------------------------------------------------------------------


def _demo_data() -> list[str]:
    d = WORK / "demo"
    return [
        "--queries", rel(d / "queries.npz"), "--test", rel(d / "test.npz"),
        "--members", rel(d / "members.npz"), "--nonmembers", rel(d / "nonmembers.npz"),
        "--budgets", BUDGETS,
    ]  # fmt: skip


def demo_bundle() -> None:
    from ennclave.demo import make_shapes

    d = WORK / "demo"
    if not (d / "bundle" / "manifest.json").exists():
        env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
        subprocess.run(
            [sys.executable, "-m", "ennclave", "demo", "--out", str(d)], check=True, env=env
        )
    rng = np.random.default_rng(123)
    for name, n in (("queries", 5000), ("test", 1000), ("nonmembers", 2048)):
        save(d / f"{name}.npz", *make_shapes(n, rng))
    # build_demo_model draws pretraining data, then the private training set, from seed 0.
    rng0 = np.random.default_rng(0)
    make_shapes(1024, rng0, classes=2)
    save(d / "members.npz", *make_shapes(2048, rng0))
    audit(
        rel(d / "bundle"), "--keystore", rel(d / "keystore.json"), *_demo_data(),
        "--json", rel(HERE / "demo_bundle.json"), "--plot", rel(HERE / "demo_bundle.png"),
    )  # fmt: skip


def demo_sweeps() -> None:
    d, data = WORK / "demo", _demo_data()
    audit(
        "--model", rel(d / "demo.keras"), "--cut", "4", "--policies", "full,top_k:2,label", *data,
        "--json", rel(HERE / "demo_policies.json"), "--plot", rel(HERE / "demo_policies.png"),
    )  # fmt: skip
    audit(
        "--model", rel(d / "demo.keras"), "--cuts", "0,1,3,4,5", *data,
        "--json", rel(HERE / "demo_cuts.json"), "--plot", rel(HERE / "demo_cuts.png"),
    )  # fmt: skip


# -- Fashion-MNIST transfer model --------------------------------------------------------


def _idx(name: str) -> np.ndarray:
    with gzip.open(FMNIST / name, "rb") as f:
        raw = f.read()
    if name.find("images") >= 0:
        return np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28, 1) / np.float32(255)
    return np.frombuffer(raw, np.uint8, offset=8).astype(np.int64)


def fashion_model(d: Path) -> None:
    import keras

    keras.utils.set_random_seed(0)
    L = keras.layers
    x, y = _idx("train-images-idx3-ubyte.gz"), _idx("train-labels-idx1-ubyte.gz")
    xt, yt = _idx("t10k-images-idx3-ubyte.gz"), _idx("t10k-labels-idx1-ubyte.gz")
    # Disjoint slices of the training set for each party.
    pub = np.arange(0, 20000)
    pub = pub[y[pub] < 5][:10000]  # public task: classes 0–4 only
    priv, non, qry = np.arange(20000, 23000), np.arange(30000, 33000), np.arange(40000, 45000)
    save(d / "members.npz", x[priv], y[priv])
    save(d / "nonmembers.npz", x[non], y[non])
    save(d / "queries.npz", x[qry], y[qry])
    save(d / "test.npz", xt[:2000], yt[:2000])
    if (d / "fashion.keras").exists():
        return
    backbone = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            L.Conv2D(16, 3, activation="relu", name="conv1"),
            L.MaxPooling2D(name="pool1"),
            L.Conv2D(32, 3, activation="relu", name="conv2"),
            L.MaxPooling2D(name="pool2"),
            L.Flatten(name="flat"),
        ],
        name="backbone",
    )
    pre = keras.Sequential([backbone, L.Dense(5, activation="softmax")])
    pre.compile("adam", "sparse_categorical_crossentropy")
    pre.fit(x[pub], y[pub], epochs=3, batch_size=128, verbose=0)
    backbone.trainable = False
    inp = keras.Input((28, 28, 1), name="image")
    h = L.Dense(128, activation="relu", name="private_fc1")(backbone(inp))
    out = L.Dense(10, activation="softmax", name="private_fc2")(h)
    model = keras.Model(inp, out, name="fashion_transfer")
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x[priv], y[priv], epochs=30, batch_size=64, verbose=0)
    tr = model.evaluate(x[priv], y[priv], verbose=0)[1]
    te = model.evaluate(xt[:2000], yt[:2000], verbose=0)[1]
    print(f"fashion model: train accuracy {tr:.3f}, test accuracy {te:.3f}", flush=True)
    model.save(d / "fashion.keras")


def fashion() -> None:
    d = WORK / "fashion"
    d.mkdir(parents=True, exist_ok=True)
    fashion_model(d)
    audit(
        "--model", rel(d / "fashion.keras"), "--cut", "backbone/flat",
        "--policies", "full,top_k:3,label",
        "--queries", rel(d / "queries.npz"), "--test", rel(d / "test.npz"),
        "--members", rel(d / "members.npz"), "--nonmembers", rel(d / "nonmembers.npz"),
        "--budgets", BUDGETS, "--epochs", "10",
        "--json", rel(HERE / "fashion_policies.json"), "--plot", rel(HERE / "fashion_policies.png"),
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["demo", "fashion"])
    args = ap.parse_args()
    (WORK / "demo").mkdir(parents=True, exist_ok=True)
    if args.only in (None, "demo"):
        demo_bundle()
    if args.only in (None, "fashion"):
        fashion()
    if args.only in (None, "demo"):
        demo_sweeps()


if __name__ == "__main__":
    main()
