"""Orchestration: audit one bundle, a sweep of cut points, or a set of output policies."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import output_policy
from ..errors import InputError
from .membership import MembershipResult, attack_answers, attack_probs
from .metrics import Normalised, accuracy, normalise, sweet_spot
from .oracle import Answers, OwnerView, one_hot, query_api, soft_targets
from .stealing import (
    StealConfig,
    SurrogateResult,
    blackbox_model,
    fit_and_score,
    load_public_keras,
    predict_probs,
    surrogate_head,
)


@dataclass
class Dataset:
    x: np.ndarray
    y: np.ndarray


def load_npz(path: str | Path, what: str) -> Dataset:
    """An .npz with arrays `x` (inputs, batch first) and `y` (integer labels)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise InputError(f"{what} file {path} must hold arrays `x` and `y`.")
            x, y = np.asarray(f["x"], np.float32), np.asarray(f["y"])
    except FileNotFoundError:
        raise InputError(f"{what} file {path} does not exist.") from None
    except (ValueError, OSError) as e:
        raise InputError(f"{what} file {path} is not a readable .npz ({e}).") from None
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1 or len(y) != len(x) or len(x) == 0:
        raise InputError(f"{what} file {path}: `y` must be integer labels, one per row of `x`.")
    return Dataset(x, y.astype(np.int64))


@dataclass
class AuditConfig:
    budgets: list[int] = field(default_factory=lambda: [50, 500, 5000])
    steal: StealConfig = field(default_factory=StealConfig)
    blackbox: bool = True  # train the black-box reference (the costly part)
    mia_samples: int = 1000  # members and non-members each, at most
    batch_size: int = 128


@dataclass
class StealingEntry:
    budget: int
    queries: int
    targets: str
    public_part: SurrogateResult
    blackbox: SurrogateResult | None
    accuracy: Normalised | None  # white-box = victim accuracy
    fidelity: Normalised | None  # white-box = 1 (the victim agrees with itself)


@dataclass
class BundleAudit:
    bundle: str
    policy: dict[str, Any]
    cut: dict[str, Any]
    enclave_params: int
    n_classes: int
    victim_test_accuracy: float
    queries_asked: int
    queries_answered: int
    refusal: str | None
    stealing: list[StealingEntry]
    membership: list[MembershipResult]
    membership_normalised: dict[str, Normalised]
    notes: list[str]
    seconds: float


class Progress:
    """Thin wrapper so the audit runs with or without a rich progress bar."""

    def __init__(self, rich_progress: Any = None) -> None:
        self.p = rich_progress

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Any]:
        if self.p is None:
            yield lambda n=1: None
            return
        tid = self.p.add_task(description, total=total)
        try:
            yield lambda n=1: self.p.advance(tid, n)
        finally:
            self.p.update(tid, completed=total)


def _target_kind(ans: Answers) -> str:
    return "top_k" if ans.topk_values is not None else "probs"


def audit_bundle(
    bundle: str | Path,
    queries: Dataset,
    test: Dataset,
    *,
    members: Dataset | None = None,
    nonmembers: Dataset | None = None,
    keystore: Any = None,
    config: AuditConfig | None = None,
    progress: Progress | None = None,
    label: str = "",
) -> BundleAudit:
    """Steal the private part of `bundle` at each budget and run membership inference."""
    t0 = time.perf_counter()
    run = _AuditRun(
        bundle,
        keystore,
        config or AuditConfig(),
        progress or Progress(),
        f"{label}: " if label else "",
    )
    victim = _open_owner_view(run)
    budgets = _query_budgets(run, queries)
    data = _attacker_data(run, victim, queries, test, budgets[-1])
    stealing, surrogates = _model_stealing(run, victim, data, queries, test, budgets)
    membership, mia_norm = (
        _membership_inference(run, victim, surrogates, members, nonmembers)
        if members is not None and nonmembers is not None
        else ([], {})
    )
    return BundleAudit(
        bundle=str(bundle),
        policy=victim.policy,
        cut=dict(victim.manifest.get("cut") or {}),
        enclave_params=victim.owner.n_params,
        n_classes=victim.n_classes,
        victim_test_accuracy=data.victim_acc,
        queries_asked=budgets[-1],
        queries_answered=data.ans.n,
        refusal=data.ans.refusal,
        stealing=stealing,
        membership=membership,
        membership_normalised=mia_norm,
        notes=run.notes,
        seconds=round(time.perf_counter() - t0, 1),
    )


# -- the stages of audit_bundle, in the order it runs them ----------------------------


@dataclass
class _AuditRun:
    """What every stage of one `audit_bundle` call shares."""

    bundle: str | Path
    keystore: Any
    cfg: AuditConfig
    prog: Progress
    tag: str  # prefix of the progress bars' descriptions
    notes: list[str] = field(default_factory=list)


@dataclass
class _Victim:
    """The bundle as its owner sees it (decrypted private part)."""

    owner: OwnerView
    manifest: dict[str, Any]
    policy: dict[str, Any]
    n_classes: int


@dataclass
class _AttackerData:
    """What the attacker holds after querying the API, and the victim's test labels."""

    fq: np.ndarray  # public features of the queries asked
    ft: np.ndarray  # public features of the test set
    ans: Answers
    victim_labels: np.ndarray  # the victim's own predictions on the test set
    victim_acc: float


def _open_owner_view(run: _AuditRun) -> _Victim:
    owner = OwnerView(run.bundle, run.keystore)
    manifest = owner.manifest
    if len(owner.program.inputs) > 1 or "inputs" in manifest:
        # Its datasets are arrays of one model input (npz `x`, `y`), and the surrogate
        # learns from the cut tensor alone.
        raise InputError(
            f"{run.bundle} is a model of several inputs (or its enclave takes model inputs "
            "beside the cut tensor); `ennclave audit` audits single-input bundles only."
        )
    policy = output_policy(manifest)
    out_shape = manifest["private"]["outputs"][0]["shape"]
    if len(out_shape) != 2:
        raise InputError(
            f"The audit handles classifiers with (N, classes) outputs, not {out_shape}."
        )
    return _Victim(owner, manifest, policy, int(out_shape[1]))


def _query_budgets(run: _AuditRun, queries: Dataset) -> list[int]:
    """The configured budgets, capped to the query set's size, ascending, distinct."""
    budgets = sorted({min(int(b), len(queries.x)) for b in run.cfg.budgets if int(b) > 0})
    if not budgets:
        raise InputError("Give at least one positive query budget.")
    if max(run.cfg.budgets) > len(queries.x):
        run.notes.append(f"budgets above {len(queries.x)} (the query set's size) were capped to it")
    return budgets


def _attacker_data(
    run: _AuditRun, victim: _Victim, queries: Dataset, test: Dataset, n_max: int
) -> _AttackerData:
    """The attacker's queries: one API session, as a client would hold it."""
    from ..runtime.model import load

    with load(run.bundle, keystore=run.keystore) as m:
        fq = m.public_features(queries.x[:n_max])
        ft = m.public_features(test.x)
        with run.prog.task(f"{run.tag}querying the bundle", n_max) as tick:
            ans = query_api(m, queries.x[:n_max], run.cfg.batch_size, tick)
    if ans.refusal:
        run.notes.append(
            f"the bundle's query budget stopped the attacker after {ans.n} answers: {ans.refusal}"
        )
    victim_labels = victim.owner.probs(ft).argmax(axis=1)
    return _AttackerData(fq, ft, ans, victim_labels, accuracy(victim_labels, test.y))


def _model_stealing(
    run: _AuditRun,
    victim: _Victim,
    data: _AttackerData,
    queries: Dataset,
    test: Dataset,
    budgets: list[int],
) -> tuple[list[StealingEntry], dict[str, Any]]:
    """Train surrogates at each budget and target kind: on the public features (the
    public-part attacker) and, when it can, a black-box clone from the raw inputs.
    Returns the entries and the surrogates kept for membership inference."""
    cfg, ans, n_classes = run.cfg, data.ans, victim.n_classes
    public = load_public_keras(run.bundle)
    can_blackbox = cfg.blackbox and (public is not None or not victim.manifest.get("public"))
    if cfg.blackbox and not can_blackbox:
        run.notes.append("no black-box reference: the public part is not a Keras model to clone")
    soft = soft_targets(ans, n_classes, ans.n)
    kinds = ([_target_kind(ans)] if soft is not None else []) + ["label"]
    runs = len(budgets) * len(kinds) * (2 if can_blackbox else 1)

    entries: list[StealingEntry] = []
    last: dict[str, Any] = {}
    with run.prog.task(f"{run.tag}training surrogates", runs) as tick:
        for b in budgets:
            q = min(b, ans.n)
            if q == 0:
                continue
            for kind in kinds:
                t = (
                    soft[:q]
                    if kind != "label" and soft is not None
                    else one_hot(ans.labels[:q], n_classes)
                )
                head = surrogate_head(tuple(data.fq.shape[1:]), n_classes, cfg.steal.hidden)
                gray = fit_and_score(
                    head,
                    "public-part",
                    kind,
                    b,
                    data.fq[:q],
                    t,
                    data.ft,
                    test.y,
                    data.victim_labels,
                    cfg.steal,
                )
                tick()
                bb = None
                if can_blackbox:
                    bbm = blackbox_model(
                        public, tuple(queries.x.shape[1:]), n_classes, cfg.steal.hidden
                    )
                    bb = fit_and_score(
                        bbm,
                        "black-box",
                        kind,
                        b,
                        queries.x[:q],
                        t,
                        test.x,
                        test.y,
                        data.victim_labels,
                        cfg.steal,
                    )
                    tick()
                if kind == kinds[0]:  # kept for membership inference: richest targets,
                    last["public-part"] = head  # and (budgets ascend) the largest budget
                    if bb is not None:
                        last["blackbox"] = bbm
                entries.append(
                    StealingEntry(
                        budget=b,
                        queries=q,
                        targets=kind,
                        public_part=gray,
                        blackbox=bb,
                        accuracy=(
                            normalise(gray.accuracy, data.victim_acc, bb.accuracy) if bb else None
                        ),
                        fidelity=normalise(gray.fidelity, 1.0, bb.fidelity) if bb else None,
                    )
                )
    return entries, last


def _membership_inference(
    run: _AuditRun,
    victim: _Victim,
    surrogates: dict[str, Any],
    members: Dataset,
    nonmembers: Dataset,
) -> tuple[list[MembershipResult], dict[str, Normalised]]:
    """Attack the API, the victim itself (white-box) and the surrogates `_model_stealing`
    kept; normalise against the white-box and black-box attacks when both exist."""
    from ..runtime.model import load

    cfg, owner, n_classes = run.cfg, victim.owner, victim.n_classes
    membership: list[MembershipResult] = []
    k = min(len(members.x), len(nonmembers.x), cfg.mia_samples)
    xm, ym, xn, yn = members.x[:k], members.y[:k], nonmembers.x[:k], nonmembers.y[:k]
    # A fresh session: the worker counts its budget per lifetime (docs/worker-protocol.md),
    # so a new load() starts from zero — the audit relies on that, an attacker can too.
    with run.prog.task(f"{run.tag}membership inference", 2 * k) as tick:
        with load(run.bundle, keystore=run.keystore) as m:
            fm, fn = m.public_features(xm), m.public_features(xn)
            am = query_api(m, xm, cfg.batch_size, tick)
            an = query_api(m, xn, cfg.batch_size, tick)
    if am.n and an.n:
        membership.append(attack_answers("api", am, ym, an, yn, n_classes))
    else:
        run.notes.append("membership inference on the API was refused by the query budget")
    wb = attack_probs("victim (white-box)", owner.probs(fm), ym, owner.probs(fn), yn)
    membership.append(wb)
    gray_mia = (
        attack_probs(
            "surrogate (public-part attacker)",
            predict_probs(surrogates["public-part"], fm),
            ym,
            predict_probs(surrogates["public-part"], fn),
            yn,
        )
        if "public-part" in surrogates
        else None
    )
    bb_mia = (
        attack_probs(
            "surrogate (black-box attacker)",
            predict_probs(surrogates["blackbox"], xm),
            ym,
            predict_probs(surrogates["blackbox"], xn),
            yn,
        )
        if "blackbox" in surrogates
        else None
    )
    membership += [r for r in (gray_mia, bb_mia) if r is not None]
    return membership, _membership_normalised(membership, wb, bb_mia)


def _membership_normalised(
    membership: list[MembershipResult], wb: MembershipResult, bb_mia: MembershipResult | None
) -> dict[str, Normalised]:
    """The API's and the public-part surrogate's attack accuracies, normalised between the
    white-box (victim) and black-box-surrogate attacks; empty without both references."""
    mia_norm: dict[str, Normalised] = {}
    if bb_mia is not None and bb_mia.confidence and wb.confidence:
        for r in membership:
            if r.target in ("api", "surrogate (public-part attacker)") and r.confidence:
                mia_norm[f"{r.target}: confidence attack accuracy"] = normalise(
                    r.confidence.best_accuracy,
                    wb.confidence.best_accuracy,
                    bb_mia.confidence.best_accuracy,
                )
        api = next((r for r in membership if r.target == "api"), None)
        if api is not None:
            mia_norm["api: label-only attack accuracy"] = normalise(
                api.label_only.best_accuracy,
                wb.label_only.best_accuracy,
                bb_mia.label_only.best_accuracy,
            )
    return mia_norm


# -- sweeps over temporary bundles ---------------------------------------------------


@dataclass
class CutEntry:
    cut_index: int
    cut_name: str
    enclave_params: int
    public_params: int
    enclave_fraction: float  # of all parameters
    audit: BundleAudit


@dataclass
class CutsAudit:
    model: str
    policy: dict[str, Any]
    cuts: list[CutEntry]
    sweet_spot: dict[str, Any]


@dataclass
class PoliciesAudit:
    model: str
    cut: str
    policies: list[tuple[str, BundleAudit]]


def _split_and_audit(
    adapter: Any,
    cut: str | int,
    out: Path,
    keystore: Path,
    policy: dict[str, Any],
    queries: Dataset,
    test: Dataset,
    label: str,
    **audit_kw: Any,
) -> BundleAudit:
    """Split `adapter` at `cut` under `policy` into the bundle `out`, then audit it."""
    from ..split import split_model

    split_model(
        adapter,
        cut,
        out,
        samples=test.x[:32],
        keystore=keystore,
        output_policy=policy,
        overwrite=True,
    )
    return audit_bundle(out, queries, test, keystore=keystore, label=label, **audit_kw)


def headline(a: BundleAudit) -> StealingEntry | None:
    """The strongest attack of an audit: largest budget, richest targets."""
    if not a.stealing:
        return None
    top = max(e.budget for e in a.stealing)
    return next(e for e in a.stealing if e.budget == top)


def audit_cuts(
    model: str | Path,
    cuts: list[str],
    policy: dict[str, Any],
    queries: Dataset,
    test: Dataset,
    *,
    members: Dataset | None = None,
    nonmembers: Dataset | None = None,
    config: AuditConfig | None = None,
    progress: Progress | None = None,
    workdir: str | Path | None = None,
) -> CutsAudit:
    """Split `model` at each cut (same policy) into temporary bundles and audit each."""
    from ..adapters import load_model
    from ..plan import make_plan, resolve_cut

    audit_kw = dict(members=members, nonmembers=nonmembers, config=config, progress=progress)
    adapter = load_model(model)
    plan = make_plan(adapter)
    by_index = {c.index: c for c in plan.cut_points}
    entries: list[CutEntry] = []
    with tempfile.TemporaryDirectory(prefix="ennclave-audit-", dir=workdir) as tmp:
        ks = Path(tmp) / "keystore.json"
        for spec in cuts:
            point = resolve_cut(adapter, spec)
            rep = by_index[point.index]
            a = _split_and_audit(
                adapter,
                point.index,
                Path(tmp) / f"cut{point.index}",
                ks,
                policy,
                queries,
                test,
                f"cut {point.index} ({point.name})",
                **audit_kw,
            )
            total = rep.enclave_params + rep.public_params
            entries.append(
                CutEntry(
                    cut_index=point.index,
                    cut_name=point.name,
                    enclave_params=rep.enclave_params,
                    public_params=rep.public_params,
                    enclave_fraction=rep.enclave_params / total if total else 1.0,
                    audit=a,
                )
            )
    return CutsAudit(str(model), policy, entries, _sweet_spot(entries))


def _sweet_spot(entries: list[CutEntry]) -> dict[str, Any]:
    """TEESlice's C*: smallest enclave whose stealing fidelity (strongest attack) is below
    1.05 × the black-box fidelity measured at the largest enclave in the sweep."""
    heads = [headline(e.audit) for e in entries]
    if not entries or any(h is None or h.blackbox is None for h in heads):
        return {"index": None, "reason": "needs a black-box reference at every cut"}
    largest = max(range(len(entries)), key=lambda i: entries[i].enclave_params)
    bb = heads[largest].blackbox.fidelity  # type: ignore[union-attr]
    vals = [h.public_part.fidelity for h in heads]  # type: ignore[union-attr]
    i = sweet_spot([e.enclave_params for e in entries], vals, bb)
    return {
        "metric": "fidelity",
        "blackbox_reference": bb,
        "criterion": "fidelity < 1.05 × black-box fidelity (TEESlice)",
        "cut_index": None if i is None else entries[i].cut_index,
        "cut_name": None if i is None else entries[i].cut_name,
        "enclave_params": None if i is None else entries[i].enclave_params,
    }


def audit_policies(
    model: str | Path,
    cut: str,
    policies: list[tuple[str, dict[str, Any]]],
    queries: Dataset,
    test: Dataset,
    *,
    members: Dataset | None = None,
    nonmembers: Dataset | None = None,
    config: AuditConfig | None = None,
    progress: Progress | None = None,
    workdir: str | Path | None = None,
) -> PoliciesAudit:
    """Split `model` at `cut` once per output policy and audit each bundle."""
    from ..adapters import load_model

    audit_kw = dict(members=members, nonmembers=nonmembers, config=config, progress=progress)
    adapter = load_model(model)
    out: list[tuple[str, BundleAudit]] = []
    with tempfile.TemporaryDirectory(prefix="ennclave-audit-", dir=workdir) as tmp:
        ks = Path(tmp) / "keystore.json"
        for i, (text, pol) in enumerate(policies):
            a = _split_and_audit(
                adapter,
                cut,
                Path(tmp) / f"policy{i}",
                ks,
                pol,
                queries,
                test,
                f"policy {text}",
                **audit_kw,
            )
            out.append((text, a))
    return PoliciesAudit(str(model), cut, out)
