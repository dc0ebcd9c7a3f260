"""Plain metrics of the audit, independent of any model framework.

Normalisation follows TEESlice (Zhang et al., "No Privacy Left Outside: On the
(In-)Security of TEE-Shielded DNN Partition for On-Device ML", IEEE S&P 2024) as its
artifact computes it (github.com/ziqi-zhang/TEESlice-artifact,
plot/attack/summarize_solution_result.py and print_acc_mia_flops_optimal_point.py):

* **relative to black-box** — `metric / metric_blackbox` (Table 2's summary rows: e.g.
  `darknetz_acc / blackbox_acc`, `darknetz_mode0 / blackbox_mode0`). 1.0 means "as
  safe as shielding the whole model"; the white-box reference sits above 1.
* **sweet spot** — a configuration counts as black-box-level when
  `metric < 1.05 × metric_blackbox` (`blackbox_acc * (1 + 0.05)` in the artifact);
  the sweet spot C* is the smallest shielded configuration that meets it.

TEESlice does not define a white-box-normalised score; ours, defined here and named
differently so it cannot be mistaken for theirs, is the **leak fraction**
`(metric − blackbox) / (whitebox − blackbox)`: 0 = no more than the black-box
attacker learns, 1 = as much as white-box access gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# TEESlice's tolerance for "as secure as black-box" (5 % above the black-box metric).
TEESLICE_TOLERANCE = 0.05


def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    """Fraction of `pred` labels equal to `y`."""
    pred, y = np.asarray(pred).reshape(-1), np.asarray(y).reshape(-1)
    if pred.shape != y.shape or pred.size == 0:
        raise ValueError(f"label arrays differ in length ({pred.shape} vs {y.shape}) or are empty")
    return float(np.mean(pred == y))


def fidelity(surrogate_pred: np.ndarray, victim_pred: np.ndarray) -> float:
    """Agreement of two models' labels on the same inputs, including the inputs the
    victim gets wrong (TEESlice / Jagielski et al.'s definition)."""
    return accuracy(surrogate_pred, victim_pred)


def roc_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """Area under the ROC curve of "score is higher for members", computed exactly as
    the Mann–Whitney U statistic with ties counted one half."""
    m = np.asarray(member_scores, dtype=np.float64).reshape(-1)
    n = np.asarray(nonmember_scores, dtype=np.float64).reshape(-1)
    if m.size == 0 or n.size == 0:
        raise ValueError("membership AUC needs at least one member and one non-member")
    allv = np.concatenate([m, n])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty_like(allv)
    sorted_v = allv[order]
    # Average ranks over ties (1-based).
    i = 0
    while i < sorted_v.size:
        j = i
        while j + 1 < sorted_v.size and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[: m.size].sum() - m.size * (m.size + 1) / 2.0
    return float(u / (m.size * n.size))


def best_threshold_accuracy(
    member_scores: np.ndarray, nonmember_scores: np.ndarray
) -> tuple[float, float]:
    """Best balanced accuracy of "member iff score ≥ t" over all thresholds t, and that t.

    Balanced (mean of the two per-class accuracies) so unequal member / non-member
    counts cannot inflate it; with equal counts it is plain accuracy. This is an
    upper bound for a real attacker, who must pick t without the labels.
    """
    m = np.asarray(member_scores, dtype=np.float64).reshape(-1)
    n = np.asarray(nonmember_scores, dtype=np.float64).reshape(-1)
    if m.size == 0 or n.size == 0:
        raise ValueError("membership accuracy needs at least one member and one non-member")
    cands = np.unique(np.concatenate([m, n, [np.inf]]))
    ms, ns = np.sort(m), np.sort(n)
    # TPR(t) = P(m >= t), TNR(t) = P(n < t)
    tpr = 1.0 - np.searchsorted(ms, cands, side="left") / m.size
    tnr = np.searchsorted(ns, cands, side="left") / n.size
    bal = (tpr + tnr) / 2.0
    k = int(np.argmax(bal))
    return float(bal[k]), float(cands[k])


@dataclass
class Normalised:
    """One attack metric beside its white-box and black-box references."""

    value: float
    whitebox: float
    blackbox: float
    rel_blackbox: float | None  # TEESlice: value / blackbox
    leak_fraction: float | None  # ours: (value − blackbox) / (whitebox − blackbox)
    blackbox_level: bool  # TEESlice: value < 1.05 × blackbox


def normalise(value: float, whitebox: float, blackbox: float) -> Normalised:
    """Normalise `value` to its references; see the module docstring for definitions."""
    rel = value / blackbox if blackbox != 0 else None
    span = whitebox - blackbox
    leak = (value - blackbox) / span if abs(span) > 1e-12 else None
    return Normalised(
        value=float(value),
        whitebox=float(whitebox),
        blackbox=float(blackbox),
        rel_blackbox=None if rel is None else float(rel),
        leak_fraction=None if leak is None else float(leak),
        blackbox_level=bool(value < (1.0 + TEESLICE_TOLERANCE) * blackbox),
    )


def sweet_spot(enclave_sizes: list[float], values: list[float], blackbox: float) -> int | None:
    """TEESlice's C*: index of the smallest enclave whose attack metric is below
    1.05 × the black-box metric, or None when no configuration reaches it."""
    order = sorted(range(len(enclave_sizes)), key=lambda i: enclave_sizes[i])
    for i in order:
        if values[i] < (1.0 + TEESLICE_TOLERANCE) * blackbox:
            return i
    return None
