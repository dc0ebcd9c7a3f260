"""Compare enclave worker builds on the benchmark head, interleaved with ONNX Runtime.

For a change to the worker's kernels or protocol: build the old and the new binary,
then time both in alternating blocks within one process (with ONNX Runtime as a
yardstick), so that all of them see the same machine state. On a shared VM the speed
drifts by tens of percent within a minute, which separate runs would mistake for a
difference between the builds.

    python benchmarks/bench_head.py --save-bundles DIR          # once
    python benchmarks/ab_workers.py DIR OLD_BINARY NEW_BINARY [--batch 64] [--rounds 12]

Prints the median, 25th and 75th percentile over rounds of each build's per-round
median time per call. Runs the `head` bundle of DIR (or `--bundle identity` for the
round trip alone, or `--bundle cnn` in a folder of `bench_matrix.py --bundles`) with 2
worker threads, like bench_head.py; ONNX Runtime runs beside the head only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_head

import ennclave


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", type=Path, help="a folder written by bench_head.py --save-bundles")
    ap.add_argument("binaries", nargs="+", type=Path, help="worker binaries to compare")
    ap.add_argument(
        "--bundle",
        default="head",
        help="a bundle in the folder: head, identity, or cnn (bench_matrix.py --bundles)",
    )
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--block", type=float, default=0.3, help="seconds per timed block")
    args = ap.parse_args()

    d = args.bundles
    # The bundle's private input: [batch, *shape] from its manifest.
    (spec,) = json.loads((d / args.bundle / "manifest.json").read_text())["private"]["inputs"]
    shape = (args.batch, *spec["shape"][1:])
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    models = [
        ennclave.load(
            d / args.bundle,
            keystore=d / "keystore.json",
            threads=bench_head.THREADS,
            worker_binary=b,
        )
        for b in args.binaries
    ]
    runs: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        str(b): m.worker.infer for b, m in zip(args.binaries, models, strict=True)
    }
    if args.bundle == "head":
        w = np.load(d / "weights.npz")
        runs["ONNX Runtime"] = bench_head.ort_head([w[k] for k in sorted(w.files)])
    want = next(iter(runs.values()))(x)
    for name, run in runs.items():  # every build must compute the same thing
        np.testing.assert_allclose(run(x), want, atol=1e-4, err_msg=name)

    per_round: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            for _ in range(3):  # warm-up: the other side's threads may still spin
                run(x)
            times = []
            stop = time.perf_counter() + args.block
            while time.perf_counter() < stop:
                t = time.perf_counter()
                run(x)
                times.append(time.perf_counter() - t)
            per_round[name].append(statistics.median(times))
    for m in models:
        m.close()

    unit, scale = ("µs", 1e6) if args.bundle == "identity" else ("ms", 1e3)
    table = Table(title=f"{args.bundle}, batch {args.batch}, {args.rounds} interleaved rounds")
    for col in ("run", f"median {unit}", "p25", "p75", "vs first"):
        table.add_column(col, justify="left" if col == "run" else "right")
    first = float(np.median(per_round[str(args.binaries[0])]))
    for name, ts in per_round.items():
        a = np.array(ts) * scale
        table.add_row(
            name,
            f"{np.median(a):.3f}",
            f"{np.percentile(a, 25):.3f}",
            f"{np.percentile(a, 75):.3f}",
            f"{first / float(np.median(ts)):.2f}× speed",
        )
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
