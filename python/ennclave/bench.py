"""`ennclave bench BUNDLE`: latency and throughput of a bundle on this machine.

For each batch size: end-to-end `EnclavedModel.predict` latency (median, p95), time
per sample and throughput, plus the split of one call into the public part (in its
framework) and the enclave worker (private part, including the host↔worker transfer).
Also the start-up time: `ennclave.load` (public model + worker spawn, handshake, key
unwrap, unseal) until the first answer, apart from importing the framework. Inputs are random, shaped by the bundle's
manifest (integer token ids in [0, 2) for integer inputs).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from ._deps import require
from .errors import InputError


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InputError(
            f"--batch-sizes must be comma-separated positive integers, got {text!r}."
        ) from None
    if not sizes or any(s < 1 for s in sizes):
        raise InputError(f"--batch-sizes must be comma-separated positive integers, got {text!r}.")
    return sizes


def random_inputs(model: Any, n: int, rng: np.random.Generator) -> Any:
    """A random batch of `n` for an `EnclavedModel`: one array, or a list for a model
    of several inputs."""
    xs = [random_input(spec, n, rng) for spec in model.input_specs]
    return xs[0] if len(xs) == 1 else xs


def random_input(spec: dict[str, Any], n: int, rng: np.random.Generator) -> np.ndarray:
    shape = (n, *[int(d) for d in spec["shape"][1:]])
    if "int" in str(spec.get("dtype", "float32")):
        # Ids 0 and 1 exist in every table, and 0/1 is a valid padding mask.
        return rng.integers(0, 2, size=shape).astype(np.dtype(spec["dtype"]))
    return rng.standard_normal(shape).astype(np.float32)


def _times(
    fn: Callable[[], Any],
    seconds: float,
    tick: Callable[[float], None],
    min_runs: int = 5,
    max_runs: int | None = None,
) -> list[float]:
    """Call `fn` for `seconds` (at least `min_runs` times, at most `max_runs`, after one
    warm-up call) and return each call's duration."""
    fn()  # warm-up
    out: list[float] = []
    start = time.perf_counter()
    end = start + seconds
    while True:
        t = time.perf_counter()
        fn()
        now = time.perf_counter()
        out.append(now - t)
        tick(min(now - start, seconds))
        if max_runs is not None and len(out) >= max_runs:
            return out
        if now >= end and len(out) >= min_runs:
            return out


def _query_allowance(model: Any, phases: int) -> int | None:
    """Samples one timing phase may send when the bundle has a query budget: half of
    what is left, shared by all phases, so that benchmarking never uses it up (the
    budget is the owner's, and it does not come back)."""
    budget = model.output_policy.get("max_queries")
    if not budget:
        return None
    left = int(budget) - int(model.ping().get("queries_used", 0))
    return max(left // 2 // phases, 0)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags(wanted: Sequence[str]) -> list[str]:
    """Which of the `wanted` CPU flags (/proc/cpuinfo names) this CPU has."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    have = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    return [f for f in wanted if f in have]


def machine() -> str:
    return f"{cpu_model()}, {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"


def bench_bundle(
    bundle: str | os.PathLike[str],
    batch_sizes: Sequence[int] = (1, 8, 64),
    seconds: float = 2.0,
    keystore: Any = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Measure the bundle; returns a JSON-able record (see `ennclave bench --json`)."""
    from .bundle import read_manifest
    from .runtime.model import load

    console = console or Console(stderr=True)
    rng = np.random.default_rng(0)
    results: list[dict[str, Any]] = []
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("start", total=len(batch_sizes) * 2 * seconds + 1, info="")
        # The framework import (seconds for TensorFlow) is reported apart from start-up.
        t = time.perf_counter()
        manifest, _ = read_manifest(Path(bundle))
        framework = (manifest.get("public") or {}).get("framework")
        if framework in ("keras", "onnx"):
            require("keras" if framework == "keras" else "onnxruntime")
        import_ms = 1e3 * (time.perf_counter() - t)
        t = time.perf_counter()
        model = load(bundle, keystore=keystore)
        try:
            x1 = random_inputs(model, 1, rng)
            model.predict(x1, batch_size=1)
            start_ms = 1e3 * (time.perf_counter() - t)
            progress.update(task, advance=1, info=f"ready in {start_ms:.0f} ms")
            public = model._public
            done = 1.0
            allowance = _query_allowance(model, 2 * len(batch_sizes))
            for b in batch_sizes:
                x = random_inputs(model, b, rng)
                base = done
                # Calls this batch size may make per phase (the warm-up call counts).
                cap = None if allowance is None else max(allowance // b - 1, 1)

                def tick(s: float, b: int = b, base: float = base) -> None:
                    progress.update(task, completed=base + s, description=f"batch {b}")

                e2e = _times(
                    lambda x=x, b=b: model.predict(x, batch_size=b),
                    seconds,
                    lambda s, tick=tick: tick(s / 2),
                    max_runs=cap,
                )
                xs = model._validate_all(x, allow_nonfinite=True)
                feed = model._private_feed(xs)
                h = feed[0] if len(feed) == 1 else feed
                pub = (
                    _times(lambda xs=xs: model._public_of(xs), seconds / 4, lambda s: None)
                    if public is not None
                    else [0.0]
                )
                enc = _times(
                    lambda h=h: model.worker.infer(h),
                    seconds / 4,
                    lambda s, tick=tick: tick(seconds / 2 + 2 * s),
                    max_runs=cap,
                )
                done = base + 2 * seconds
                med = statistics.median(e2e)
                row = {
                    "batch": b,
                    "calls": len(e2e),
                    "latency_ms_p50": 1e3 * med,
                    "latency_ms_p95": 1e3 * float(np.percentile(e2e, 95)),
                    "ms_per_sample": 1e3 * med / b,
                    "samples_per_s": b / med,
                    "public_ms": 1e3 * statistics.median(pub),
                    "enclave_ms": 1e3 * statistics.median(enc),
                    # Fewer calls than the time allowed: the bundle's query budget.
                    "capped_by_query_budget": cap is not None and len(e2e) >= cap,
                }
                results.append(row)
                progress.update(
                    task, completed=done, info=f"batch {b}: {row['samples_per_s']:.0f} samples/s"
                )
        finally:
            model.close()
    return {
        "command": "ennclave bench " + " ".join(sys.argv[2:])
        if sys.argv[1:2] == ["bench"]
        else None,
        "bundle": str(Path(bundle)),
        "machine": machine(),
        "versions": {
            "python": platform.python_version(),
            "ennclave": __version__,
            "numpy": np.__version__,
        },
        "seconds_per_batch_size": seconds,
        "framework_import_ms": import_ms,
        "start_ms": start_ms,
        "results": results,
    }


def print_bench(rec: dict[str, Any], console: Console) -> None:
    table = Table(
        title=f"{escape(rec['bundle'])}: load to first answer {rec['start_ms']:.0f} ms "
        f"(after {rec['framework_import_ms']:.0f} ms importing the framework)"
    )
    for col in (
        "batch",
        "calls",
        "latency p50",
        "latency p95",
        "per sample",
        "throughput",
        "public part",
        "enclave",
    ):
        table.add_column(col, justify="right")
    for r in rec["results"]:
        table.add_row(
            str(r["batch"]),
            str(r["calls"]),
            f"{r['latency_ms_p50']:.3f} ms",
            f"{r['latency_ms_p95']:.3f} ms",
            f"{r['ms_per_sample']:.4f} ms",
            f"{r['samples_per_s']:,.0f} /s",
            f"{r['public_ms']:.3f} ms",
            f"{r['enclave_ms']:.3f} ms",
        )
    console.print(table)
    if any(r.get("capped_by_query_budget") for r in rec["results"]):
        console.print(
            "note: the bundle has a query budget, so bench sent at most half of what was "
            "left and some batch sizes made fewer calls than the time allowed.",
            markup=False,
        )
