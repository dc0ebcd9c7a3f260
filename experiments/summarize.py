"""Write experiments/SUMMARY.md and results/accuracy.png from the committed result files.

python experiments/summarize.py [--results experiments/results] [--out experiments/SUMMARY.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT

TASKS = [
    ("mnist", "MNIST 5k (4,000 / 1,000)", "Fashion-MNIST CNN (20k images)"),
    ("fashion", "Fashion-MNIST (5,000 / 2,000)", "MNIST-5k CNN"),
    ("rt", "Rotten Tomatoes (10,247 / 2,561)", "GloVe 6B-50d + masked avg/max pooling"),
    ("amazon", "Amazon Fine Food (4,000 / 1,000)", "GloVe 6B-50d + masked avg/max pooling"),
]
CONFIGS = [
    ("frozen_head", "(a) frozen public + private head"),
    ("finetune_all", "(b) all fine-tuned (all private)"),
    ("scratch", "(c) random init, all trained"),
]


def pm(s: dict[str, Any]) -> str:
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def accuracy_section(results: Path) -> tuple[list[str], list[dict[str, Any]]]:
    lines = [
        "### Accuracy: public frozen backbone + private head vs everything private",
        "",
        "Test accuracy in %, mean ± std over 3 seeds (same split for all). (a) is measured on "
        "the enclave worker's outputs (`ennclave.load(bundle).predict`); images (b)/(c) too "
        "(cut at the input, the whole CNN in the enclave); text (b)/(c) in Keras: those runs "
        "predate the enclave's `gather`, which now runs an Embedding on token ids. "
        "(a) bf16 / (a) int8: the same "
        "heads split with `--weights bf16` / `int8` (docs/enclave-program.md, quantised "
        "kernels), also on the worker's outputs.",
        "",
        "| task (train / test) | public part | "
        + " | ".join(c[1] for c in CONFIGS)
        + " | (a) bf16 | (a) int8 | enclave of (a) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    recs = []
    for key, name, public in TASKS:
        path = results / f"accuracy_{key}.json"
        if not path.exists():
            lines.append(f"| {name} | {public} | not run | | | | | |")
            continue
        rec = json.loads(path.read_text())
        s = rec["results"]["summary"]
        setup = rec["setup"]
        name = name.split(" (")[0] + f" ({setup['n_train']:,} / {setup['n_test']:,})"
        a = s["frozen_head"]
        size = f"{a['enclave_params']:,} params, {a['enclave_mib']:.2f} MiB (cut `{a['cut']}`)"
        lines.append(
            f"| {name} | {public} | "
            + " | ".join(pm(s[c]["accuracy"]) for c, _ in CONFIGS)
            + "".join(
                f" | {pm(a[f'accuracy_{w}']) if f'accuracy_{w}' in a else 'not run'}"
                for w in ("bf16", "int8")
            )
            + f" | {size} |"
        )
        recs.append({"task": name, "summary": s})
    return lines, recs


def accuracy_plot(recs: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 3.8))
    w = 0.27
    for j, (c, label) in enumerate(CONFIGS):
        means = [100 * r["summary"][c]["accuracy"]["mean"] for r in recs]
        stds = [100 * r["summary"][c]["accuracy"]["std"] for r in recs]
        ax.bar(np.arange(len(recs)) + (j - 1) * w, means, w, yerr=stds, capsize=3, label=label)
    ax.set_xticks(np.arange(len(recs)), [r["task"] for r in recs], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    lo = min(100 * r["summary"][c]["accuracy"]["mean"] for r in recs for c, _ in CONFIGS)
    ax.set_ylim(max(0, lo - 10), 100)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def speed_section(results: Path) -> list[str]:
    path = results / "speed.json"
    if not path.exists():
        return ["### Speed", "", "not run"]
    rec = json.loads(path.read_text())
    rows = rec["results"]["rows"]
    lines = [
        "### Split inference time per cut point",
        "",
        "Milliseconds per call (median), batch 1 and batch 64: public part in Keras, "
        "private part in the enclave worker (including transfer), transfer alone (identity "
        "program on the cut tensor), end to end `EnclavedModel.predict`, and the unsplit "
        "model in Keras, in the same run. Plot: `results/speed.png`.",
        "",
        "| model | cut (after) | layers in enclave | enclave params | batch | public | enclave "
        "| transfer | split end to end | unsplit Keras | split / unsplit | worker start |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['model']} | `{r['cut_name']}` | {r['layers_in_enclave']} | "
                f"{r['enclave_params']:,} | – | not splittable: {r['error']} |||||||"
            )
            continue
        lines.append(
            f"| {r['model']} | `{r['cut_name']}` | {r['layers_in_enclave']} | "
            f"{r['enclave_params']:,} | {r['batch']} | {r['public_ms']:.2f} | "
            f"{r['enclave_ms']:.2f} | {r['transfer_ms']:.3f} | {r['split_ms']:.2f} | "
            f"{r['unsplit_ms']:.2f} | {r['split_over_unsplit']:.2f}× | "
            f"{r['worker_start_ms']:.0f} ms |"
        )
    lines += ["", f"Machine: {rec['machine']}."]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=ROOT / "SUMMARY.md")
    args = ap.parse_args(argv)
    acc_lines, recs = accuracy_section(args.results)
    if recs:
        accuracy_plot(recs, args.results / "accuracy.png")
    commands = []
    for f in sorted(args.results.glob("*.json")):
        rec = json.loads(f.read_text())
        if "command" in rec:
            commands.append(
                f"* `{rec['command']}` → `results/{f.name}` ({rec.get('seconds', '?')} s)"
            )
    extra = (ROOT / "summary_notes.md").read_text() if (ROOT / "summary_notes.md").exists() else ""
    text = "\n".join(
        [
            "<!-- generated by `python experiments/summarize.py` from experiments/results/*.json -->",
            "## Evaluation on real data (reproducing eNNclave's claims, scaled down)",
            "",
            *acc_lines,
            "",
            "![accuracy](results/accuracy.png)",
            "",
            *speed_section(args.results),
            "",
            "![time per cut point](results/speed.png)",
            "",
            "Commands (each result file also records its command, package versions and machine):",
            "",
            *commands,
            "",
            extra,
        ]
    )
    args.out.write_text(text.rstrip() + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
