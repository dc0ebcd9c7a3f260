"""The `ennclave` command line.

Every foreseeable failure ends the same way: one sentence saying what happened and what
to do, printed as plain text (never read as rich markup), exit status 2. Checks that
cost nothing (paths, existing outputs, option values) run before any framework is
imported, so a typo is reported in a fraction of a second, not after TensorFlow loads.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape
from rich.text import Text

from . import __version__, _deps
from .console import console, err_console
from .errors import EnnclaveError, InputError

# ---------------------------------------------------------------- cheap checks


def _load_npy(path: str, what: str) -> Any:
    """An .npy array, or an .npz archive as a dict of arrays by name (the inputs of a
    model of several inputs, e.g. token_ids, segment_ids, padding_mask)."""
    _need_file(path, what)
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                return {k: data[k] for k in data.files}
        return data
    except (ValueError, OSError) as e:
        raise InputError(
            f"{what} file {path} is not a readable .npy array or .npz archive ({e})."
        ) from None


def _need_file(path: str, what: str) -> None:
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{what} {path} is a directory; pass a file.")
    if not p.exists():
        raise InputError(f"{what} {path} does not exist; check the path.")
    if not os.access(p, os.R_OK):
        raise InputError(f"{what} {path} is not readable; check its permissions.")


def _need_keystore(path: str | None) -> None:
    """A keystore that must already hold the data key (run, bench, audit, register)."""
    if path is not None and not Path(path).expanduser().exists():
        raise InputError(
            f"The keystore {path} does not exist; pass the keystore file `ennclave split` "
            f"stored the data key in (default {_default_keystore()})."
        )


def _need_bundle(path: str) -> dict[str, Any]:
    from .bundle import read_manifest

    manifest, _ = read_manifest(Path(path))
    return manifest


def _writable_parent(path: Path, what: str) -> None:
    """The nearest existing ancestor of `path` must be a writable directory."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{what} {path} cannot be created: {parent} is a file, not a directory.")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{what} {path} cannot be created: {parent} is not writable.")


def _new_file(path: str, what: str) -> None:
    """An output file: its directory must exist (found before the work, not after)."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{what} {path} is a directory; give a file name.")
    if not p.absolute().parent.is_dir():
        raise InputError(
            f"{what} {path} cannot be written: the directory {p.parent} does not exist; "
            "create it first."
        )
    _writable_parent(p, what)


def _check_bundle_destination(path: str, overwrite: bool) -> None:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(
            f"{path} is a file, not a directory; choose a new path for the bundle"
            + (" (--overwrite replaces only a bundle directory)." if overwrite else ".")
        )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(
            f"{path} already exists and is not empty; choose a new path, or pass --overwrite "
            "to replace it."
        )
    _writable_parent(out, "The bundle")


def _default_keystore() -> str:
    from .keystore import default_keystore_path

    home = str(Path.home())
    path = str(default_keystore_path())
    return "~" + path[len(home) :] if path.startswith(home + os.sep) else path


def _needs_module(module: str) -> None:
    """Fail now, not after minutes of work, if `module` is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise _deps.MissingDependency(_deps.missing_message(module) or f"{module} is missing.")


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise InputError(f"{option} must be comma-separated positive integers, got {text!r}.")
    return values


def parse_output_policy(text: str, max_queries: int | None) -> dict[str, Any]:
    """`full`, `label`, `top_k:K` or `round:D` -> the manifest's output_policy."""
    mode, _, arg = text.partition(":")
    policy: dict[str, Any]
    if mode in ("full", "label") and not arg:
        policy = {"mode": mode}
    elif mode == "top_k" and arg.isdigit() and int(arg) >= 1:
        policy = {"mode": mode, "k": int(arg)}
    elif mode == "round" and arg.isdigit() and int(arg) <= 8:
        policy = {"mode": mode, "decimals": int(arg)}
    else:
        raise InputError(
            f"Unknown output policy {text!r}; use full, label, top_k:K (K ≥ 1) or round:D "
            "(D from 0 to 8)."
        )
    if max_queries is not None:
        policy["max_queries"] = int(max_queries)
    return policy


def _check_top_k(policy: dict[str, Any], adapter: Any) -> None:
    """top_k:K needs K ≤ the model's outputs per sample, or the worker refuses the bundle."""
    if policy["mode"] != "top_k":
        return
    n = sum(t.elements_per_sample for t in adapter.graph.outputs)
    if policy["k"] > n:
        raise InputError(
            f"--output-policy top_k:{policy['k']} asks for more scores than the model's {n} "
            f"outputs per sample; use a K from 1 to {n}."
        )


def _input_shape_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=1x3x320x320",
        help="fix the dynamic dimensions of a model input, ONNX or Keras (repeatable; "
        "the first dimension is the batch and stays free)",
    )


def _output_option(parser: argparse.ArgumentParser, *aliases: str) -> None:
    # `split -o/--output` is the bundle directory, hence --model-output.
    parser.add_argument(
        "--model-output",
        *aliases,
        dest="model_output",
        metavar="NAME",
        help="the model output the split model ends in (required for a model of several "
        "outputs, e.g. last_hidden_state); the graph is pruned to what it needs",
    )


def _input_shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]] | None:
    from .adapters import parse_input_shape

    shapes = dict(parse_input_shape(text) for text in args.input_shape)
    return shapes or None


# ---------------------------------------------------------------- commands


def cmd_plan(args: argparse.Namespace) -> int:
    _need_file(args.model, "The model")
    if args.public_base:
        _need_file(args.public_base, "The public base model")
    if args.plot:
        _new_file(args.plot, "The plot")
        _needs_module("matplotlib")

    from .adapters import load_model
    from .plan import make_plan
    from .report import plot_plan, print_plan

    model = load_model(args.model, _input_shapes(args), args.model_output)
    base = (
        load_model(args.public_base, _input_shapes(args), args.model_output)
        if args.public_base
        else None
    )
    plan = make_plan(model, args.budget, base)
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        print_plan(plan, console)
    if args.plot:
        plot_plan(plan, Path(args.plot))
        (err_console if args.json else console).print(f"Plot written to {args.plot}", markup=False)
    return 0


MAX_QUERIES_LOCAL = (
    "--max-queries is counted per worker start: with a local key the client's host holds "
    "the data key and can start as many workers as it likes, so a local-key bundle cannot "
    "be metered against its own host. For a total budget, register the key on a key "
    "server (--keyserver URL) and set `ennclave keys policy KEY --query-budget N`."
)
MAX_QUERIES_KEYSERVER = (
    "--max-queries is counted per worker start; the key's total over all workers is the "
    "key server's query budget: `ennclave keys policy KEY --query-budget N`."
)


def _warn_max_queries(keyserver: bool) -> None:
    """`split --max-queries`: say what it does not bound (docs/threat-model.md)."""
    msg = MAX_QUERIES_KEYSERVER if keyserver else MAX_QUERIES_LOCAL
    err_console.print(Text.assemble(("warning: ", "bold yellow"), msg), soft_wrap=True)


def cmd_split(args: argparse.Namespace) -> int:
    _need_file(args.model, "The model")
    _check_bundle_destination(args.output, args.overwrite)
    samples = _load_npy(args.samples, "The samples") if args.samples else None
    labels = _load_npy(args.labels, "The labels") if args.labels else None
    if labels is not None and samples is None:
        raise InputError("--labels needs --samples: the labels are those samples' classes.")
    policy = parse_output_policy(args.output_policy, args.max_queries)
    if args.keyserver:
        _needs_module("httpx")
    if args.max_queries is not None:
        _warn_max_queries(bool(args.keyserver))

    from .adapters import load_model
    from .keyserver.cli import owner_token
    from .report import print_verification
    from .split import split_model

    shapes = _input_shapes(args)  # a malformed --input-shape fails before the framework loads
    with console.status("Loading the model…"):
        adapter = load_model(args.model, shapes, args.model_output)
    _check_top_k(policy, adapter)
    with console.status("Cutting, lowering and verifying the split…") as status:
        result = split_model(
            adapter,
            args.cut,
            args.output,
            samples=samples,
            labels=labels,
            weights=args.weights,
            tolerance=args.tolerance,
            rtol=args.rtol,
            keystore=args.keystore,
            output_policy=policy,
            overwrite=args.overwrite,
            keyserver=args.keyserver,
            keyserver_token=owner_token(args),
            allow_unlocked_memory=args.allow_unlocked_memory,
            progress=lambda text: status.update(escape(text)),
        )
    print_verification(result.verification, console)
    c = result.cut
    where = f"[bold]{escape(str(result.bundle))}[/] (cut {c.index} after {escape(repr(c.name))}"
    if args.keyserver:
        console.print(
            f"Bundle written to {where}); data key {result.key_id} registered on the key server "
            f"{escape(args.keyserver)} (not stored locally)."
        )
        return 0
    keystore = args.keystore or _default_keystore()
    console.print(
        f"Bundle written to {where}, tensor {escape(str(list(c.tensor.shape)))}); data key {result.key_id} "
        f"stored in the keystore {escape(str(keystore))}."
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    _need_bundle(args.bundle)
    _need_keystore(args.keystore)
    out = Path(args.output)
    if out.suffix != ".npy":  # np.save would add it anyway: say so
        out = out.with_name(out.name + ".npy")
    _new_file(str(out), "The output file")
    x = _load_npy(args.input, "The input")

    from .runtime.model import load

    with load(args.bundle, keystore=args.keystore, platform=args.platform) as model:
        y = model.predict(x, batch_size=args.batch_size, allow_nonfinite=args.allow_nonfinite)
    if isinstance(y, tuple):  # top_k: scores and class indices, best first
        out = out.with_suffix(".npz")
        np.savez(out, values=y.values, indices=y.indices)
        what = f"top-{y.values.shape[1]} scores and class indices (values, indices)"
    else:
        np.save(out, y)
        what = f"{y.shape} predictions"
    console.print(f"Wrote {what} to {out}", markup=False, highlight=False)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.out:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise InputError(f"{args.out} is a file; give --out a directory.")
        _writable_parent(out / "demo.keras", "The demo directory")
    _needs_module("keras")

    from .demo import run_demo

    run_demo(Path(args.out) if args.out else None, console)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    manifest = _need_bundle(args.bundle)
    _need_keystore(args.keystore)
    sizes = _int_list(args.batch_sizes, "--batch-sizes")
    if args.json:
        _new_file(args.json, "The JSON file")
    framework = (manifest.get("public") or {}).get("framework")
    if framework in ("keras", "onnx"):
        _needs_module("keras" if framework == "keras" else "onnxruntime")

    from .bench import bench_bundle, print_bench

    rec = bench_bundle(args.bundle, sizes, args.seconds, args.keystore, err_console)
    print_bench(rec, console)
    if args.json:
        Path(args.json).write_text(json.dumps(rec, indent=2) + "\n")
        console.print(f"Results written to {args.json}", markup=False)
    return 0


def _load_queries(path: str) -> Any:
    """The attacker's inputs: `x` is enough (an attacker has no labels); `y` is ignored."""
    from .audit import Dataset

    _need_file(path, "The queries file")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f:
                raise InputError(f"Queries file {path} must hold an array `x` (the inputs).")
            x = np.asarray(f["x"], np.float32)
    except (ValueError, OSError) as e:
        raise InputError(f"Queries file {path} is not a readable .npz ({e}).") from None
    if x.ndim == 0 or len(x) == 0:
        raise InputError(f"Queries file {path}: `x` must hold at least one input, batch first.")
    return Dataset(x, np.zeros(len(x), np.int64))  # labels are never read


def cmd_audit(args: argparse.Namespace) -> int:
    import platform

    # Everything cheap first: TensorFlow takes seconds to import.
    if args.policies:
        if not (args.model and args.cut):
            raise InputError("--policies needs --model MODEL and --cut CUT.")
        pols = [(t, parse_output_policy(t, args.max_queries)) for t in args.policies.split(",")]
    elif args.cuts:
        if not args.model:
            raise InputError("--cuts needs --model MODEL.")
        pol = parse_output_policy(args.output_policy, args.max_queries)
        cuts = [c.strip() for c in args.cuts.split(",") if c.strip()]
    elif not args.bundle:
        raise InputError("Give a BUNDLE, or --model with --cuts or --policies.")
    if args.bundle:
        _need_bundle(args.bundle)
    if args.model:
        _need_file(args.model, "The model")
    _need_keystore(args.keystore if args.bundle else None)
    for name in ("test", "members", "nonmembers"):
        if getattr(args, name):
            _need_file(getattr(args, name), f"The --{name} file")
    if (args.members is None) != (args.nonmembers is None):
        raise InputError("Give both --members and --nonmembers for membership inference.")
    budgets = _int_list(args.budgets, "--budgets")
    if args.json:
        _new_file(args.json, "The JSON file")
    if args.plot:
        _new_file(args.plot, "The plot")
        _needs_module("matplotlib")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from .audit import AuditConfig, StealConfig, audit_bundle, audit_cuts, audit_policies, load_npz
    from .audit.report import plot, print_result, to_json, write_json
    from .audit.runner import Progress as AuditProgress

    queries, test = _load_queries(args.queries), load_npz(args.test, "Test")
    members = load_npz(args.members, "Members") if args.members else None
    nonmembers = load_npz(args.nonmembers, "Non-members") if args.nonmembers else None

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # many small fits: keep the output readable
    tf = _deps.require("tensorflow")
    keras = _deps.require("keras")
    tf.get_logger().setLevel("ERROR")  # retracing warnings are expected: one model per run

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
            result = audit_policies(
                args.model, args.cut, pols, queries, test, progress=prog, **opts
            )
        elif args.cuts:
            result = audit_cuts(args.model, cuts, pol, queries, test, progress=prog, **opts)
        else:
            result = audit_bundle(
                args.bundle, queries, test, keystore=args.keystore, progress=prog, **opts
            )
    print_result(result, console)
    if args.json:
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
        console.print(f"JSON written to {args.json}", markup=False)
    if args.plot:
        plot(result, args.plot)
        console.print(f"Plot written to {args.plot}", markup=False)
    return 0


# ---------------------------------------------------------------- arguments


def _number(kind: type, minimum: float, what: str) -> Any:
    """An argparse type: a number of `kind` that is at least `minimum`."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value != value or value < minimum:  # value != value: NaN
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


non_negative = _number(float, 0, "a number ≥ 0")
positive = _number(float, 1e-9, "a number > 0")
positive_int = _number(int, 1, "an integer ≥ 1")


def common_options() -> argparse.ArgumentParser:
    """-v and --debug, accepted after every (sub)command as well as before it."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the frameworks' start-up logs (TensorFlow, absl)",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of an error",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    default_ks = _default_keystore()
    ks_help = f"keystore file holding the bundle's data key (default {default_ks})"
    p = argparse.ArgumentParser(
        prog="ennclave",
        description="Split a trained model: public layers run in their framework, private "
        "layers are sealed and run only inside an enclave.",
    )
    p.add_argument("--version", action="version", version=f"ennclave {__version__}")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="show the frameworks' start-up logs"
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [common_options()]

    sp = sub.add_parser(
        "plan", parents=common, help="list valid cut points with their costs and recommend one"
    )
    sp.add_argument("model", help="Keras (.keras, .h5) or ONNX (.onnx) model file")
    sp.add_argument(
        "--budget",
        type=non_negative,
        default=64.0,
        metavar="MiB",
        help="largest enclave (weights) to recommend, in MiB (default 64)",
    )
    sp.add_argument(
        "--public-base",
        metavar="MODEL",
        help="the public pretrained model: layers whose weights differ are private",
    )
    _input_shape_option(sp)
    _output_option(sp, "--output")
    sp.add_argument("--json", action="store_true", help="print the plan as JSON")
    sp.add_argument("--plot", metavar="PNG", help="draw params and FLOPs per cut point")
    sp.set_defaults(func=cmd_plan)

    ss = sub.add_parser("split", parents=common, help="cut, verify and seal a model into a bundle")
    ss.add_argument("model", help="Keras (.keras, .h5) or ONNX (.onnx) model file to split")
    ss.add_argument(
        "--cut",
        required=True,
        help="where to cut: a layer name or index from `ennclave plan`, or auto (the recommended cut)",
    )
    ss.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="BUNDLE_DIR",
        help="directory to write the bundle to (new or empty, unless --overwrite)",
    )
    _input_shape_option(ss)
    _output_option(ss)
    ss.add_argument(
        "--samples",
        metavar="NPY",
        help="inputs to verify the split on, in addition to random ones (.npy; a model of "
        "several inputs: .npz, one array per input name)",
    )
    ss.add_argument(
        "--labels",
        metavar="NPY",
        help="the samples' classes (indices or one-hot): report the accuracy of the original "
        "and of the shipped split (useful with --weights)",
    )
    ss.add_argument(
        "--weights",
        choices=["fp32", "bf16", "int8"],
        default="fp32",
        help="how dense and conv kernels are stored in the enclave: fp32 (default), bf16 "
        "(half the bytes) or int8 (per-channel scales, about a quarter); the error and "
        "accuracy change are reported",
    )
    ss.add_argument(
        "--tolerance",
        type=non_negative,
        default=1e-4,
        metavar="ATOL",
        help="absolute difference from the original model allowed (default 1e-4)",
    )
    ss.add_argument(
        "--rtol",
        type=non_negative,
        default=1e-4,
        help="plus this times the output's largest magnitude (default 1e-4)",
    )
    ss.add_argument(
        "--keystore",
        metavar="PATH",
        help=f"keystore file to store the data key in, created if missing (default {default_ks})",
    )
    ss.add_argument(
        "--output-policy",
        default="full",
        metavar="POLICY",
        help="what the enclave returns: full, label, top_k:K or round:D (default full)",
    )
    ss.add_argument(
        "--max-queries",
        type=positive_int,
        metavar="N",
        help="the enclave refuses after answering this many samples (default: no limit)",
    )
    ss.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    ss.add_argument(
        "--allow-unlocked-memory",
        action="store_true",
        help="let the enclave worker keep the decrypted program in swappable memory where "
        "it can lock none (default: it refuses to unseal)",
    )
    ss.add_argument(
        "--keyserver",
        metavar="URL",
        help="register the data key on this key server instead of the local keystore",
    )
    from .keyserver.cli import add_token_options

    add_token_options(ss)
    ss.set_defaults(func=cmd_split)

    sr = sub.add_parser("run", parents=common, help="run a bundle on inputs from a .npy file")
    sr.add_argument("bundle", help="bundle directory written by `ennclave split`")
    sr.add_argument(
        "--input",
        required=True,
        metavar="NPY",
        help="inputs, batch first (.npy file; a model of several inputs: .npz, one array per "
        "input name)",
    )
    sr.add_argument(
        "--output",
        required=True,
        metavar="NPY",
        help="where to write the predictions (.npy is added if missing; a top_k bundle's "
        "scores and class indices go to an .npz of that name instead)",
    )
    sr.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="samples per call into the enclave (default 32)",
    )
    sr.add_argument(
        "--keystore", metavar="PATH", help=ks_help + "; not used when the bundle names a key server"
    )
    sr.add_argument(
        "--platform",
        choices=("native", "gramine-direct", "gramine-sgx"),
        default="native",
        help="where the worker runs (default native; see docs/platforms.md)",
    )
    sr.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="pass NaN and infinity through instead of refusing them",
    )
    sr.set_defaults(func=cmd_run)

    sd = sub.add_parser(
        "demo", parents=common, help="train, plan, split, verify and run a small model"
    )
    sd.add_argument(
        "--out",
        metavar="DIR",
        help="write the demo's files (model, bundle, keystore, sample inputs) here "
        "(default: a new temporary directory)",
    )
    sd.set_defaults(func=cmd_demo)

    sb = sub.add_parser(
        "bench", parents=common, help="latency and throughput of a bundle on this machine"
    )
    sb.add_argument("bundle", help="bundle directory written by `ennclave split`")
    sb.add_argument(
        "--batch-sizes",
        default="1,8,64",
        metavar="LIST",
        help="comma-separated batch sizes (default 1,8,64)",
    )
    sb.add_argument(
        "--seconds",
        type=positive,
        default=2.0,
        help="time spent on each batch size (default 2)",
    )
    sb.add_argument("--json", metavar="PATH", help="write the results as JSON")
    sb.add_argument("--keystore", metavar="PATH", help=ks_help)
    sb.set_defaults(func=cmd_bench)

    sa = sub.add_parser(
        "audit", parents=common, help="measure model stealing and membership leakage of a bundle"
    )
    sa.add_argument(
        "bundle", nargs="?", help="bundle to audit (or use --model with --cuts/--policies)"
    )
    sa.add_argument(
        "--queries",
        required=True,
        metavar="NPZ",
        help="the attacker's inputs: an .npz with `x` (labels are not needed)",
    )
    sa.add_argument(
        "--test", required=True, metavar="NPZ", help="test set: an .npz with `x` and labels `y`"
    )
    sa.add_argument(
        "--members", metavar="NPZ", help="samples of the private training set (`x`, `y`)"
    )
    sa.add_argument(
        "--nonmembers", metavar="NPZ", help="held-out samples of the same distribution (`x`, `y`)"
    )
    sa.add_argument(
        "--budgets",
        default="50,500,5000",
        metavar="LIST",
        help="query budgets of the stealing attack (default 50,500,5000)",
    )
    sa.add_argument(
        "--keystore", metavar="PATH", help=ks_help + "; the owner's, for the white-box reference"
    )
    sa.add_argument("--model", metavar="MODEL", help="original model, for --cuts / --policies")
    sa.add_argument("--cuts", metavar="LIST", help="audit these cuts of --model (e.g. 0,3,5)")
    sa.add_argument("--cut", help="the cut for --policies (name, index or auto)")
    sa.add_argument(
        "--policies", metavar="LIST", help="e.g. full,top_k:3,label (with --model --cut)"
    )
    sa.add_argument(
        "--output-policy",
        default="full",
        metavar="POLICY",
        help="output policy of the --cuts bundles (default full)",
    )
    sa.add_argument(
        "--max-queries",
        type=positive_int,
        metavar="N",
        help="query budget of the temporary bundles",
    )
    sa.add_argument(
        "--epochs", type=positive_int, default=20, help="surrogate training epochs (default 20)"
    )
    sa.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sa.add_argument("--no-blackbox", action="store_true", help="skip the black-box reference")
    sa.add_argument("--smoke", action="store_true", help="tiny training, for a quick check")
    sa.add_argument("--json", metavar="PATH", help="write the results as JSON")
    sa.add_argument("--plot", metavar="PNG", help="plot leakage vs budget / enclave size")
    sa.set_defaults(func=cmd_audit)
    from .keyserver.cli import add_commands as _add_keyserver_commands

    _add_keyserver_commands(sub, common)
    from .attest.cli import add_commands as _add_attest_commands

    _add_attest_commands(sub, common)
    from .runtime.gramine_cli import add_commands as _add_gramine_commands

    _add_gramine_commands(sub, common)
    return p


# ---------------------------------------------------------------- errors


def error_sentence(e: BaseException) -> str | None:
    """The one sentence for a foreseeable failure; None for an unexpected one (a bug)."""
    if isinstance(e, EnnclaveError):
        return str(e)
    if isinstance(e, ImportError):
        return _deps.missing_message(e.name or "")
    if isinstance(e, OSError) and e.filename is not None:
        name = e.filename
        if isinstance(e, FileNotFoundError):
            return f"{name} does not exist; check the path."
        if isinstance(e, PermissionError):
            return f"Permission denied for {name}; check its permissions or choose another path."
        if isinstance(e, IsADirectoryError):
            return f"{name} is a directory; give a file path."
        if isinstance(e, NotADirectoryError):
            return f"Part of the path {name} is a file, not a directory; choose another path."
        return f"{name}: {e.strerror or e}; check the path and the disk."
    return None


def _say(message: str) -> None:
    err_console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)


def _quiet_frameworks(verbose: bool) -> None:
    """TensorFlow and absl print start-up lines on every command; keep them for -v."""
    if verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # what TensorFlow logs after start-up
    _deps.QUIET_FRAMEWORKS = True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_frameworks(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        return 130
    except Exception as e:
        sentence = error_sentence(e)
        if args.debug:
            traceback.print_exc()
        if sentence is not None:
            _say(sentence)
            return 2
        hint = "" if args.debug else "; rerun with --debug for the traceback"
        _say(f"unexpected {type(e).__name__}: {e}{hint}, and please report it.")
        return 1


if __name__ == "__main__":
    sys.exit(main())
