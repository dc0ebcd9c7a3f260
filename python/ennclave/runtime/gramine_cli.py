"""`ennclave gramine DIR` (write the worker's Gramine manifest) and `ennclave measure
DIR` (print its SGX MRENCLAVE); see runtime/gramine.py and docs/platforms.md."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .gramine import DEFAULTS, PREFIX, GramineError, measure, signing_available, write_manifest
from .worker import find_worker_binary


def cmd_gramine(args: argparse.Namespace) -> int:
    from ..console import console

    m = write_manifest(
        args.dir,
        find_worker_binary(args.binary),
        log_level=args.log_level,
        enclave_size=args.enclave_size,
        max_threads=args.max_threads,
    )
    console.print(f"Wrote {m} (with its worker binary)", markup=False, highlight=False)
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    from ..console import console

    if not signing_available():
        raise GramineError(
            "Gramine's SGX signing tools (gramine-sgx-sign, gramine-sgx-sigstruct-view) were "
            f"not found in {PREFIX}/bin or on PATH; install Gramine v1.9 at {PREFIX}."
        )
    m = measure(args.dir, args.key)
    if args.json:
        console.print(json.dumps(m), markup=False, highlight=False)
    else:
        console.print(f"MRENCLAVE {m['mr_enclave']}", markup=False, highlight=False)
        console.print(f"MRSIGNER  {m['mr_signer']}", markup=False, highlight=False)
    return 0


def add_commands(sub: Any, parents: list[argparse.ArgumentParser] | None = None) -> None:
    """Add `gramine` and `measure` to the `ennclave` command's subparsers."""
    common = {"parents": parents or []}
    g = sub.add_parser(
        "gramine", help="write the worker's Gramine manifest (with its trusted files)", **common
    )
    g.add_argument("dir", metavar="DIR", help="folder for the worker binary and its manifest")
    g.add_argument(
        "--binary", metavar="PATH", help="the worker binary (default: the installed one)"
    )
    g.add_argument(
        "--log-level", default=DEFAULTS["log_level"], help="Gramine's log level (default error)"
    )
    g.add_argument(
        "--enclave-size", default=DEFAULTS["enclave_size"], help="SGX enclave size (default 1G)"
    )
    g.add_argument(
        "--max-threads",
        type=int,
        default=DEFAULTS["max_threads"],
        help="SGX thread slots (default 32; the worker uses one per CPU plus a few)",
    )
    g.set_defaults(func=cmd_gramine)
    m = sub.add_parser(
        "measure", help="print the MRENCLAVE of a Gramine directory (SGX signing tools)", **common
    )
    m.add_argument("dir", metavar="DIR", help="a folder written by `ennclave gramine`")
    m.add_argument("--key", metavar="PEM", help="SGX signing key (default: a throw-away key)")
    m.add_argument("--json", action="store_true", help="print {mr_enclave, mr_signer} as JSON")
    m.set_defaults(func=cmd_measure)
