"""Membership inference: threshold attacks on a model's outputs.

* **confidence** (Salem et al.; ML-Doctor's black-box setting that TEESlice uses):
  member iff max probability ≥ t;
* **loss** (Yeom et al.): member iff log p(true label) ≥ t;
* **label-only gap attack** (Yeom et al.): member iff the prediction is correct — all
  a `label` policy leaves; its balanced accuracy is ½ + (train acc − test acc)/2.

Confidence and loss attacks need probabilities. Under a `label` policy the API gives
none, and the result says so (`confidence`/`loss` are None with a note) rather than
inventing scores. Under `top_k` the confidence is exact (top-1 value) and p(true label)
is known when the label is in the top k, otherwise bounded by the left-over mass
spread evenly (the attacker's best guess).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .metrics import accuracy, best_threshold_accuracy, roc_auc
from .oracle import Answers

_EPS = 1e-12


@dataclass
class ThresholdAttack:
    auc: float
    best_accuracy: float  # balanced, best threshold chosen with hindsight (upper bound)
    threshold: float


@dataclass
class MembershipResult:
    target: str  # whose outputs were attacked
    outputs: str  # "probs", "top_k" or "label"
    members: int
    nonmembers: int
    train_accuracy: float  # on the members
    test_accuracy: float  # on the non-members
    generalisation_gap: float  # train − test accuracy
    confidence_gap: float | None  # mean max-probability, members − non-members
    confidence: ThresholdAttack | None
    loss: ThresholdAttack | None
    label_only: ThresholdAttack
    note: str | None = None


def threshold_attack(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> ThresholdAttack:
    acc, t = best_threshold_accuracy(member_scores, nonmember_scores)
    return ThresholdAttack(
        auc=roc_auc(member_scores, nonmember_scores), best_accuracy=acc, threshold=t
    )


def _scores_from_probs(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    conf = p.max(axis=1)
    logp = np.log(np.clip(p[np.arange(len(y)), y], _EPS, None))
    return conf, logp


def _scores_from_topk(
    values: np.ndarray, indices: np.ndarray, y: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    v = values.astype(np.float64)
    conf = v[:, 0]
    hit = indices == y[:, None]
    rest = np.clip(1.0 - v.sum(axis=1), 0.0, None) / max(n_classes - v.shape[1], 1)
    py = np.where(hit.any(axis=1), (v * hit).sum(axis=1), rest)
    return conf, np.log(np.clip(py, _EPS, None))


def attack(
    target: str,
    outputs: str,
    pred_m: np.ndarray,
    y_m: np.ndarray,
    pred_n: np.ndarray,
    y_n: np.ndarray,
    scores_m: tuple[np.ndarray, np.ndarray] | None,
    scores_n: tuple[np.ndarray, np.ndarray] | None,
    note: str | None = None,
) -> MembershipResult:
    """Run every attack the available outputs allow. `scores_*` = (confidence, log p_y)."""
    train_acc, test_acc = accuracy(pred_m, y_m), accuracy(pred_n, y_n)
    correct_m = (pred_m == y_m).astype(np.float64)
    correct_n = (pred_n == y_n).astype(np.float64)
    conf = loss = None
    conf_gap = None
    if scores_m is not None and scores_n is not None:
        conf = threshold_attack(scores_m[0], scores_n[0])
        loss = threshold_attack(scores_m[1], scores_n[1])
        conf_gap = float(scores_m[0].mean() - scores_n[0].mean())
    return MembershipResult(
        target=target,
        outputs=outputs,
        members=len(y_m),
        nonmembers=len(y_n),
        train_accuracy=train_acc,
        test_accuracy=test_acc,
        generalisation_gap=train_acc - test_acc,
        confidence_gap=conf_gap,
        confidence=conf,
        loss=loss,
        label_only=threshold_attack(correct_m, correct_n),
        note=note,
    )


def attack_probs(
    target: str, p_m: np.ndarray, y_m: np.ndarray, p_n: np.ndarray, y_n: np.ndarray
) -> MembershipResult:
    """Attacks on full probability vectors (a victim or a surrogate the attacker holds)."""
    return attack(
        target,
        "probs",
        p_m.argmax(axis=1),
        y_m,
        p_n.argmax(axis=1),
        y_n,
        _scores_from_probs(p_m, y_m),
        _scores_from_probs(p_n, y_n),
    )


def attack_answers(
    target: str, a_m: Answers, y_m: np.ndarray, a_n: Answers, y_n: np.ndarray, n_classes: int
) -> MembershipResult:
    """Attacks on what the API returned under its output policy."""
    y_m, y_n = y_m[: a_m.n], y_n[: a_n.n]
    if a_m.probs is not None and a_n.probs is not None:
        r = attack_probs(target, a_m.probs, y_m, a_n.probs, y_n)
        r.outputs = a_m.mode
        return r
    if a_m.topk_values is not None and a_n.topk_values is not None:
        assert a_m.topk_indices is not None and a_n.topk_indices is not None
        return attack(
            target,
            "top_k",
            a_m.labels,
            y_m,
            a_n.labels,
            y_n,
            _scores_from_topk(a_m.topk_values, a_m.topk_indices, y_m, n_classes),
            _scores_from_topk(a_n.topk_values, a_n.topk_indices, y_n, n_classes),
            note="p(true label) outside the top k is estimated from the left-over mass",
        )
    return attack(
        target,
        "label",
        a_m.labels,
        y_m,
        a_n.labels,
        y_n,
        None,
        None,
        note="label-only policy: no probabilities, so confidence and loss attacks cannot run "
        "on the API; only the label-only gap attack applies",
    )
