"""Shared by the worker-vs-ONNX Runtime benchmarks: timing in alternating blocks, an
ONNX Runtime session with a fixed thread count, and what to record about the machine."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import ennclave
from ennclave.bench import cpu_model


def timeit(fn: Callable[[Any], Any], x: Any, seconds: float, min_runs: int = 20) -> float:
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


def timeit_blocks(
    fns: Sequence[Callable[[Any], Any]],
    x: Any,
    seconds: float,
    block_s: float = 0.25,
    warmup: int = 5,
    min_blocks: int = 1,
    stat: Callable[[list[float]], float] = statistics.median,
) -> list[float]:
    """Median (or `stat`) seconds per call of each of `fns`, timed in alternating blocks of
    `block_s` (at least `min_blocks` rounds), so all see the same machine state: on a
    shared VM the speed drifts by tens of percent within a minute, which back-to-back
    runs would mistake for a difference between them. The first `warmup` calls of each
    block are not timed (the other side's threads may still be spinning, as ONNX
    Runtime's do after a run)."""
    times: list[list[float]] = [[] for _ in fns]
    end = time.perf_counter() + len(fns) * seconds
    rounds = 0
    while time.perf_counter() < end or rounds < min_blocks:
        rounds += 1
        for fn, ts in zip(fns, times, strict=True):
            for _ in range(warmup):
                fn(x)
            stop = time.perf_counter() + block_s
            while True:
                t = time.perf_counter()
                fn(x)
                ts.append(time.perf_counter() - t)
                if t >= stop:
                    break
    return [stat(ts) for ts in times]


def timeit_pair(
    fa: Callable[[Any], Any], fb: Callable[[Any], Any], x: Any, seconds: float, **kw: Any
) -> tuple[float, float]:
    """Median seconds per call of `fa` and `fb` (see `timeit_blocks`)."""
    ta, tb = timeit_blocks([fa, fb], x, seconds, **kw)
    return ta, tb


def ort_run(model: bytes, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """`x ↦ y` for a one-input, one-output ONNX model (serialised) on ONNX Runtime's
    CPU provider with `threads` intra-op threads and all graph optimisations (its
    attention, layer-norm and gelu fusions included)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def record(script: str, results: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The JSON record of a run: the command that made it, the machine, versions."""
    switches = ("ENNCLAVE_NO_AVX512", "ENNCLAVE_KERNEL", "ENNCLAVE_QKERNEL")
    env = "".join(f"{k}={os.environ[k]} " for k in switches if k in os.environ)
    return {
        "command": f"{env}python benchmarks/{script} " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "ennclave": ennclave.__version__,
        **extra,
        "results": results,
    }
