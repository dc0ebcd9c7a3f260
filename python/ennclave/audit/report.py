"""Presenting audit results: rich tables, JSON and a matplotlib figure."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .runner import BundleAudit, CutsAudit, PoliciesAudit, headline

AuditResult = BundleAudit | CutsAudit | PoliciesAudit


def to_json(result: AuditResult) -> dict[str, Any]:
    kind = {BundleAudit: "bundle", CutsAudit: "cuts", PoliciesAudit: "policies"}[type(result)]
    return {"kind": kind, **_plain(dataclasses.asdict(result))}


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and callable(v.item):  # numpy scalars
        return v.item()
    return v


def write_json(doc: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def print_bundle(a: BundleAudit, console: Console, title: str | None = None) -> None:
    pol = a.policy.get("mode", "full")
    console.print(
        f"[bold]{title or a.bundle}[/]  policy {a.policy}  cut {a.cut.get('index')} "
        f"({a.cut.get('name')})  enclave params {a.enclave_params:,}  victim test accuracy "
        f"{_pct(a.victim_test_accuracy)} %  answers {a.queries_answered}/{a.queries_asked}"
    )
    t = Table(title=f"Model stealing (policy {pol}); % on the test set", show_lines=False)
    for c in (
        "budget",
        "got",
        "targets",
        "acc",
        "fid",
        "BB acc",
        "BB fid",
        "acc/BB",
        "fid/BB",
        "fid leak",
        "BB-level",
    ):
        t.add_column(c, justify="right")
    for e in a.stealing:
        bb = e.blackbox
        t.add_row(
            str(e.budget),
            str(e.queries),
            e.targets,
            _pct(e.public_part.accuracy),
            _pct(e.public_part.fidelity),
            _pct(bb.accuracy if bb else None),
            _pct(bb.fidelity if bb else None),
            _ratio(e.accuracy.rel_blackbox if e.accuracy else None),
            _ratio(e.fidelity.rel_blackbox if e.fidelity else None),
            _ratio(e.fidelity.leak_fraction if e.fidelity else None),
            "—" if e.fidelity is None else ("yes" if e.fidelity.blackbox_level else "no"),
        )
    console.print(t)
    if a.membership:
        m = Table(title="Membership inference (balanced accuracy with the best threshold; AUC)")
        for c in (
            "target",
            "outputs",
            "train acc",
            "test acc",
            "gap",
            "conf AUC",
            "conf acc",
            "loss AUC",
            "loss acc",
            "label-only acc",
        ):
            m.add_column(c, justify="right")
        for r in a.membership:
            m.add_row(
                r.target,
                r.outputs,
                _pct(r.train_accuracy),
                _pct(r.test_accuracy),
                _pct(r.generalisation_gap),
                _ratio(r.confidence.auc if r.confidence else None),
                _pct(r.confidence.best_accuracy if r.confidence else None),
                _ratio(r.loss.auc if r.loss else None),
                _pct(r.loss.best_accuracy if r.loss else None),
                _pct(r.label_only.best_accuracy),
            )
        console.print(m)
        for r in a.membership:
            if r.note:
                console.print(f"  [dim]{r.target}: {r.note}[/]")
        for k, n in a.membership_normalised.items():
            console.print(
                f"  {k}: {_pct(n.value)} % = {_ratio(n.rel_blackbox)}× black-box "
                f"(TEESlice), leak fraction {_ratio(n.leak_fraction)}"
            )
    for note in a.notes:
        console.print(f"  [yellow]note:[/] {note}")


def print_result(result: AuditResult, console: Console) -> None:
    if isinstance(result, BundleAudit):
        print_bundle(result, console)
        return
    if isinstance(result, CutsAudit):
        t = Table(title=f"Leakage by cut (policy {result.policy}; strongest attack)")
        for c in ("cut", "name", "enclave params", "% params", "acc", "fid", "BB fid", "fid/BB"):
            t.add_column(c, justify="right")
        for e in result.cuts:
            h = headline(e.audit)
            t.add_row(
                str(e.cut_index),
                e.cut_name,
                f"{e.enclave_params:,}",
                f"{100 * e.enclave_fraction:.1f}",
                _pct(h.public_part.accuracy if h else None),
                _pct(h.public_part.fidelity if h else None),
                _pct(h.blackbox.fidelity if h and h.blackbox else None),
                _ratio(h.fidelity.rel_blackbox if h and h.fidelity else None),
            )
        console.print(t)
        console.print(f"Sweet spot (TEESlice criterion): {result.sweet_spot}")
        return
    for text, a in result.policies:
        print_bundle(a, console, title=f"policy {text}")


def plot(result: AuditResult, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(result, CutsAudit):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs = [e.enclave_params for e in result.cuts]
        heads = [headline(e.audit) for e in result.cuts]
        for attr, style in (("fidelity", "o-"), ("accuracy", "s--")):
            ax.plot(
                xs,
                [getattr(h.public_part, attr) if h else None for h in heads],
                style,
                label=f"public-part attacker {attr}",
            )
            bb = [getattr(h.blackbox, attr) if h and h.blackbox else None for h in heads]
            if all(v is not None for v in bb):
                ax.plot(xs, bb, style, alpha=0.4, label=f"black-box {attr}")
        for e in result.cuts:
            ax.annotate(
                e.cut_name.rsplit("/", 1)[-1], (e.enclave_params, 0.02), fontsize=7, rotation=90
            )
        ax.axhline(
            result.cuts[0].audit.victim_test_accuracy,
            color="k",
            lw=0.8,
            ls=":",
            label="victim accuracy (white-box)",
        )
        ax.set_xscale("symlog")
        ax.set_xlabel("enclave size (parameters)")
        ax.set_ylabel("on the test set")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"Leakage vs enclave size (policy {result.policy.get('mode')})")
        ax.legend(fontsize=7)
    else:
        audits = [("", result)] if isinstance(result, BundleAudit) else result.policies
        fig, axs = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, attr in zip(axs, ("accuracy", "fidelity"), strict=True):
            for text, a in audits:
                pre = f"{text}: " if text else ""
                for kind in dict.fromkeys(e.targets for e in a.stealing):
                    es = [e for e in a.stealing if e.targets == kind]
                    ax.plot(
                        [e.budget for e in es],
                        [getattr(e.public_part, attr) for e in es],
                        "o-",
                        label=f"{pre}public-part, {kind}",
                    )
                    if all(e.blackbox for e in es):
                        ax.plot(
                            [e.budget for e in es],
                            [getattr(e.blackbox, attr) for e in es],  # type: ignore[union-attr]
                            "x--",
                            alpha=0.6,
                            label=f"{pre}black-box, {kind}",
                        )
            wb = audits[0][1].victim_test_accuracy if attr == "accuracy" else 1.0
            ax.axhline(wb, color="k", lw=0.8, ls=":", label="white-box (victim)")
            ax.set_xscale("log")
            ax.set_xlabel("queries")
            ax.set_ylabel(f"surrogate {attr}")
            ax.set_ylim(0, 1.02)
            ax.legend(fontsize=6)
        fig.suptitle("Model stealing vs query budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
