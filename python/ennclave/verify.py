"""Check a split before it ships: original model vs saved public part -> reference executor.

The saved public part runs through `runtime.public.PublicPart`, the object the client
runtime uses, so what is verified is the code path that ships."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .adapters import ModelAdapter
from .errors import InputError
from .graph import CutPoint
from .program import Program
from .reference import execute
from .runtime.public import PublicPart


@dataclass
class Verification:
    max_abs_error: float
    max_rel_error: float
    samples: int
    tolerance: float
    passed: bool


def verify_split(
    adapter: ModelAdapter,
    point: CutPoint,
    program: Program,
    public_path: Path | None,
    *,
    samples: np.ndarray | None = None,
    tolerance: float = 1e-4,
    n_random: int = 16,
    seed: int = 0,
) -> Verification:
    """Run both paths on random inputs (and the user's samples) and compare.

    The public side runs from the file just written, so what is verified is exactly
    what ships, not the in-memory model.
    """
    batches = [adapter.random_inputs(n_random, np.random.default_rng(seed))]
    if samples is not None:
        samples = np.asarray(samples)
        expected_shape = tuple(adapter.graph.inputs[0].shape[1:])
        if samples.ndim == 0 or tuple(samples.shape[1:]) != expected_shape or len(samples) == 0:
            raise InputError(
                f"The samples have shape {samples.shape} but the model takes "
                f"(N, {', '.join(map(str, expected_shape))}); pass a batch of model inputs."
            )
        batches.append(samples.astype(batches[0].dtype))
    public = (
        PublicPart(public_path, adapter.framework, ["CPUExecutionProvider"])
        if public_path
        else None
    )
    max_abs, max_rel, count = 0.0, 0.0, 0
    for x in batches:
        expected = adapter.predict(x)
        mid = public(x) if public is not None else x
        got = execute(program, np.asarray(mid, dtype=np.float32))
        if got.shape != expected.shape:
            return Verification(float("inf"), float("inf"), count + len(x), tolerance, False)
        err = np.abs(got.astype(np.float64) - expected.astype(np.float64))
        abs_e = float(err.max()) if err.size else 0.0
        scale = float(np.abs(expected).max()) if expected.size else 0.0
        max_abs = max(max_abs, abs_e)
        max_rel = max(max_rel, abs_e / scale if scale > 0 else abs_e)
        count += len(x)
    if not (np.isfinite(max_abs)):
        return Verification(max_abs, max_rel, count, tolerance, False)
    return Verification(max_abs, max_rel, count, tolerance, max_abs <= tolerance)
