"""Quantised sealed weights (`split --weights bf16|int8`) on the MIT67 head (512→2048→2048→67).

In one run, on the same machine and the same weights (2 threads everywhere):

* batch-1 latency and batch-64 time of the worker with bf16 and int8 weights against
  ONNX Runtime fp32 (the Gemm head of bench_head.py), and of the int8 worker against
  ONNX Runtime's own int8 model (`onnxruntime.quantization.quantize_dynamic` of the
  same head written with MatMul + Add, the ops dynamic quantisation rewrites), each
  pair timed in alternating blocks (bench_head.timeit_pair);
* the max relative output error (max |y − y_fp32| / max |y_fp32| on 64 random
  inputs) of each against ONNX Runtime fp32;
* the enclave memory: the worker's locked (memfd_secret / mlock) KiB after loading,
  and the weight bytes `split` reports.

    python benchmarks/bench_quant.py [--seconds S] [--json benchmarks/results/quant.json]

The default run takes about a minute and a half. Results record the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_head
from _common import record, timeit_pair

import ennclave
from ennclave.bench import cpu_model

THREADS = bench_head.THREADS
KINDS = ("fp32", "bf16", "int8")


def ort_int8_head(weights: list[np.ndarray], tmp: Path):
    """ONNX Runtime's own int8 version of the head: bench_head's model quantised by
    `quantize_dynamic` with its defaults (int8 weights per tensor, activations
    quantised dynamically to uint8 per call)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    (tmp / "head_fp32.onnx").write_bytes(bench_head.head_onnx(weights))
    quantize_dynamic(tmp / "head_fp32.onnx", tmp / "head_int8.onnx", weight_type=QuantType.QInt8)
    ops = sorted({n.op_type for n in onnx.load(tmp / "head_int8.onnx").graph.node})
    return bench_head.ort_run((tmp / "head_int8.onnx").read_bytes()), ops


def locked_kib(pid: int) -> int | None:
    """The worker's locked memory (its secret memory: memfd_secret or mlock)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Locked:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write results here")
    ap.add_argument("--seconds", type=float, default=2.0, help="time per side of each pair")
    args = ap.parse_args()
    console = Console()
    from ennclave.split import split_model

    tmp = Path(tempfile.mkdtemp(prefix="ennclave-bench-quant-"))
    weights = bench_head.build_head(tmp / "head.keras")
    ks = tmp / "keystore.json"
    bytes_ = {}
    for kind in KINDS:
        r = split_model(tmp / "head.keras", 0, tmp / kind, keystore=ks, weights=kind, n_random=4)
        bytes_[kind] = r.verification.weight_bytes
    ort_fp32 = bench_head.ort_head(weights)
    ort_int8, int8_ops = ort_int8_head(weights, tmp)
    rng = np.random.default_rng(0)
    xs = {1: rng.standard_normal((1, 512)).astype(np.float32)}
    xs[64] = rng.standard_normal((64, 512)).astype(np.float32)
    ref = ort_fp32(xs[64])
    res: dict[str, float] = {"ort_int8_rel_err": rel_err(ort_int8(xs[64]), ref)}
    for b, x in xs.items():
        tw, to = timeit_pair(ort_int8, ort_fp32, x, args.seconds)
        res[f"ort_int8_b{b}_ms"], res[f"ort_fp32_b{b}_ms"] = 1e3 * tw, 1e3 * to
    for kind in KINDS:
        with ennclave.load(tmp / kind, keystore=ks, threads=THREADS) as model:
            infer = model.worker.infer
            res[f"{kind}_rel_err"] = rel_err(infer(xs[64]), ref)
            res[f"{kind}_locked_kib"] = locked_kib(model.worker_pid) or 0
            res[f"{kind}_weight_bytes"] = bytes_[kind]
            for b, x in xs.items():
                tw, to = timeit_pair(infer, ort_fp32, x, args.seconds)
                res[f"{kind}_b{b}_ms"], res[f"{kind}_ort_fp32_b{b}_ms"] = 1e3 * tw, 1e3 * to
                if kind == "int8":
                    tw, to = timeit_pair(infer, ort_int8, x, args.seconds)
                    res[f"int8_vs_int8_b{b}_ms"], res[f"int8_ort_int8_b{b}_ms"] = 1e3 * tw, 1e3 * to
    # Speed-ups: ONNX Runtime's time over the worker's, each from its own alternating pair.
    for kind in KINDS:
        for b in xs:
            res[f"{kind}_vs_ort_fp32_b{b}"] = (
                res[f"{kind}_ort_fp32_b{b}_ms"] / res[f"{kind}_b{b}_ms"]
            )
    for b in xs:
        res[f"int8_vs_ort_int8_b{b}"] = res[f"int8_ort_int8_b{b}_ms"] / res[f"int8_vs_int8_b{b}_ms"]
    for kind in ("bf16", "int8"):
        if res["fp32_locked_kib"]:
            res[f"{kind}_memory_ratio"] = res[f"{kind}_locked_kib"] / res["fp32_locked_kib"]
    targets = {
        "bf16 ≥ 1.6× ORT fp32, batch 1": res["bf16_vs_ort_fp32_b1"] >= 1.6,
        "bf16 ≥ 1.3× ORT fp32, batch 64": res["bf16_vs_ort_fp32_b64"] >= 1.3,
        "int8 ≥ 1.0× ORT int8, batch 1": res["int8_vs_ort_int8_b1"] >= 1.0,
        "int8 ≥ 1.0× ORT int8, batch 64": res["int8_vs_ort_int8_b64"] >= 1.0,
        "int8 ≥ 2× ORT fp32, batch 1": res["int8_vs_ort_fp32_b1"] >= 2.0,
        "bf16 memory ≤ 0.55× fp32": res.get("bf16_memory_ratio", 9) <= 0.55,
        "int8 memory ≤ 0.3× fp32": res.get("int8_memory_ratio", 9) <= 0.3,
    }

    table = Table(title=f"MIT67 head, quantised weights ({THREADS} threads) — {cpu_model()}")
    for col in (
        "worker",
        "b1 ms",
        "× ORT fp32",
        "b64 ms",
        "× ORT fp32",
        "max rel err",
        "locked MiB",
    ):
        table.add_column(col)
    for kind in KINDS:
        table.add_row(
            kind,
            f"{res[f'{kind}_b1_ms']:.3f}",
            f"{res[f'{kind}_vs_ort_fp32_b1']:.2f}",
            f"{res[f'{kind}_b64_ms']:.3f}",
            f"{res[f'{kind}_vs_ort_fp32_b64']:.2f}",
            f"{res[f'{kind}_rel_err']:.2e}",
            f"{res[f'{kind}_locked_kib'] / 1024:.1f}",
        )
    table.add_row(
        "ORT int8",
        f"{res['ort_int8_b1_ms']:.3f}",
        f"{res['ort_fp32_b1_ms'] / res['ort_int8_b1_ms']:.2f}",
        f"{res['ort_int8_b64_ms']:.3f}",
        f"{res['ort_fp32_b64_ms'] / res['ort_int8_b64_ms']:.2f}",
        f"{res['ort_int8_rel_err']:.2e}",
        "",
    )
    console.print(table)
    console.print(
        f"int8 worker vs ORT int8 ({', '.join(int8_ops)}): "
        f"{res['int8_vs_ort_int8_b1']:.2f}× at batch 1, {res['int8_vs_ort_int8_b64']:.2f}× at 64"
    )
    for name, ok in targets.items():
        console.print(f"{'met' if ok else 'NOT met'}: {name}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        rec = record(
            "bench_quant.py",
            {k: float(f"{v:.5g}") for k, v in res.items()},
            ort_int8_ops=int8_ops,
            targets_met=targets,
        )
        args.json.write_text(json.dumps(rec, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
