"""The public part on a GPU: correctness and throughput of a split image model.

Two steps, because the GPU machine may have a different Keras backend (JAX or PyTorch
with CUDA) and no TensorFlow:

    python benchmarks/gpu_public_part.py prepare DIR      # here: model, bundle, inputs
    KERAS_BACKEND=jax python benchmarks/gpu_public_part.py run DIR [--json F]

`prepare` builds the image model of experiments/accuracy_images.py (conv backbone
public, dense head private), saves it whole, splits it after `flatten`, and stores
inputs with the unsplit model's outputs computed on this CPU. `run` loads the bundle
with whatever Keras backend is active and checks, on the same weights:

* that the public part reports running on a GPU (`on_gpu`), so `predict` pipelines by
  default, and that its outputs match the CPU reference;
* throughput of the split model, pipelined (the default there) and sequential,
  against the unsplit model on the same GPU, batch by batch with `predict_on_batch`
  and with Keras's own `model.predict`. Variants are interleaved, median of 5.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

N, BATCHES = 8192, (64, 256)
CHECKED = 1024  # samples whose outputs are compared with the CPU reference


def prepare(out: Path) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
    from accuracy_images import BACKBONE, build

    from ennclave.split import split_model

    out.mkdir(parents=True, exist_ok=True)
    model = build(0)
    for n in BACKBONE:
        model.get_layer(n).trainable = False
    model.save(out / "image.keras")
    split_model(out / "image.keras", "flatten", out / "bundle", keystore=out / "keystore.json")
    x = np.random.default_rng(0).random((CHECKED, 28, 28, 1), dtype=np.float32)
    np.save(out / "x.npy", x)
    np.save(out / "want.npy", np.asarray(model.predict(x, batch_size=256, verbose=0)))


def median_s(fn, repeats: int = 5) -> list[float]:
    fn()  # warm-up (compilation for this batch shape)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def run(d: Path, worker: str | None, json_out: Path | None, n: int = N, threads: int = 0) -> int:
    import keras

    import ennclave

    checked, want = np.load(d / "x.npy"), np.load(d / "want.npy")
    x = np.tile(checked, (max(1, n // len(checked)), 1, 1, 1))  # for timing
    n = len(x)
    full = keras.saving.load_model(d / "image.keras", compile=False)
    res: dict[str, object] = {
        "command": f"KERAS_BACKEND={keras.backend.backend()} python benchmarks/gpu_public_part.py "
        + " ".join(sys.argv[1:]),
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
    }
    try:
        import torch

        res["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    bundle, ks = d / "bundle", d / "keystore.json"
    with ennclave.load(bundle, keystore=ks, worker_binary=worker, threads=threads) as m:
        res["on_gpu"] = m._public.on_gpu
        res["worker_threads"] = threads or "all cores"
        res["secmem"] = m.worker.ready.secmem
        y = m.predict(checked, 64)  # the default: pipelined when on_gpu
        res["max_abs_err_vs_cpu_reference"] = float(np.abs(y - want).max())
        y = m.predict(checked, 64, pipeline=False)
        res["max_abs_err_sequential"] = float(np.abs(y - want).max())
        feats = m.public_features(x, 256)
        for b in BATCHES:

            def unsplit_call(b: int = b) -> None:
                for s in range(0, n, b):
                    full.predict_on_batch(x[s : s + b])

            fns = {
                "unsplit_call": unsplit_call,
                "unsplit_predict": lambda b=b: full.predict(x, batch_size=b, verbose=0),
                "split_sequential": lambda b=b: m.predict(x, b, pipeline=False),
                "split_pipelined": lambda b=b: m.predict(x, b, pipeline=True),
                "public_part_only": lambda b=b: [m._public(x[s : s + b]) for s in range(0, n, b)],
                "enclave_only": lambda b=b: [
                    m.predict_private(feats[s : s + b]) for s in range(0, n, b)
                ],
            }
            times: dict[str, list[float]] = {k: [] for k in fns}
            for fn in fns.values():
                fn()  # compile every shape first
            for _ in range(5):
                for k, fn in fns.items():
                    times[k] += median_s(fn, 1)
            for k, ts in times.items():
                res[f"b{b}_{k}_samples_per_s"] = round(n / statistics.median(ts), 1)
    ok = res["on_gpu"] and res["max_abs_err_vs_cpu_reference"] < 1e-4
    res["passed"] = bool(ok)
    text = json.dumps(res, indent=2)
    print(text)
    if json_out:
        json_out.write_text(text + "\n")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["prepare", "run"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--worker", help="path of the enclave worker binary")
    ap.add_argument("--json", type=Path, help="write the results here (run)")
    ap.add_argument("--n", type=int, default=N, help="images per timed pass (run)")
    ap.add_argument("--threads", type=int, default=0, help="enclave worker threads (0: all)")
    a = ap.parse_args()
    if a.step == "prepare":
        prepare(a.dir)
        return 0
    return run(a.dir, a.worker, a.json, a.n, a.threads)


if __name__ == "__main__":
    sys.exit(main())
