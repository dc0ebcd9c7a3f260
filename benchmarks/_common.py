"""Shared by the worker-vs-ONNX Runtime benchmarks: timing in alternating blocks, an
ONNX Runtime session with a fixed thread count, and what to record about the machine."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import ennclave


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


def timeit_pair(
    fa: Callable[[Any], Any],
    fb: Callable[[Any], Any],
    x: Any,
    seconds: float,
    block_s: float = 0.25,
    warmup: int = 5,
    min_blocks: int = 1,
) -> tuple[float, float]:
    """Median seconds per call of `fa` and `fb`, timed in alternating blocks of
    `block_s` (at least `min_blocks` each), so both see the same machine state: on a
    shared VM the speed drifts by tens of percent within a minute, which back-to-back
    runs would mistake for a difference between the two. The first `warmup` calls of
    each block are not timed (the other side's threads may still be spinning, as ONNX
    Runtime's do after a run)."""
    ta: list[float] = []
    tb: list[float] = []
    end = time.perf_counter() + 2 * seconds
    blocks = 0
    while time.perf_counter() < end or blocks < min_blocks:
        blocks += 1
        for fn, times in ((fa, ta), (fb, tb)):
            for _ in range(warmup):
                fn(x)
            stop = time.perf_counter() + block_s
            while True:
                t = time.perf_counter()
                fn(x)
                times.append(time.perf_counter() - t)
                if t >= stop:
                    break
    return statistics.median(ta), statistics.median(tb)


def ort_session(model: Any, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """`x ↦ y` for a one-input, one-output ONNX model (a ModelProto) on ONNX Runtime's
    CPU provider with `threads` intra-op threads and all graph optimisations (its
    attention, layer-norm and gelu fusions included)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def cpu_model() -> str:
    """The CPU's model name (Linux), else what `platform` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def record(script: str, results: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The JSON record of a run: the command that made it, the machine, versions."""
    env = "".join(f"{k}={os.environ[k]} " for k in ("ENNCLAVE_NO_AVX512",) if k in os.environ)
    return {
        "command": f"{env}python benchmarks/{script} " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "ennclave": ennclave.__version__,
        **extra,
        "results": results,
    }
