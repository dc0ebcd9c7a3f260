"""Enclave worker vs ONNX Runtime on eNNclave's MIT67 head (512→2048→2048→67).

Everything private (cut at the model input), so the enclave part is the whole head.
In one run, on the same machine and the same weights:

* batch-1 latency and batch-64 throughput: worker (including host↔worker transfer
  through shared memory) vs ONNX Runtime (2 intra-op threads) on the same dense head;
* worker start → ready: spawn, HPKE key unwrap, unseal, parse, pack weights;
* host↔worker round trip for a 64×512 float32 input, on an identity program (so the
  number is transfer and framing only, no compute).

    python benchmarks/bench_head.py [--json benchmarks/results/head.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
from rich.console import Console
from rich.table import Table

import ennclave
from ennclave.split import split_model

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


def ort_head(weights: list[np.ndarray]):
    import onnxruntime as ort
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
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})[0]


def timeit(fn, x, seconds: float, min_runs: int = 20) -> float:
    """Median seconds per call after warm-up."""
    for _ in range(10):
        fn(x)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < min_runs:
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, help="write results here")
    ap.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = ap.parse_args()
    console = Console()
    tmp = Path(tempfile.mkdtemp(prefix="ennclave-bench-"))
    ks = tmp / "keystore.json"
    weights = build_head(tmp / "head.keras")
    build_identity(tmp / "identity.keras")
    split_model(tmp / "head.keras", 0, tmp / "head", keystore=ks)
    split_model(tmp / "identity.keras", 0, tmp / "identity", keystore=ks)
    ort_run = ort_head(weights)
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((1, 512)).astype(np.float32)
    x64 = rng.standard_normal((64, 512)).astype(np.float32)

    results: dict[str, float] = {}
    with ennclave.load(tmp / "head", keystore=ks) as model:
        worker = model.worker
        np.testing.assert_allclose(worker.infer(x64), ort_run(x64), atol=1e-4)
        results["worker_b1_ms"] = 1e3 * timeit(worker.infer, x1, args.seconds)
        results["ort_b1_ms"] = 1e3 * timeit(ort_run, x1, args.seconds)
        results["worker_b64_ms"] = 1e3 * timeit(worker.infer, x64, args.seconds)
        results["ort_b64_ms"] = 1e3 * timeit(ort_run, x64, args.seconds)
    # Start → ready: spawn, handshake, key unwrap, unseal, parse, pack, warm-up, sandbox.
    from ennclave.keys.keystore import Keystore
    from ennclave.runtime.worker import WorkerClient, local_key_release

    manifest_bytes = (tmp / "head" / "manifest.json").read_bytes()
    key_id = json.loads(manifest_bytes)["private"]["key_id"]
    starts = []
    for _ in range(10):
        t = time.perf_counter()
        w = WorkerClient(
            manifest_bytes,
            tmp / "head" / "private.sealed",
            local_key_release(Keystore(ks), key_id),
            in_len=512,
            out_len=67,
        )
        starts.append(time.perf_counter() - t)
        w.close()
    results["worker_start_ms"] = 1e3 * statistics.median(starts)
    with ennclave.load(tmp / "identity", keystore=ks) as ident:
        results["roundtrip_64x512_us"] = 1e6 * timeit(ident.worker.infer, x64, args.seconds)

    results["b1_latency_ratio"] = results["worker_b1_ms"] / results["ort_b1_ms"]
    results["b64_throughput_ratio"] = results["ort_b64_ms"] / results["worker_b64_ms"]

    table = Table(title="MIT67 head 512→2048→2048→67, everything private (2 threads)")
    for col in ("measure", "enclave worker", "ONNX Runtime", "ratio", "target"):
        table.add_column(col)
    table.add_row(
        "batch 1 latency",
        f"{results['worker_b1_ms']:.3f} ms",
        f"{results['ort_b1_ms']:.3f} ms",
        f"{results['b1_latency_ratio']:.2f}× time",
        "≤ 1.2×",
    )
    table.add_row(
        "batch 64 per batch",
        f"{results['worker_b64_ms']:.3f} ms",
        f"{results['ort_b64_ms']:.3f} ms",
        f"{results['b64_throughput_ratio']:.2f}× throughput",
        "≥ 0.8×",
    )
    table.add_row(
        "worker start → ready", f"{results['worker_start_ms']:.1f} ms", "", "", "≤ 150 ms"
    )
    table.add_row(
        "round trip 64×512 (identity)",
        f"{results['roundtrip_64x512_us']:.1f} µs",
        "",
        "",
        "≤ 30 µs",
    )
    console.print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "command": "python benchmarks/bench_head.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "python": platform.python_version(),
            "ennclave": ennclave.__version__,
            "results": {k: round(v, 4) for k, v in results.items()},
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
