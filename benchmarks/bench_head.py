"""Enclave worker vs ONNX Runtime on eNNclave's MIT67 head (512→2048→2048→67).

Everything private (cut at the model input), so the enclave part is the whole head.
In one run, on the same machine and the same weights:

* batch-1 latency and batch-64 throughput: worker (including host↔worker transfer
  through shared memory) vs ONNX Runtime (2 intra-op threads) on the same dense head,
  timed in alternation so both see the same machine state;
* worker start → ready: spawn, HPKE key unwrap, unseal, parse, warm-up, sandbox (dense
  kernels arrive pre-packed, so nothing is re-packed);
* host↔worker round trip for a 64×512 float32 input, on an identity program (so the
  number is transfer and protocol only, no compute).

    python benchmarks/bench_head.py [--runs N] [--json benchmarks/results/head.json]

On a machine without TensorFlow: `--save-bundles DIR` here, then `--bundles DIR` there.
Worker and ONNX Runtime both use 2 threads, whatever the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _common
import numpy as np
from _common import record, timeit, timeit_pair
from rich.console import Console
from rich.table import Table

import ennclave

THREADS = 2


def build_head(path: Path) -> list[np.ndarray]:
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((512,))
    h = keras.layers.Dense(2048, activation="relu")(inp)
    h = keras.layers.Dense(2048, activation="relu")(h)
    out = keras.layers.Dense(67, activation="softmax")(h)
    model = keras.Model(inp, out)
    model.save(path)
    return [np.asarray(w) for w in model.get_weights()]


def build_identity(path: Path) -> None:
    import keras

    inp = keras.Input((512,))
    keras.Model(inp, keras.layers.Activation("linear")(inp)).save(path)


def make_bundles(tmp: Path) -> list[np.ndarray]:
    """Build the head and the identity model into `tmp` and split them (everything
    private) into `tmp/head` and `tmp/identity`, keys in `tmp/keystore.json`; the
    head's weights are also saved in `tmp/weights.npz`. Returns them."""
    from ennclave.split import split_model

    tmp.mkdir(parents=True, exist_ok=True)
    weights = build_head(tmp / "head.keras")
    build_identity(tmp / "identity.keras")
    for name in ("head", "identity"):
        split_model(tmp / f"{name}.keras", 0, tmp / name, keystore=tmp / "keystore.json")
    np.savez(tmp / "weights.npz", **{f"w{i}": w for i, w in enumerate(weights)})
    return weights


def ort_head(weights: list[np.ndarray]):
    return ort_run(head_onnx(weights))


def head_onnx(weights: list[np.ndarray]) -> bytes:
    """The head as a serialised ONNX model (Gemm, Relu, Softmax)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(w.astype(np.float32), n)
        for w, n in zip(weights, ["k1", "b1", "k2", "b2", "k3", "b3"], strict=True)
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "k1", "b1"], ["g1"]),
        helper.make_node("Relu", ["g1"], ["h1"]),
        helper.make_node("Gemm", ["h1", "k2", "b2"], ["g2"]),
        helper.make_node("Relu", ["g2"], ["h2"]),
        helper.make_node("Gemm", ["h2", "k3", "b3"], ["g3"]),
        helper.make_node("Softmax", ["g3"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 67])],
        inits,
    )
    # IR version 9 (opset 17): loadable by older ONNX Runtime releases too.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return model.SerializeToString()


def ort_run(model: bytes):
    """ONNX Runtime on `THREADS` threads (see `_common.ort_run`)."""
    return _common.ort_run(model, THREADS)


def worker_start_ms(bundle: Path, ks: Path, in_len: int, out_len: int, reps: int = 10) -> float:
    """Median start → ready of the bundle's worker: spawn, handshake, key unwrap,
    unseal, parse, warm-up, sandbox."""
    from ennclave.keystore import Keystore
    from ennclave.runtime.worker import WorkerClient, local_key_release

    manifest_bytes = (bundle / "manifest.json").read_bytes()
    key_id = json.loads(manifest_bytes)["private"]["key_id"]
    starts = []
    for _ in range(reps):
        t = time.perf_counter()
        w = WorkerClient(
            manifest_bytes,
            bundle / "private.sealed",
            local_key_release(Keystore(ks), key_id),
            in_len=in_len,
            out_len=out_len,
            threads=THREADS,
        )
        starts.append(time.perf_counter() - t)
        w.close()
    return 1e3 * statistics.median(starts)


def roundtrip_us(identity: Path, ks: Path, x: np.ndarray, seconds: float) -> float:
    """Median host↔worker round trip of `x` through an identity program."""
    with ennclave.load(identity, keystore=ks, threads=THREADS) as ident:
        return 1e6 * timeit(ident.worker.infer, x, seconds)


def measure(tmp: Path, ks: Path, ort_run, seconds: float) -> dict[str, float]:
    """One full measurement: both batch sizes, worker start, identity round trip."""
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((1, 512)).astype(np.float32)
    x64 = rng.standard_normal((64, 512)).astype(np.float32)
    results: dict[str, float] = {}
    with ennclave.load(tmp / "head", keystore=ks, threads=THREADS) as model:
        worker = model.worker
        np.testing.assert_allclose(worker.infer(x64), ort_run(x64), atol=1e-4)
        for b, x in ((1, x1), (64, x64)):
            tw, to = timeit_pair(worker.infer, ort_run, x, seconds)
            results[f"worker_b{b}_ms"], results[f"ort_b{b}_ms"] = 1e3 * tw, 1e3 * to
    results["worker_start_ms"] = worker_start_ms(tmp / "head", ks, 512, 67)
    results["roundtrip_64x512_us"] = roundtrip_us(tmp / "identity", ks, x64, seconds)
    results["b1_latency_ratio"] = results["worker_b1_ms"] / results["ort_b1_ms"]
    results["b64_throughput_ratio"] = results["ort_b64_ms"] / results["worker_b64_ms"]
    return results


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, help="write results here")
    ap.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    ap.add_argument(
        "--runs", type=int, default=3, help="repeat the whole measurement; report the median"
    )
    ap.add_argument(
        "--save-bundles", type=Path, help="only build the model and bundles into this folder"
    )
    ap.add_argument(
        "--bundles", type=Path, help="use bundles saved with --save-bundles (no TensorFlow needed)"
    )
    args = ap.parse_args()
    console = Console()
    if args.bundles:  # made earlier with --save-bundles: no Keras/TensorFlow needed
        tmp = args.bundles
        with np.load(tmp / "weights.npz") as f:
            weights = [f[f"w{i}"] for i in range(len(f.files))]
    else:
        tmp = args.save_bundles or Path(tempfile.mkdtemp(prefix="ennclave-bench-"))
        weights = make_bundles(tmp)
        if args.save_bundles:
            console.print(f"bundles saved in {tmp}; run with --bundles {tmp}")
            return 0
    ks = tmp / "keystore.json"
    ort_run = ort_head(weights)

    runs = []
    for r in range(args.runs):
        runs.append(measure(tmp, ks, ort_run, args.seconds))
        console.print(
            f"run {r + 1}/{args.runs}: " + ", ".join(f"{k} {v:.3g}" for k, v in runs[-1].items())
        )
    results = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    spread = {k: (min(run[k] for run in runs), max(run[k] for run in runs)) for k in runs[0]}

    def rng_(k: str, fmt: str) -> str:
        lo, hi = spread[k]
        return f" ({lo:{fmt}}–{hi:{fmt}})" if len(runs) > 1 else ""

    title = (
        f"MIT67 head 512→2048→2048→67, everything private (2 threads); median of {len(runs)} runs"
    )
    table = Table(title=title)
    for col in ("measure", "enclave worker", "ONNX Runtime", "ratio", "target"):
        table.add_column(col)
    table.add_row(
        "batch 1 latency",
        f"{results['worker_b1_ms']:.3f} ms",
        f"{results['ort_b1_ms']:.3f} ms",
        f"{results['b1_latency_ratio']:.2f}× time" + rng_("b1_latency_ratio", ".2f"),
        "≤ 1.2×",
    )
    table.add_row(
        "batch 64 per batch",
        f"{results['worker_b64_ms']:.3f} ms",
        f"{results['ort_b64_ms']:.3f} ms",
        f"{results['b64_throughput_ratio']:.2f}× throughput" + rng_("b64_throughput_ratio", ".2f"),
        "≥ 0.8×",
    )
    table.add_row(
        "worker start → ready",
        f"{results['worker_start_ms']:.1f} ms" + rng_("worker_start_ms", ".0f"),
        "",
        "",
        "≤ 150 ms",
    )
    table.add_row(
        "round trip 64×512 (identity)",
        f"{results['roundtrip_64x512_us']:.1f} µs" + rng_("roundtrip_64x512_us", ".0f"),
        "",
        "",
        "≤ 30 µs",
    )
    console.print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        rounded = [{k: round(v, 4) for k, v in run.items()} for run in runs]
        record_ = record(
            "bench_head.py", {k: round(v, 4) for k, v in results.items()}, runs=rounded
        )
        args.json.write_text(json.dumps(record_, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
