"""The `ennclave` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from . import __version__
from .errors import EnnclaveError, InputError

# Tables are wide: when piped (no terminal to measure), do not squeeze them to 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=160)
err_console = Console(stderr=True)


def _load_npy(path: str, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{what} file {path} does not exist.") from None
    except (ValueError, OSError) as e:
        raise InputError(f"{what} file {path} is not a readable .npy array ({e}).") from None


def parse_output_policy(text: str, max_queries: int | None) -> dict[str, Any]:
    """`full`, `label`, `top_k:K` or `round:D` -> the manifest's output_policy."""
    mode, _, arg = text.partition(":")
    policy: dict[str, Any]
    if mode in ("full", "label") and not arg:
        policy = {"mode": mode}
    elif mode in ("top_k", "round") and arg.isdigit():
        policy = {"mode": mode, ("k" if mode == "top_k" else "decimals"): int(arg)}
    else:
        raise InputError(f"Unknown output policy {text!r}; use full, label, top_k:K or round:D.")
    if max_queries is not None:
        policy["max_queries"] = int(max_queries)
    return policy


def cmd_plan(args: argparse.Namespace) -> int:
    from .adapters import load_model
    from .plan import make_plan
    from .report import plot_plan, print_plan

    model = load_model(args.model)
    base = load_model(args.public_base) if args.public_base else None
    plan = make_plan(model, args.budget, base)
    if args.json:
        out = plan.to_json()
        print(json.dumps(out, indent=2))
    else:
        print_plan(plan, console)
    if args.plot:
        plot_plan(plan, Path(args.plot))
        (err_console if args.json else console).print(f"Plot written to {args.plot}")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from .report import print_verification
    from .split import split_model

    samples = _load_npy(args.samples, "Samples") if args.samples else None
    policy = parse_output_policy(args.output_policy, args.max_queries)
    with console.status("Cutting, lowering and verifying…"):
        result = split_model(
            args.model,
            args.cut,
            args.output,
            samples=samples,
            tolerance=args.tolerance,
            keystore=args.keystore,
            output_policy=policy,
            overwrite=args.overwrite,
        )
    print_verification(result.verification, console)
    c = result.cut
    console.print(
        f"Bundle written to [bold]{result.bundle}[/] (cut {c.index} after {c.name!r}, tensor "
        f"{list(c.tensor.shape)}); data key {result.key_id} stored in the local keystore."
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .runtime.model import load

    x = _load_npy(args.input, "Input")
    with load(args.bundle, keystore=args.keystore) as model:
        y = model.predict(x, batch_size=args.batch_size)
    np.save(args.output, y)
    console.print(f"Wrote {y.shape} predictions to {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out) if args.out else None, console)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ennclave",
        description="Split a trained model: public layers run in their framework, private "
        "layers are sealed and run only inside an enclave.",
    )
    p.add_argument("--version", action="version", version=f"ennclave {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("plan", help="list valid cut points with their costs and recommend one")
    sp.add_argument("model", help="Keras (.keras, .h5) or ONNX (.onnx) model file")
    sp.add_argument(
        "--budget",
        type=float,
        default=64.0,
        metavar="MiB",
        help="largest enclave (weights) to recommend, in MiB (default 64)",
    )
    sp.add_argument(
        "--public-base",
        metavar="MODEL",
        help="the public pretrained model: layers whose weights differ are private",
    )
    sp.add_argument("--json", action="store_true", help="print the plan as JSON")
    sp.add_argument("--plot", metavar="PNG", help="draw params and FLOPs per cut point")
    sp.set_defaults(func=cmd_plan)

    ss = sub.add_parser("split", help="cut, verify and seal a model into a bundle")
    ss.add_argument("model")
    ss.add_argument("--cut", required=True, help="layer name or index from `plan`, or auto")
    ss.add_argument("-o", "--output", required=True, metavar="BUNDLE_DIR")
    ss.add_argument("--samples", metavar="NPY", help="extra inputs to verify on (.npy)")
    ss.add_argument("--tolerance", type=float, default=1e-4, help="max abs error (default 1e-4)")
    ss.add_argument("--keystore", metavar="PATH", help="owner keystore file for the data key")
    ss.add_argument(
        "--output-policy",
        default="full",
        help="what the enclave returns: full, label, top_k:K or round:D",
    )
    ss.add_argument("--max-queries", type=int, help="enclave refuses after this many samples")
    ss.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    ss.set_defaults(func=cmd_split)

    sr = sub.add_parser("run", help="run a bundle on inputs from a .npy file")
    sr.add_argument("bundle")
    sr.add_argument("--input", required=True, metavar="NPY")
    sr.add_argument("--output", required=True, metavar="NPY")
    sr.add_argument("--batch-size", type=int, default=32)
    sr.add_argument("--keystore", metavar="PATH", help="keystore holding the data key (local mode)")
    sr.set_defaults(func=cmd_run)

    sd = sub.add_parser("demo", help="train, plan, split, verify and run a small model")
    sd.add_argument("--out", metavar="DIR", help="keep the demo's files here")
    sd.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EnnclaveError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
