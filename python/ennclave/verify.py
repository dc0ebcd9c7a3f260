"""Check a split before it ships: original model vs saved public part -> enclave program.

The saved public part runs through `runtime.public.PublicPart`, the object the client
runtime uses, so what is verified is the code path that ships.

What counts as correct: float32 is not exact, and deep networks amplify its rounding,
so the split passes when

    max |split − original| ≤ atol + rtol · max |original|

(the output's own scale), or, failing that, when the split is no further from a float64
run of the enclave program (`reference.execute(exact=True)`, on the same public
output) than the framework itself is: then the difference is float32 noise on both
sides, not a lowering bug. Only a split clearly worse than the framework fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .adapters import ModelAdapter
from .errors import InputError
from .graph import CutPoint, input_ancestors
from .program import Program
from .reference import execute
from .runtime.public import PublicPart

# "Clearly worse": more than this many times the framework's own float32 error.
WORSE_THAN_FRAMEWORK = 4.0


@dataclass
class Verification:
    max_abs_error: float  # split vs original
    max_rel_error: float  # the same, over max |original|
    samples: int
    tolerance: float  # atol
    passed: bool
    rtol: float = 0.0
    allowed: float = 0.0  # atol + rtol · max |original|
    # Distance of the split and of the original from a float64 run of the program (on
    # the same public output); None when the tolerance alone decided.
    split_vs_float64: float | None = None
    framework_vs_float64: float | None = None
    probe: str = ""  # which inputs were used
    warnings: list[str] = field(default_factory=list)
    # The float64 reference shows the split itself is wrong (not float32 noise).
    lowering_bug: bool = False
    # `--weights bf16|int8`: the shipped program's kernels are quantised. The fields
    # above judge the float32 program (the lowering); these say what quantising costs:
    # the shipped program (reference executor, same quantised weights) vs the original.
    weights: str = "fp32"
    quantised_max_abs_error: float | None = None
    quantised_max_rel_error: float | None = None
    # Bytes of the enclave's weights: float32, and as shipped.
    weight_bytes_fp32: int = 0
    weight_bytes: int = 0
    # With --labels: top-1 accuracy on the given samples of the original model and of
    # the shipped (quantised) split, and how many samples that is.
    accuracy_fp32: float | None = None
    accuracy_shipped: float | None = None
    accuracy_samples: int = 0


def _probe_multi(
    adapter: ModelAdapter, samples: Any, random: list[np.ndarray]
) -> tuple[list[Any], str]:
    """`probe_batches` for a model of several inputs: batches are lists of arrays in
    model-input order; `samples` a list in that order or a dict by name."""
    inputs = adapter.graph.inputs
    if samples is None:
        return [random], f"{len(random[0])} random inputs (adapter-made, per input)"
    names = [t.name for t in inputs]
    if isinstance(samples, dict):
        if sorted(samples) != sorted(names):
            raise InputError(f"The samples must be a dict with exactly the inputs {names}.")
        samples = [samples[n] for n in names]
    if not isinstance(samples, (list, tuple)) or len(samples) != len(names):
        raise InputError(
            f"The model takes {len(names)} inputs {names}; pass the samples as a list in "
            "this order or a dict by name."
        )
    arrs = []
    for t, a, r in zip(inputs, samples, random, strict=True):
        a = np.asarray(a)
        want = tuple(t.shape[1:])
        if a.ndim == 0 or len(a) == 0 or tuple(a.shape[1:]) != want:
            raise InputError(
                f"The samples of input {t.name!r} have shape {a.shape} but the model takes "
                f"(N, {', '.join(map(str, want))})."
            )
        arrs.append(a.astype(r.dtype))
    if len({len(a) for a in arrs}) > 1:
        raise InputError("The samples of the model's inputs have different batch sizes.")
    return [arrs, random], f"{len(arrs[0])} samples given + {len(random[0])} random"


def probe_batches(
    adapter: ModelAdapter, samples: Any, n_random: int, seed: int
) -> tuple[list[Any], str]:
    """The verification inputs and a sentence that says what they are: the user's
    samples first when given (plus random inputs scaled like them), else random inputs
    in a realistic range. A model of several inputs: each batch is a list of arrays."""
    rng = np.random.default_rng(seed)
    random = adapter.random_inputs(n_random, rng)
    if len(adapter.graph.inputs) > 1:
        return _probe_multi(adapter, samples, list(random))
    if samples is None:
        kind = "integer ids" if random.dtype.kind in "iu" else "uniform in [0, 1)"
        return [random], f"{len(random)} random inputs ({kind})"
    samples = np.asarray(samples)
    expected_shape = tuple(adapter.graph.inputs[0].shape[1:])
    if samples.ndim == 0 or tuple(samples.shape[1:]) != expected_shape or len(samples) == 0:
        raise InputError(
            f"The samples have shape {samples.shape} but the model takes "
            f"(N, {', '.join(map(str, expected_shape))}); pass a batch of model inputs."
        )
    samples = samples.astype(random.dtype)
    if random.dtype.kind == "f":
        # Random extras with the samples' mean and spread, so they probe the same range.
        mean, std = float(samples.mean()), float(samples.std()) or 1.0
        random = (mean + std * rng.standard_normal(random.shape)).astype(random.dtype)
    elif len(random):
        lo, hi = int(samples.min()), int(samples.max())
        random = rng.integers(lo, hi + 1, size=random.shape).astype(random.dtype)
    return [samples, random], f"{len(samples)} samples given + {len(random)} random like them"


def _batch_len(x: Any) -> int:
    return len(x[0]) if isinstance(x, (list, tuple)) else len(x)


def _check_labels(labels: np.ndarray, samples: Any) -> np.ndarray:
    """Class indices, one per sample (one-hot rows are read by their argmax)."""
    if samples is None:
        raise InputError("Labels were given without samples; pass --samples with them.")
    if isinstance(samples, dict):
        samples = list(samples.values())
    n = _batch_len(samples)
    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = labels.argmax(-1)
    if labels.ndim != 1 or len(labels) != n or labels.dtype.kind not in "iuf":
        raise InputError(
            f"The labels have shape {labels.shape} but there are {n} samples; pass "
            "one class index (or one-hot row) per sample."
        )
    return labels.astype(np.int64)


def _saturated(outputs: np.ndarray) -> bool:
    """Probability outputs pinned at 0 or 1: every split agrees there, so agreement
    says nothing about the logits behind them."""
    v = outputs.astype(np.float64).ravel()
    if not v.size or v.min() < 0 or v.max() > 1:
        return False
    pinned = np.minimum(v, 1 - v) < 1e-6
    return bool(pinned.mean() > 0.99)


def split_feed(
    adapter: ModelAdapter,
    point: CutPoint,
    program: Program,
    x: Any,
    public: PublicPart | None,
) -> list[np.ndarray]:
    """The enclave program's inputs for the model inputs `x` (an array, or a list in
    model-input order): the public part's output (or, without one, the model input of
    the same name), then the model inputs the private part reads, by name."""
    xs = list(x) if isinstance(x, (list, tuple)) else [x]
    by_name = {t.name: a for t, a in zip(adapter.graph.inputs, xs, strict=True)}
    feed: list[np.ndarray] = []
    for i, spec in enumerate(program.inputs):
        if i == 0 and public is not None:
            ins = [by_name[t.name] for t in input_ancestors(adapter.graph, {point.tensor.name})]
            mid = public(ins[0] if len(ins) == 1 else ins)
        elif spec.name in by_name:
            mid = by_name[spec.name]
        elif i == 0 and len(xs) == 1:
            mid = xs[0]
        else:
            raise InputError(
                f"The private program reads {spec.name!r}, which is no model input; this "
                "is a bug in the adapter, please report it."
            )
        feed.append(np.asarray(mid, dtype=np.float32))
    return feed


def verify_split(
    adapter: ModelAdapter,
    point: CutPoint,
    program: Program,
    public_path: Path | None,
    *,
    samples: Any = None,
    tolerance: float = 1e-4,
    rtol: float = 1e-4,
    n_random: int = 16,
    seed: int = 0,
    quantised: Program | None = None,
    labels: np.ndarray | None = None,
) -> Verification:
    """Run the original and the split on the probe inputs and compare (module doc).
    With `quantised` (the program as shipped with bf16/int8 kernels) also measure its
    error against the original, and with `labels` (one per sample) both accuracies."""
    if labels is not None:
        labels = _check_labels(labels, samples)
    batches, probe = probe_batches(adapter, samples, n_random, seed)
    public = (
        PublicPart(
            public_path,
            adapter.framework,
            ["CPUExecutionProvider"],
            [t.name for t in input_ancestors(adapter.graph, {point.tensor.name})],
        )
        if public_path
        else None
    )
    expected_all, got_all, mids, shipped_all = [], [], [], []
    for x in batches:
        expected = np.asarray(adapter.predict(x))
        mid = split_feed(adapter, point, program, x, public)
        got = execute(program, mid)
        if quantised is not None:
            shipped_all.append(execute(quantised, mid))
        if got.shape != expected.shape:
            return Verification(
                float("inf"), float("inf"), sum(map(_batch_len, batches)), tolerance, False, rtol,
                probe=probe,
                warnings=[f"the split's output shape {got.shape} is not the original's "
                          f"{expected.shape}"],
            )  # fmt: skip
        expected_all.append(expected.astype(np.float64))
        got_all.append(got.astype(np.float64))
        mids.append(mid)
    expected, got = np.concatenate(expected_all), np.concatenate(got_all)
    count = len(expected)
    err = np.abs(got - expected)
    max_abs = float(err.max()) if err.size else 0.0
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    allowed = tolerance + rtol * scale
    v = Verification(max_abs, max_rel, count, tolerance, False, rtol, allowed, probe=probe)
    v.weight_bytes_fp32 = v.weight_bytes = program.weight_bytes
    shipped = np.concatenate(shipped_all).astype(np.float64) if shipped_all else got
    if quantised is not None:
        v.weights = quantised.weights_dtype
        v.weight_bytes = quantised.weight_bytes
        q_abs = float(np.abs(shipped - expected).max()) if expected.size else 0.0
        v.quantised_max_abs_error = q_abs
        v.quantised_max_rel_error = q_abs / scale if scale > 0 else q_abs
    if labels is not None:
        n = len(labels)
        if expected.ndim != 2:
            v.warnings.append(
                f"--labels ignored: accuracy needs class scores of shape (N, classes), the "
                f"model outputs {expected.shape[1:]} per sample"
            )
        else:
            v.accuracy_samples = n
            v.accuracy_fp32 = float((expected[:n].argmax(-1) == labels).mean())
            v.accuracy_shipped = float((shipped[:n].argmax(-1) == labels).mean())
    if _saturated(expected):
        v.warnings.append(
            "the outputs are saturated (probabilities of 0 or 1), so this verification "
            "says little; pass --samples with real inputs, or verify a model without its "
            "final softmax"
        )
    if not np.isfinite(max_abs) or not np.isfinite(expected).all():
        return v
    if max_abs <= allowed:
        v.passed = True
        return v
    # Over the tolerance: is it the split, or float32 itself? Judge both against float64.
    exact = np.concatenate([execute(program, m, exact=True) for m in mids])
    split64 = float(np.abs(got - exact).max())
    framework64 = float(np.abs(expected - exact).max())
    v.split_vs_float64, v.framework_vs_float64 = split64, framework64
    v.lowering_bug = split64 > WORSE_THAN_FRAMEWORK * framework64 + max(tolerance, 0.0)
    v.passed = tolerance >= 0 and not v.lowering_bug
    if v.passed:
        v.warnings.append(
            f"the split differs from the original by {max_abs:.3g}, over atol + rtol·scale = "
            f"{allowed:.3g}, but no more than the framework's own float32 result differs from "
            f"a float64 run ({framework64:.3g}): float32 rounding, not a lowering error"
        )
    return v
