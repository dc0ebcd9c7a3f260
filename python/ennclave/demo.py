"""`ennclave demo`: the whole owner → client story on a small model, in well under a minute.

A "public" convolutional backbone is pretrained on one synthetic task and frozen; a
"private" dense head is trained on another (the owner's data). The demo then plans,
splits at the recommended cut, verifies, and — when the enclave worker is installed —
runs the bundle and compares its predictions with the original model.
"""

from __future__ import annotations

import shlex
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape

from ._deps import require


def make_shapes(
    n: int, rng: np.random.Generator, classes: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """16×16 grey images of horizontal bars, vertical bars, diagonals and blobs, with noise."""
    x = rng.normal(0, 0.3, size=(n, 16, 16, 1)).astype(np.float32)
    y = rng.integers(0, classes, size=n)
    yy, xx = np.mgrid[0:16, 0:16]
    for i, c in enumerate(y):
        o = rng.integers(2, 14)
        if c == 0:
            x[i, o - 1 : o + 1, :, 0] += 1.0
        elif c == 1:
            x[i, :, o - 1 : o + 1, 0] += 1.0
        elif c == 2:
            x[i, :, :, 0] += (np.abs(yy - xx - (o - 8)) <= 1) * 1.0
        else:
            cy, cx = rng.integers(4, 12, size=2)
            x[i, :, :, 0] += ((yy - cy) ** 2 + (xx - cx) ** 2 <= 6) * 1.0
    return x, y


def build_demo_model(rng_seed: int = 0, epochs: int = 4):
    """Returns (model, x_test, y_test): frozen backbone + trained private head."""
    keras = require("keras")
    keras.utils.set_random_seed(rng_seed)
    L = keras.layers
    rng = np.random.default_rng(rng_seed)
    backbone = keras.Sequential(
        [
            keras.Input((16, 16, 1)),
            L.Conv2D(8, 3, padding="same", activation="relu", name="conv1"),
            L.MaxPooling2D(name="pool1"),
            L.Conv2D(16, 3, padding="same", activation="relu", name="conv2"),
            L.GlobalAveragePooling2D(name="gap"),
        ],
        name="backbone",
    )
    # "Pretraining" on a public task (2 of the 4 classes), then freezing.
    xp, yp = make_shapes(1024, rng, classes=2)
    pre = keras.Sequential([backbone, L.Dense(2, activation="softmax")])
    pre.compile("adam", "sparse_categorical_crossentropy")
    pre.fit(xp, yp, epochs=epochs, batch_size=64, verbose=0)
    backbone.trainable = False

    inp = keras.Input((16, 16, 1), name="image")
    h = backbone(inp)
    h = L.Dense(32, activation="relu", name="private_fc1")(h)
    h = L.Dropout(0.1, name="dropout")(h)
    out = L.Dense(4, activation="softmax", name="private_fc2")(h)
    model = keras.Model(inp, out, name="demo")
    x, y = make_shapes(2048, rng)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=epochs * 3, batch_size=64, verbose=0)
    xt, yt = make_shapes(512, rng)
    return model, xt, yt


def next_commands(work: Path) -> list[str]:
    """What to try after the demo, on its files (`ennclave demo` prints these)."""
    q = lambda name: shlex.quote(str(work / name))
    ks = f"--keystore {q('keystore.json')}"
    return [
        f"ennclave run {q('bundle')} --input {q('sample_input.npy')} "
        f"--output {q('predictions.npy')} {ks}",
        f"ennclave bench {q('bundle')} --batch-sizes 1,64 --seconds 1 {ks}",
        f"ennclave audit {q('bundle')} --queries {q('queries.npz')} --test {q('test.npz')} "
        f"--budgets 50,200 --smoke {ks}",
    ]


def run_demo(out_dir: Path | None, console: Console) -> Path:
    """Run the demo in `out_dir` (default: a new temporary directory); returns it."""
    from .adapters import load_model
    from .plan import make_plan
    from .report import print_plan, print_verification
    from .split import split_model

    t0 = time.perf_counter()
    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="ennclave-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    with console.status("Training a small model: frozen public backbone + private head…"):
        model, xt, yt = build_demo_model()
        model_path = work / "demo.keras"
        model.save(model_path)
    acc = float(np.mean(np.argmax(model.predict(xt, verbose=0), axis=1) == yt))
    console.print(f"[bold]1. Model[/] saved to {escape(str(model_path))} (test accuracy {acc:.3f})")

    console.print("[bold]2. Plan[/]  ennclave plan demo.keras")
    adapter = load_model(model_path)
    plan = make_plan(adapter)
    print_plan(plan, console)

    console.print("[bold]3. Split[/] ennclave split demo.keras --cut auto -o bundle")
    bundle = work / "bundle"
    keystore = work / "keystore.json"
    with console.status("Cutting, lowering, verifying and sealing…"):
        result = split_model(
            adapter, "auto", bundle, samples=xt[:64], keystore=keystore, overwrite=True
        )
    print_verification(result.verification, console)
    files = ", ".join(sorted(p.name for p in bundle.iterdir()))
    console.print(f"Bundle {escape(str(bundle))}: {files}")
    console.print(
        f"Its data key is in the keystore {escape(str(keystore))} (the owner's; pass it with "
        "--keystore)."
    )

    console.print("[bold]4. Run[/]   ennclave.load(bundle).predict(x)")
    from .runtime.model import load

    original = model.predict(xt, verbose=0)
    with load(bundle, keystore=keystore) as enclaved:
        y = enclaved.predict(xt, batch_size=64)
        pid = enclaved.worker_pid
    agree = float(np.mean(np.argmax(y, axis=1) == np.argmax(original, axis=1)))
    console.print(
        f"Enclave worker (pid {pid}) answered {len(xt)} samples: accuracy "
        f"{float(np.mean(np.argmax(y, axis=1) == yt)):.3f}, agreement with the original "
        f"{agree:.3f}, max abs difference {float(np.abs(y - original).max()):.2g}."
    )

    # Inputs for the next commands: a sample batch, the attacker's queries (inputs only:
    # an attacker has no labels) and a labelled test set.
    xq, _ = make_shapes(1000, np.random.default_rng(1))
    np.save(work / "sample_input.npy", xt[:16])
    np.savez(work / "queries.npz", x=xq)
    np.savez(work / "test.npz", x=xt, y=yt)
    console.print(
        f"Done in {time.perf_counter() - t0:.1f} s. Files are in {escape(str(work))}; try next:"
    )
    for command in next_commands(work):
        console.print(f"  {command}", markup=False, highlight=False, soft_wrap=True)
    return work
