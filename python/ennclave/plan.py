"""Where can a model be cut, what does each cut cost, and which cut do we recommend."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .adapters import ModelAdapter
from .errors import EnnclaveError
from .graph import CutPoint, Node, find_cut_points

MiB = 1024 * 1024
DEFAULT_BUDGET_MIB = 64.0
# Below this many parameters a private head is cheap to re-learn from queries
# (TEESlice, S&P 2024: a shielded final FC layer was stolen with ~50 label queries).
SMALL_ENCLAVE_PARAMS = 100_000


@dataclass
class CutReport:
    index: int
    name: str
    op_type: str
    tensor_shape: list[int | None]
    enclave_params: int
    enclave_bytes: int
    public_params: int
    public_bytes: int
    enclave_flops: int
    private_layers_inside: bool
    enclave_layers: int
    # Whether `split` can lower this cut's private side, and if not the first reason.
    splittable: bool = True
    blocked_by: str | None = None
    # The enclave's weight bytes with `split --weights bf16` / `int8`: an estimate that
    # counts every parameter of dense and conv layers (`QUANTISED_TYPES`) at 2 / 1
    # bytes and the rest at 4 (`split` reports the exact bytes: panel padding, int8
    # scales and float32 biases make them a little more).
    enclave_bytes_bf16: int = 0
    enclave_bytes_int8: int = 0
    # Model inputs the private side also takes beside the cut tensor (a padding mask).
    extra_inputs: list[str] = field(default_factory=list)


# Layer / operator types whose kernels `--weights bf16|int8` stores quantised.
QUANTISED_TYPES = frozenset("Dense EinsumDense Conv1D Conv2D Gemm MatMul Conv".split())


def _bytes_as(nodes: list[Node], per_kernel_param: int) -> int:
    q = sum(n.params for n in nodes if n.op_type in QUANTISED_TYPES)
    return per_kernel_param * q + 4 * (_params(nodes) - q)


@dataclass
class Plan:
    model: str
    framework: str
    budget_bytes: int
    cut_points: list[CutReport]
    recommended: int | None
    reason: str
    private_layers: list[str]
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "framework": self.framework,
            "budget_bytes": self.budget_bytes,
            "cut_points": [asdict(c) for c in self.cut_points],
            "recommended": self.recommended,
            "reason": self.reason,
            "private_layers": self.private_layers,
            "warnings": self.warnings,
        }


def _base_lookup(base: ModelAdapter) -> dict[str, list[np.ndarray]]:
    """Base model weights by full node name and by last path component."""
    weights = base.node_weights()
    lookup = dict(weights)
    short: dict[str, list[str]] = {}
    for name in weights:
        short.setdefault(name.rsplit("/", 1)[-1], []).append(name)
    for s, names in short.items():
        if len(names) == 1 and s not in lookup:
            lookup[s] = weights[names[0]]
    return lookup


def changed_from_base(model: ModelAdapter, base: ModelAdapter) -> list[str]:
    """Nodes whose weights are absent from, or differ from, the public base model."""
    lookup = _base_lookup(base)
    changed = []
    for name, ws in model.node_weights().items():
        ref = lookup.get(name) or lookup.get(name.rsplit("/", 1)[-1])
        same = (
            ref is not None
            and len(ref) == len(ws)
            and all(
                a.shape == b.shape and np.array_equal(a, b) for a, b in zip(ws, ref, strict=True)
            )
        )
        if not same:
            changed.append(name)
    return changed


def private_nodes(model: ModelAdapter, base: ModelAdapter | None) -> tuple[list[str], list[str]]:
    """The nodes whose weights must stay inside, and warnings about how we know."""
    if base is not None:
        return changed_from_base(model, base), []
    nodes = model.graph.nodes
    if model.framework == "keras":
        return [n.name for n in nodes if n.trainable], []
    weighted = [n.name for n in nodes if n.params > 0]
    return weighted, [
        "ONNX models record no trainable flags, so every layer with weights is treated as "
        "private; pass --public-base with the public pretrained model to find the layers "
        "you actually changed."
    ]


def lowering_blocker(model: ModelAdapter, cut: CutPoint) -> str | None:
    """Why `split` cannot lower the private side of `cut` (the first reason, one
    sentence), or None when it can: `plan` offers only what `split` can do."""
    try:
        model.lower_private(cut)
    except EnnclaveError as e:
        return str(e)
    return None


def _params(nodes: list[Node]) -> int:
    return sum(n.params for n in nodes)


def make_plan(
    model: ModelAdapter,
    budget_mib: float = DEFAULT_BUDGET_MIB,
    public_base: ModelAdapter | None = None,
) -> Plan:
    graph = model.graph
    cuts = find_cut_points(graph)
    private, warnings = private_nodes(model, public_base)
    private_set = set(private)
    position_of = {n.name: i for i, n in enumerate(graph.nodes)}
    first_private = min((position_of[p] for p in private_set), default=len(graph.nodes))
    reports = []
    for c in cuts:
        inside, outside = graph.nodes[c.position :], graph.nodes[: c.position]
        enclave_params = _params(inside)
        blocked_by = lowering_blocker(model, c)
        reports.append(
            CutReport(
                index=c.index,
                name=c.name,
                op_type=c.op_type,
                tensor_shape=list(c.tensor.shape),
                enclave_params=enclave_params,
                enclave_bytes=4 * enclave_params,
                public_params=_params(outside),
                public_bytes=4 * _params(outside),
                enclave_flops=sum(n.flops for n in inside),
                private_layers_inside=c.position <= first_private,
                enclave_layers=sum(1 for n in inside if n.params > 0),
                splittable=blocked_by is None,
                blocked_by=blocked_by,
                enclave_bytes_bf16=_bytes_as(inside, 2),
                enclave_bytes_int8=_bytes_as(inside, 1),
                extra_inputs=[t.name for t in c.extra_inputs],
            )
        )
    budget = int(budget_mib * MiB)
    recommended, reason = _recommend(reports, budget)
    if recommended is not None:
        r = reports[recommended]
        if r.enclave_params < SMALL_ENCLAVE_PARAMS or r.enclave_layers <= 1:
            warnings.append(
                f"The recommended enclave holds only {r.enclave_params:,} parameters in "
                f"{r.enclave_layers} layer(s): an attacker with the public layers can re-learn "
                "a head this small from a few hundred queries (TEESlice, S&P 2024). Use an "
                "output policy (label or top-k) and a query budget, or cut earlier."
            )
    if not private_set:
        warnings.append(
            "No layer is marked private (all frozen, or identical to the public base): the "
            "recommendation keeps only the last layer with weights inside."
        )
    return Plan(
        model=str(model.path),
        framework=model.framework,
        budget_bytes=budget,
        cut_points=reports,
        recommended=recommended,
        reason=reason,
        private_layers=private,
        warnings=warnings,
    )


def _recommend(reports: list[CutReport], budget: int) -> tuple[int | None, str]:
    """The smallest enclave that holds every private layer and fits the budget."""
    holding = [r for r in reports if r.private_layers_inside and r.enclave_layers > 0]
    if not holding:
        return None, (
            "No single-tensor cut puts every private layer inside the enclave (a private "
            "layer sits before the first valid cut, e.g. in a multi-input stem)."
        )
    if not any(r.splittable for r in holding):
        first = max(holding, key=lambda r: r.index)
        return None, (
            f"No cut that holds every private layer can be split: at cut {first.index} "
            f"({first.name!r}) {first.blocked_by}"
        )
    holding = [r for r in holding if r.splittable]
    best = max(holding, key=lambda r: r.index)
    if best.enclave_bytes > budget:
        return None, (
            f"The smallest enclave holding every private layer (cut {best.index}, "
            f"{best.name!r}) needs {best.enclave_bytes / MiB:.1f} MiB of weights, over the "
            f"{budget / MiB:.0f} MiB budget; raise --budget or make fewer layers private."
        )
    return best.index, (
        f"Cut {best.index} after {best.name!r} is the smallest enclave that holds every "
        f"private layer ({best.enclave_bytes / MiB:.2f} MiB of weights, within the "
        f"{budget / MiB:.0f} MiB budget)."
    )


def resolve_cut(model: ModelAdapter, spec: str | int, plan: Plan | None = None) -> CutPoint:
    """Turn `--cut NAME|INDEX|auto` into a cut point, or explain why not."""
    from .errors import CutError

    graph = model.graph
    cuts = find_cut_points(graph)
    text = str(spec).strip()
    if text == "auto":
        plan = plan or make_plan(model)
        if plan.recommended is None:
            raise CutError(f"No cut can be recommended: {plan.reason}")
        return cuts[plan.recommended]
    if text.lstrip("-").isdigit():
        i = int(text)
        if not 0 <= i < len(cuts):
            raise CutError(
                f"Cut index {i} does not exist; valid indices are 0 to {len(cuts) - 1} "
                "(see `ennclave plan`)."
            )
        return cuts[i]
    by_name = {c.name: c for c in cuts}
    short = {c.name.rsplit("/", 1)[-1]: c for c in cuts}
    if text in by_name:
        return by_name[text]
    if text in short and "/" not in text:
        return short[text]
    names = [n.name for n in graph.nodes]
    matches = [n for n in names if n == text or n.rsplit("/", 1)[-1] == text]
    if not matches:
        raise CutError(
            f"No layer named {text!r} in the model; valid cuts are: "
            f"{', '.join(repr(c.name) for c in cuts[:12])}{' …' if len(cuts) > 12 else ''}."
        )
    pos = names.index(matches[0])
    before = [c for c in cuts if c.position <= pos]
    if set(graph.nodes[pos].outputs) & {t.name for t in graph.outputs}:
        last = f"{before[-1].name!r} (index {before[-1].index})" if before else "none"
        raise CutError(
            f"Cannot cut after {matches[0]!r}: it computes the model's output, so nothing would "
            f"be left for the enclave; the last valid cut is {last} (see `ennclave plan`)."
        )
    after = [c for c in cuts if c.position > pos + 1]
    nearest = []
    if before:
        nearest.append(f"{before[-1].name!r} (index {before[-1].index}) before it")
    if after:
        nearest.append(f"{after[0].name!r} (index {after[0].index}) after it")
    raise CutError(
        f"Cannot cut after {matches[0]!r}: its output is not the only tensor flowing onward "
        "(a skip connection or parallel branch crosses there too), so the enclave would need "
        f"several inputs. Nearest valid cuts: {' and '.join(nearest) or 'none'}."
    )
