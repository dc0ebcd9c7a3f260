"""The two views of a bundle the audit needs.

* `query_api` — the attacker's view: `EnclavedModel.predict`, so the output policy and
  the query budget enforced inside the worker apply.
* `OwnerView` — the owner's view, for the white-box reference: the owner holds the
  data key, so the audit unseals the private program and runs it with the reference
  executor (full outputs, no budget). Nothing the attacker gets goes through here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, QueryBudgetExhausted
from ..runtime.model import EnclavedModel, TopK

Tick = Callable[[int], None]


@dataclass
class Answers:
    """What the attacker got back from the API for the first `n` query inputs."""

    mode: str  # the bundle's output policy mode
    n: int  # answers obtained (≤ asked: the budget may refuse the rest)
    asked: int
    labels: np.ndarray  # (n,) int64 — always derivable
    probs: np.ndarray | None = None  # (n, C) for full / round
    topk_values: np.ndarray | None = None  # (n, k) for top_k
    topk_indices: np.ndarray | None = None
    refusal: str | None = None  # the worker's refusal message, when the budget stopped us
    notes: list[str] = field(default_factory=list)


def to_probs(raw: np.ndarray, tol: float = 1e-3) -> np.ndarray:
    """Rows that already are distributions stay; anything else (logits) is softmaxed."""
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim != 2:
        raise InputError(
            f"The audit handles classifiers with (N, classes) outputs; this one gives {raw.shape}."
        )
    if np.all(raw >= -tol) and np.allclose(raw.sum(axis=1), 1.0, atol=max(tol, 1e-3)):
        p = np.clip(raw, 0.0, None)
        return p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
    z = raw - raw.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def round_tolerance(policy: dict[str, Any], n_classes: int) -> float:
    """How far from 1 a rounded distribution may sum (each value off by ≤ half a step)."""
    if policy.get("mode") == "round":
        return 0.5 * 10.0 ** (-int(policy.get("decimals", 2))) * n_classes + 1e-6
    return 1e-3


def _append(out: dict[str, list[np.ndarray]], y: Any) -> None:
    if isinstance(y, TopK):
        out["v"].append(np.asarray(y.values))
        out["i"].append(np.asarray(y.indices))
    else:
        out["y"].append(np.asarray(y))


def query_api(
    model: EnclavedModel, x: np.ndarray, batch_size: int = 128, tick: Tick | None = None
) -> Answers:
    """Ask the bundle about `x` through its public API, as an attacker would.

    When the worker refuses (query budget), the batch that crossed the limit computed
    nothing, so we retry one sample at a time to collect every answer the budget allows.
    """
    policy = model.output_policy
    mode = str(policy.get("mode", "full"))
    out: dict[str, list[np.ndarray]] = {"y": [], "v": [], "i": []}
    n = 0
    refusal = None
    while n < len(x):
        xb = x[n : n + batch_size]
        try:
            _append(out, model.predict(xb, batch_size=len(xb)))
            n += len(xb)
            if tick:
                tick(len(xb))
        except QueryBudgetExhausted as e:
            if len(xb) == 1:
                refusal = str(e)
                break
            batch_size = 1  # find the exact limit
    answers = Answers(mode=mode, n=n, asked=len(x), labels=np.zeros(0, np.int64), refusal=refusal)
    if n == 0:
        return answers
    if mode == "label":
        answers.labels = np.concatenate(out["y"]).astype(np.int64).reshape(-1)
    elif mode == "top_k":
        answers.topk_values = np.concatenate(out["v"]).astype(np.float32)
        answers.topk_indices = np.concatenate(out["i"]).astype(np.int64)
        answers.labels = answers.topk_indices[:, 0].copy()
    else:
        raw = np.concatenate(out["y"]).reshape(n, -1)
        n_classes = raw.shape[1]
        answers.probs = to_probs(raw, round_tolerance(policy, n_classes)).astype(np.float32)
        answers.labels = np.argmax(raw, axis=1).astype(np.int64)
    return answers


def soft_targets(ans: Answers, n_classes: int, count: int) -> np.ndarray | None:
    """Training targets from the first `count` answers, using all the policy reveals:
    full distributions; top-k values with the left-over mass spread evenly over the
    other classes (the attacker's best guess); None when only labels come back."""
    if ans.probs is not None:
        return ans.probs[:count].astype(np.float32)
    if ans.topk_values is not None and ans.topk_indices is not None:
        v = ans.topk_values[:count].astype(np.float64)
        idx = ans.topk_indices[:count]
        k = v.shape[1]
        if (v < -1e-6).any() or (v.sum(axis=1) > 1.0 + 1e-3).any():
            # Logits, not probabilities: no known left-over mass to spread.
            v = np.exp(v - v.max(axis=1, keepdims=True))
            v = v / v.sum(axis=1, keepdims=True)
        v = np.clip(v, 0.0, None)
        rest = np.clip(1.0 - v.sum(axis=1, keepdims=True), 0.0, None) / max(n_classes - k, 1)
        t = np.repeat(rest, n_classes, axis=1)
        np.put_along_axis(t, idx, v, axis=1)
        return (t / t.sum(axis=1, keepdims=True)).astype(np.float32)
    return None


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    t = np.zeros((len(labels), n_classes), np.float32)
    t[np.arange(len(labels)), labels] = 1.0
    return t


class OwnerView:
    """The victim with full outputs, computed from the unsealed private program."""

    def __init__(self, bundle: str | Path, keystore: Any = None) -> None:
        from ..bundle import read_manifest, sealed_path
        from ..keystore import Keystore
        from ..program import Program
        from ..seal import unseal_container

        self.bundle = Path(bundle)
        manifest, _ = read_manifest(self.bundle)
        ks = keystore if hasattr(keystore, "get") else Keystore(keystore)
        key = ks.get(manifest["private"]["key_id"])
        sealed = sealed_path(self.bundle, manifest).read_bytes()
        container = unseal_container(sealed, manifest, key, str(self.bundle))
        del key
        self.program = Program.from_container(container)
        self.manifest = manifest

    @property
    def n_params(self) -> int:
        return self.program.num_params

    def probs(self, features: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Full output distribution of the private part on cut-tensor `features`."""
        from ..reference import execute

        raw = np.concatenate(
            [
                execute(self.program, features[s : s + batch_size]).reshape(
                    len(features[s : s + batch_size]), -1
                )
                for s in range(0, len(features), batch_size)
            ]
        )
        return to_probs(raw).astype(np.float32)
