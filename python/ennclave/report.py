"""Human-facing output: rich tables for the terminal and a matplotlib plot of a plan."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .plan import MiB, Plan
from .verify import Verification


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _shape(shape: list[int | None]) -> str:
    return "×".join("N" if d is None else str(d) for d in shape)


def _short(reason: str, width: int = 60) -> str:
    """The first clause of a blocking reason, for a table cell (--json has it whole)."""
    first = reason.split(";")[0].strip()
    return first if len(first) <= width else first[: width - 1] + "…"


def print_plan(plan: Plan, console: Console) -> None:
    total = max((c.enclave_params + c.public_params for c in plan.cut_points), default=0)
    table = Table(title=escape(f"Cut points of {Path(plan.model).name} ({plan.framework})"))
    for col, justify in (
        ("#", "right"),
        ("after layer", "left"),
        ("type", "left"),
        ("tensor into enclave", "left"),
        ("enclave params", "right"),
        ("enclave MiB fp32 / bf16 / int8", "right"),
        ("public params", "right"),
        ("share inside", "right"),
        ("enclave FLOPs/sample", "right"),
        ("private inside", "center"),
        ("splittable", "left"),
    ):
        # Names wrap rather than end in "…": exporters' node names
        # (/encoder/layer.3/output/LayerNorm/Add_1) differ only at the block number.
        fold = col == "after layer"
        table.add_column(col, justify=justify, overflow="fold" if fold else "ellipsis")  # type: ignore[arg-type]
    for c in plan.cut_points:
        mark = "★ " if c.index == plan.recommended else ""
        style = "bold green" if c.index == plan.recommended else None
        table.add_row(
            f"{mark}{c.index}",
            escape(c.name),  # layer names are the user's text, not markup
            escape(c.op_type),
            _shape(c.tensor_shape)
            + "".join(f" + {escape(n)}" for n in c.extra_inputs),  # model inputs passed along
            f"{c.enclave_params:,}",
            f"{c.enclave_bytes / MiB:.2f} / {c.enclave_bytes_bf16 / MiB:.2f} / "
            f"{c.enclave_bytes_int8 / MiB:.2f}",
            f"{c.public_params:,}",
            f"{100 * c.enclave_params / total:.1f}%" if total else "-",
            _si(c.enclave_flops),
            "yes" if c.private_layers_inside else "no",
            "yes" if c.splittable else Text(f"no: {_short(c.blocked_by or '')}"),
            style=style,
        )
    console.print(table)
    rec = (
        "[bold green]Recommended:[/]"
        if plan.recommended is not None
        else "[bold red]No recommendation:[/]"
    )
    console.print(f"{rec} {escape(plan.reason)}")
    if plan.private_layers:
        shown = ", ".join(plan.private_layers[:8]) + (" …" if len(plan.private_layers) > 8 else "")
        console.print(f"Private layers ({len(plan.private_layers)}): {escape(shown)}")
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}")


def print_verification(v: Verification, console: Console) -> None:
    table = Table(title="Verification: original vs public part → enclave program")
    for col in ("samples", "max abs error", "max rel error", "allowed", "result"):
        table.add_column(col)
    table.add_row(
        str(v.samples),
        f"{v.max_abs_error:.3g}",
        f"{v.max_rel_error:.3g}",
        f"{v.allowed:.3g} (atol {v.tolerance:g} + rtol {v.rtol:g} × scale)",
        "[green]passed[/]" if v.passed else "[red]FAILED[/]",
    )
    console.print(table)
    console.print(Text(f"Probe inputs: {v.probe}."))
    mib = 1024 * 1024
    if v.weights != "fp32" and v.quantised_max_abs_error is not None:
        console.print(
            Text(
                f"Weights stored as {v.weights}: {v.weight_bytes / mib:.2f} MiB in the enclave "
                f"(fp32: {v.weight_bytes_fp32 / mib:.2f} MiB); the shipped split differs from "
                f"the original by up to {v.quantised_max_abs_error:.3g} "
                f"(relative {v.quantised_max_rel_error:.3g})."
            )
        )
    if v.accuracy_fp32 is not None and v.accuracy_shipped is not None:
        console.print(
            Text(
                f"Accuracy on the {v.accuracy_samples} labelled samples: original "
                f"{100 * v.accuracy_fp32:.2f}%, shipped split ({v.weights}) "
                f"{100 * v.accuracy_shipped:.2f}% "
                f"({100 * (v.accuracy_shipped - v.accuracy_fp32):+.2f} points)."
            )
        )
    for w in v.warnings:
        console.print(Text.assemble(("warning: ", "yellow"), w))


def plot_plan(plan: Plan, path: Path) -> None:
    from ._deps import require

    require("matplotlib").use("Agg")
    plt = require("matplotlib.pyplot")
    idx = [c.index for c in plan.cut_points]
    fig, ax1 = plt.subplots(figsize=(max(6, 0.45 * len(idx) + 3), 4.5))
    ax1.bar(
        idx, [c.enclave_params for c in plan.cut_points], color="#4c72b0", label="enclave params"
    )
    ax1.set_xlabel("cut point (index; 0 = everything private)")
    ax1.set_ylabel("parameters inside the enclave")
    ax1.set_yscale("symlog")
    ax2 = ax1.twinx()
    ax2.plot(
        idx,
        [c.enclave_flops for c in plan.cut_points],
        "o-",
        color="#dd8452",
        label="enclave FLOPs / sample",
    )
    ax2.set_ylabel("enclave FLOPs per sample")
    ax2.set_yscale("symlog")
    if plan.recommended is not None:
        ax1.axvline(plan.recommended, color="green", linestyle="--", label="recommended")
    ax1.set_xticks(idx)
    ax1.set_xticklabels(
        [f"{c.index}\n{c.name.rsplit('/', 1)[-1][:12]}" for c in plan.cut_points],
        fontsize=7,
        rotation=60,
    )
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
    ax1.set_title(f"Cut points of {Path(plan.model).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
