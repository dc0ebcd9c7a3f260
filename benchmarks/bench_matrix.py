"""Benchmark matrix: the enclave worker against its peers at batch 1 to 256 (issue #19).

Two models, everything private (cut at the model input):

* the dense MIT67 head of bench_head.py (512→2048→2048→67);
* the image model's CNN (experiments/accuracy_images.py: three 3×3 convolutions with
  pooling, then 3136→128→10), exported to ONNX by Keras; the worker runs the bundle
  split from that ONNX file, ONNX Runtime the file itself.

Two parts, in one run, each timed in alternating blocks so that all sides see the
same machine state:

1. fp32 on this CPU's best kernels: worker vs ONNX Runtime (both `--threads`, 2).
2. The AVX2 path: the worker with `ENNCLAVE_KERNEL=avx2` vs numpy on OpenBLAS forced
   to its Haswell (AVX2+FMA) kernels with `OPENBLAS_CORETYPE=Haswell` (the CNN as
   im2col + one GEMM per convolution), credited with the faster of the worker's thread
   count and 1 OpenBLAS thread in each cell. OpenBLAS reads that variable when it is
   loaded, so this part runs in a subprocess started with it; threadpoolctl's report of
   the kernel that ran is recorded. ONNX Runtime cannot be restricted to AVX2 at run
   time (MLAS picks its kernels by CPUID; only a source build can leave AVX-512 out),
   so it is timed beside them unrestricted, as an indication only (on a CPU without
   AVX-512 it runs its AVX2 kernels, and the comparison is fair).

Plus worker start → ready (head bundle) and the 64×512 round trip (identity program).
Ratios are throughput ratios, peer time / worker time: ≥ 1 means the worker is faster.

    python benchmarks/bench_matrix.py [--seconds 0.5] [--batches 1,2,4,8,16,32,64,256]
        [--json benchmarks/results/matrix.json]

Default settings take about two minutes on 2 cores (most of it building the models).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_head
from _common import timeit_blocks
from bench_head import ort_head, ort_run, roundtrip_us, worker_start_ms

import ennclave
from ennclave.bench import cpu_flags, cpu_model, parse_batch_sizes

HERE = Path(__file__).resolve().parent
STATS = {"median": statistics.median, "min": min}
BATCHES = "1,2,4,8,16,32,64,256"
MODELS = ("head", "cnn")
CNN_SHAPE = (28, 28, 1)


def build_cnn(tmp: Path) -> None:
    """The image model, exported to ONNX (`cnn.onnx`), its weights (`cnn.npz`) and its
    bundle split from the ONNX file (`cnn/`)."""
    sys.path.insert(0, str(HERE.parent / "experiments"))
    from accuracy_images import build

    from ennclave.adapters.onnx import OnnxAdapter
    from ennclave.split import split_model

    model = build(0)
    model.predict(np.zeros((1, *CNN_SHAPE), np.float32), verbose=0)
    model.export(str(tmp / "cnn.onnx"), format="onnx", verbose=False)
    np.savez(tmp / "cnn.npz", *[np.asarray(w) for w in model.get_weights()])
    split_model(OnnxAdapter(tmp / "cnn.onnx"), 0, tmp / "cnn", keystore=tmp / "keystore.json")


def numpy_head(weights: list[np.ndarray]):
    """The head in numpy (matmuls in OpenBLAS)."""
    k1, b1, k2, b2, k3, b3 = weights

    def run(x: np.ndarray) -> np.ndarray:
        h = np.maximum(x @ k1 + b1, 0.0)
        h = np.maximum(h @ k2 + b2, 0.0)
        z = h @ k3 + b3
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    return run


def numpy_cnn(weights: list[np.ndarray]):
    """The image model in numpy: each 3×3 "same" convolution as im2col and one
    OpenBLAS GEMM, 2×2 max pooling, then the dense layers."""
    c1, cb1, c2, cb2, c3, cb3, f1, fb1, f2, fb2 = weights

    def conv(x: np.ndarray, k: np.ndarray, b: np.ndarray) -> np.ndarray:
        n, h, w, c = x.shape
        xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        # Columns ordered (dy, dx, c), as the kernel's [3, 3, c, cout] rows are.
        shifted = [xp[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]
        cols = np.concatenate(shifted, axis=-1).reshape(n * h * w, 9 * c)
        y = cols @ k.reshape(9 * c, -1)
        y += b
        return np.maximum(y, 0.0, out=y).reshape(n, h, w, -1)

    def pool(x: np.ndarray) -> np.ndarray:
        n, h, w, c = x.shape
        return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))

    def run(x: np.ndarray) -> np.ndarray:
        h = pool(conv(x, c1, cb1))
        h = pool(conv(h, c2, cb2))
        h = conv(h, c3, cb3).reshape(len(x), -1)
        h = np.maximum(h @ f1 + fb1, 0.0)
        z = h @ f2 + fb2
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    return run


def inputs(model: str, b: int) -> np.ndarray:
    rng = np.random.default_rng(b)
    if model == "head":
        return rng.standard_normal((b, 512)).astype(np.float32)
    return rng.random((b, *CNN_SHAPE), dtype=np.float32)


def ort_model(tmp: Path, model: str):
    if model == "head":
        with np.load(tmp / "weights.npz") as f:
            return ort_head([f[f"w{i}"] for i in range(len(f.files))])
    return ort_run((tmp / "cnn.onnx").read_bytes())


def numpy_model(tmp: Path, model: str):
    if model == "head":
        with np.load(tmp / "weights.npz") as f:
            return numpy_head([f[f"w{i}"] for i in range(len(f.files))])
    with np.load(tmp / "cnn.npz") as f:
        return numpy_cnn([f[f"arr_{i}"] for i in range(len(f.files))])


def blas_info() -> list[dict[str, Any]]:
    """threadpoolctl's report of the BLAS numpy loaded (its `architecture`: the kernel
    set OpenBLAS chose)."""
    from threadpoolctl import threadpool_info

    return [
        {k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
        for i in threadpool_info()
        if i.get("user_api") == "blas"
    ]


def matrix(
    tmp: Path,
    batches: list[int],
    seconds: float,
    peers: dict[str, Any],
    console: Console,
    stat: str = "median",
) -> dict[str, list[dict[str, float]]]:
    """For each model and batch size, the median ms per call of the worker and of each
    peer (`peers`: name → model name → callable), timed in alternating blocks."""
    ks = tmp / "keystore.json"
    out: dict[str, list[dict[str, float]]] = {}
    for model in MODELS:
        fns = {name: make(tmp, model) for name, make in peers.items()}
        rows = []
        with ennclave.load(
            tmp / model, keystore=ks, threads=bench_head.THREADS, max_batch=256
        ) as m:
            for b in batches:
                x = inputs(model, b)
                want = m.worker.infer(x)
                for name, fn in fns.items():
                    np.testing.assert_allclose(fn(x), want, atol=1e-4, err_msg=name)
                times = timeit_blocks([m.worker.infer, *fns.values()], x, seconds, stat=STATS[stat])
                row = {"batch": b, "worker_ms": 1e3 * times[0]}
                for name, t in zip(fns, times[1:], strict=True):
                    row[f"{name}_ms"] = 1e3 * t
                    row[f"vs_{name}"] = t / times[0]
                rows.append(row)
                console.print(
                    f"  {model} batch {b}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items())
                )
        out[model] = rows
    return out


def numpy_threads(n: int):
    """`numpy_model`, with OpenBLAS set to `n` threads before each call."""
    from threadpoolctl import ThreadpoolController

    (blas,) = ThreadpoolController().select(internal_api="openblas").lib_controllers

    def make(tmp: Path, model: str):
        run = numpy_model(tmp, model)

        def call(x: np.ndarray) -> np.ndarray:
            blas.set_num_threads(n)
            return run(x)

        return call

    return make


def avx2_part(tmp: Path, batches: list[int], seconds: float, stat: str) -> dict[str, Any]:
    """Part 2, in this process: to be run with OPENBLAS_CORETYPE=Haswell and
    ENNCLAVE_KERNEL=avx2 in the environment (see `main`). numpy runs with as many
    OpenBLAS threads as the worker has and with 1 (on a loaded machine OpenBLAS's
    thread hand-offs cost it milliseconds on small products), and is credited with the
    faster of the two."""
    console = Console(stderr=True)
    info = blas_info()
    counts = sorted({bench_head.THREADS, 1}, reverse=True)
    peers: dict[str, Any] = {f"numpy_t{n}": numpy_threads(n) for n in counts}
    peers["ort"] = ort_model
    res = matrix(tmp, batches, seconds, peers, console, stat)
    for rows in res.values():
        for r in rows:
            r["numpy_ms"] = min(r[f"numpy_t{n}_ms"] for n in counts)
            r["vs_numpy"] = r["numpy_ms"] / r["worker_ms"]
    return {"blas": info, "matrix": res}


def table(title: str, res: dict[str, list[dict[str, float]]], peer: str, label: str) -> Table:
    t = Table(title=title)
    t.add_column("batch", justify="right")
    for model in MODELS:
        for col in ("worker", label, "ratio"):
            t.add_column(f"{model} {col}", justify="right")
    for i, row in enumerate(res[MODELS[0]]):
        cells = [str(row["batch"])]
        for model in MODELS:
            r = res[model][i]
            ratio = r[f"vs_{peer}"]
            mark = "[green]met[/]" if ratio >= 1.0 else "[red]not met[/]"
            cells += [
                f"{r['worker_ms']:.3f} ms",
                f"{r[f'{peer}_ms']:.3f} ms",
                f"{ratio:.2f}× {mark}",
            ]
        t.add_row(*cells)
    return t


FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "amx_tile")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write results here")
    ap.add_argument("--seconds", type=float, default=0.5, help="time per side and cell")
    ap.add_argument("--batches", default=BATCHES, help="comma-separated batch sizes")
    ap.add_argument(
        "--threads", type=int, default=2, help="threads of the worker and of every peer"
    )
    ap.add_argument(
        "--stat",
        choices=sorted(STATS),
        default="median",
        help="per cell: the median call, or the fastest (less sensitive to a loaded machine)",
    )
    ap.add_argument("--bundles", type=Path, help="reuse a folder this script built before")
    ap.add_argument("--avx2-part", type=Path, help=argparse.SUPPRESS)  # the subprocess
    args = ap.parse_args()
    batches = parse_batch_sizes(args.batches)
    bench_head.THREADS = args.threads  # read by bench_head's helpers at each call
    if args.avx2_part:
        rec = avx2_part(args.bundles, batches, args.seconds, args.stat)
        args.avx2_part.write_text(json.dumps(rec))
        return 0
    console = Console()
    load_before = os.getloadavg()
    tmp = args.bundles
    if tmp is None or not (tmp / "cnn").exists():
        tmp = tmp or Path(tempfile.mkdtemp(prefix="ennclave-matrix-"))
        console.print(f"building the models and bundles in {tmp}")
        bench_head.make_bundles(tmp)
        build_cnn(tmp)
    ks = tmp / "keystore.json"

    console.print("part 1: worker vs ONNX Runtime (this CPU's best kernels)")
    native = matrix(tmp, batches, args.seconds, {"ort": ort_model}, console, args.stat)
    start_ms = worker_start_ms(tmp / "head", ks, 512, 67)
    x64 = inputs("head", 64)
    rt_us = roundtrip_us(tmp / "identity", ks, x64, max(args.seconds, 1.0))

    console.print("part 2: worker ENNCLAVE_KERNEL=avx2 vs numpy, OPENBLAS_CORETYPE=Haswell")
    env = dict(os.environ, OPENBLAS_CORETYPE="Haswell", ENNCLAVE_KERNEL="avx2")
    env.pop("ENNCLAVE_NO_AVX512", None)
    part2 = tmp / "avx2_part.json"
    cmd = [sys.executable, __file__, "--avx2-part", str(part2), "--bundles", str(tmp)]
    cmd += ["--seconds", str(args.seconds), "--batches", args.batches]
    cmd += ["--threads", str(args.threads), "--stat", args.stat]
    subprocess.run(cmd, env=env, check=True)
    avx2 = json.loads(part2.read_text())
    kernels = [b["architecture"] for b in avx2["blas"]]
    if kernels != ["Haswell"]:
        console.print(f"[red]OpenBLAS ran {kernels}, not Haswell: part 2 is not AVX2-only[/]")

    cpu = f"{cpu_model()}, {args.threads} threads, {args.stat} per call"
    # Without AVX-512, ONNX Runtime's MLAS runs its AVX2 kernels: then it is a fair
    # AVX2 peer too, not an indication only.
    ort_isa = (
        "unrestricted: AVX-512; indicative only"
        if cpu_flags(("avx512f",))
        else "this CPU has no AVX-512: its AVX2 kernels, a fair peer"
    )
    console.print(
        table(
            f"fp32, {cpu}: worker vs ONNX Runtime (throughput ratio, target ≥ 1.0×)",
            native,
            "ort",
            "ORT",
        )
    )
    console.print(
        table(
            f"AVX2 path, {cpu}: worker ENNCLAVE_KERNEL=avx2 vs numpy/OpenBLAS {kernels} "
            "(target ≥ 1.0×)",
            avx2["matrix"],
            "numpy",
            "numpy",
        )
    )
    console.print(
        table(
            f"AVX2 path vs ONNX Runtime ({ort_isa})",
            avx2["matrix"],
            "ort",
            "ORT",
        )
    )
    console.print(
        f"worker start → ready {start_ms:.1f} ms (target ≤ 150); "
        f"64×512 round trip {rt_us:.1f} µs (target ≤ 30)"
    )
    load_after = os.getloadavg()
    console.print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    if args.json:
        import onnxruntime

        record = {
            "command": "python benchmarks/bench_matrix.py " + " ".join(sys.argv[1:]),
            "cpu": cpu_model(),
            "cpu_flags": cpu_flags(FLAGS),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "load_average_1min": {"before": load_before[0], "after": load_after[0]},
            "threads": {
                "worker": bench_head.THREADS,
                "onnxruntime_intra_op": bench_head.THREADS,
                "openblas": avx2["blas"],
            },
            "versions": {
                "python": platform.python_version(),
                "ennclave": ennclave.__version__,
                "numpy": np.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
            "seconds_per_side_and_cell": args.seconds,
            "statistic": f"{args.stat} ms per call in each cell",
            "ratio": "peer ms / worker ms (throughput; >= 1 means the worker is faster)",
            "fp32_vs_ort": {
                "part": "worker best kernels vs ONNX Runtime",
                "blas": blas_info(),
                **native,
            },
            "avx2": {
                "part": "worker ENNCLAVE_KERNEL=avx2 vs numpy with OPENBLAS_CORETYPE=Haswell "
                "(numpy_ms: the faster of the worker's thread count and 1 OpenBLAS thread); "
                f"ort: {ort_isa}",
                "blas": avx2["blas"],
                **avx2["matrix"],
            },
            "worker_start_ms": start_ms,
            "roundtrip_64x512_us": rt_us,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
