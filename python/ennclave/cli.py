"""The `ennclave` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .console import console, err_console
from .errors import EnnclaveError, InputError


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
            keyserver=getattr(args, "keyserver", None),
            keyserver_token=getattr(args, "token", None),
        )
    print_verification(result.verification, console)
    c = result.cut
    if getattr(args, "keyserver", None):
        console.print(
            f"Bundle written to [bold]{result.bundle}[/] (cut {c.index} after {c.name!r}); data "
            f"key {result.key_id} registered on the key server {args.keyserver} (not stored locally)."
        )
        return 0
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


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_bundle, parse_batch_sizes, print_bench

    sizes = parse_batch_sizes(args.batch_sizes)
    rec = bench_bundle(args.bundle, sizes, args.seconds, args.keystore, err_console)
    print_bench(rec, console)
    if args.json:
        Path(args.json).write_text(json.dumps(rec, indent=2) + "\n")
        console.print(f"Results written to {args.json}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    import platform
    import shlex

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # many small fits: keep the output readable
    import tensorflow as tf

    from .audit import AuditConfig, StealConfig, audit_bundle, audit_cuts, audit_policies, load_npz
    from .audit.report import plot, print_result, to_json, write_json
    from .audit.runner import Progress as AuditProgress

    tf.get_logger().setLevel("ERROR")  # retracing warnings are expected: one model per run
    queries, test = load_npz(args.queries, "Queries"), load_npz(args.test, "Test")
    members = load_npz(args.members, "Members") if args.members else None
    nonmembers = load_npz(args.nonmembers, "Non-members") if args.nonmembers else None
    if (members is None) != (nonmembers is None):
        raise InputError("Give both --members and --nonmembers for membership inference.")
    try:
        budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        raise InputError(
            f"--budgets must be comma-separated integers, got {args.budgets!r}."
        ) from None
    steal = StealConfig(epochs=args.epochs, seed=args.seed)
    cfg = AuditConfig(budgets=budgets, steal=steal, blackbox=not args.no_blackbox)
    if args.smoke:  # seconds, not minutes: for tests and a first look
        steal.epochs, steal.min_steps, steal.max_steps, steal.hidden = 1, 10, 40, 32
        cfg.mia_samples = 64
    opts = dict(members=members, nonmembers=nonmembers, config=cfg)
    columns = [
        *Progress.get_default_columns()[:1],
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=err_console, transient=True) as bar:
        prog = AuditProgress(bar)
        if args.policies:
            if not (args.model and args.cut):
                raise InputError("--policies needs --model MODEL and --cut CUT.")
            pols = [(t, parse_output_policy(t, args.max_queries)) for t in args.policies.split(",")]
            result = audit_policies(
                args.model, args.cut, pols, queries, test, progress=prog, **opts
            )
        elif args.cuts:
            if not args.model:
                raise InputError("--cuts needs --model MODEL.")
            pol = parse_output_policy(args.output_policy, args.max_queries)
            cuts = [c.strip() for c in args.cuts.split(",") if c.strip()]
            result = audit_cuts(args.model, cuts, pol, queries, test, progress=prog, **opts)
        else:
            if not args.bundle:
                raise InputError("Give a BUNDLE, or --model with --cuts or --policies.")
            result = audit_bundle(
                args.bundle, queries, test, keystore=args.keystore, progress=prog, **opts
            )
    print_result(result, console)
    if args.json:
        import keras

        doc = to_json(result)
        doc["provenance"] = {  # so a committed result says how it was made
            "command": shlex.join(["ennclave", *sys.argv[1:]]),
            "ennclave": __version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "keras": keras.__version__,
            "tensorflow": tf.__version__,
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
            f"{platform.processor() or platform.node()}",
        }
        write_json(doc, args.json)
        console.print(f"JSON written to {args.json}")
    if args.plot:
        plot(result, args.plot)
        console.print(f"Plot written to {args.plot}")
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
    ss.add_argument("--keyserver", metavar="URL", help="register the data key on this key server")
    ss.add_argument("--token", help="key-server owner token (default: the saved owner config)")
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

    sb = sub.add_parser("bench", help="latency and throughput of a bundle on this machine")
    sb.add_argument("bundle")
    sb.add_argument("--batch-sizes", default="1,8,64", help="comma list (default 1,8,64)")
    sb.add_argument("--seconds", type=float, default=2.0, help="time per batch size (default 2)")
    sb.add_argument("--json", metavar="PATH", help="write the results as JSON")
    sb.add_argument("--keystore", metavar="PATH", help="keystore holding the data key (local mode)")
    sb.set_defaults(func=cmd_bench)

    sa = sub.add_parser("audit", help="measure model stealing and membership leakage of a bundle")
    sa.add_argument(
        "bundle", nargs="?", help="bundle to audit (or use --model with --cuts/--policies)"
    )
    sa.add_argument("--queries", required=True, metavar="NPZ", help="attacker's inputs (x, y)")
    sa.add_argument("--test", required=True, metavar="NPZ", help="test set (x, y)")
    sa.add_argument("--members", metavar="NPZ", help="samples of the private training set")
    sa.add_argument("--nonmembers", metavar="NPZ", help="held-out samples, same distribution")
    sa.add_argument("--budgets", default="50,500,5000", help="query budgets (default 50,500,5000)")
    sa.add_argument(
        "--keystore", metavar="PATH", help="owner keystore (for the white-box reference)"
    )
    sa.add_argument("--model", metavar="MODEL", help="original model, for --cuts / --policies")
    sa.add_argument("--cuts", metavar="LIST", help="audit these cuts of --model (e.g. 0,3,5)")
    sa.add_argument("--cut", help="the cut for --policies")
    sa.add_argument(
        "--policies", metavar="LIST", help="e.g. full,top_k:3,label (with --model --cut)"
    )
    sa.add_argument("--output-policy", default="full", help="policy of the --cuts bundles")
    sa.add_argument("--max-queries", type=int, help="query budget of the temporary bundles")
    sa.add_argument("--epochs", type=int, default=20, help="surrogate training epochs")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--no-blackbox", action="store_true", help="skip the black-box reference")
    sa.add_argument("--smoke", action="store_true", help="tiny training, for a quick check")
    sa.add_argument("--json", metavar="PATH", help="write the results as JSON")
    sa.add_argument("--plot", metavar="PNG", help="plot leakage vs budget / enclave size")
    sa.set_defaults(func=cmd_audit)
    from .keyserver.cli import add_commands as _add_keyserver_commands

    _add_keyserver_commands(sub)
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
