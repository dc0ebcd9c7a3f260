"""`ennclave keyserver` and `ennclave keys` (the owner's key-server commands)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

from .._deps import require
from ..errors import InputError


def cmd_keyserver(args: argparse.Namespace) -> int:
    for module in ("fastapi", "uvicorn", "sqlalchemy"):
        require(module)
    from .app import ServerSettings
    from .server import serve

    settings = ServerSettings(
        rate=args.rate,
        burst=args.burst,
        max_body=args.max_body,
        nonce_ttl=args.nonce_ttl,
        max_nonces=args.max_nonces,
        max_nonces_per_peer=args.max_nonces_per_peer,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        max_connections=args.max_connections,
        max_connections_per_peer=args.max_connections_per_peer,
    )
    serve(
        args.db,
        args.host,
        args.port,
        kek_file=args.kek_file,
        settings=settings,
        log_level=args.log_level,
    )
    return 0


def _client(args: argparse.Namespace) -> Any:
    require("httpx")
    from .client import KeyServerClient
    from .config import resolve_admin

    cfg = resolve_admin(",".join(args.keyserver) if args.keyserver else None, owner_token(args))
    return KeyServerClient(cfg.url, cfg.token)


def owner_token(args: argparse.Namespace) -> str | None:
    """The owner token from --token-file (or --token, which other users can read in the
    process list); None: ENNCLAVE_OWNER_TOKEN or the saved owner config decides."""
    path = getattr(args, "token_file", None)
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as e:
            raise InputError(
                f"The token file {path} cannot be read ({e.strerror}); check the path."
            ) from None
        if not token:
            raise InputError(f"The token file {path} is empty; write the owner token into it.")
        return token
    if getattr(args, "token", None):
        from ..console import err_console

        err_console.print(
            "warning: --token is visible to other users in the process list; use "
            "--token-file FILE or ENNCLAVE_OWNER_TOKEN instead.",
            markup=False,
        )
    return getattr(args, "token", None)


def _when(ts: int | None) -> str:
    if ts is None:
        return "never"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _budget(b: dict[str, Any]) -> str:
    p = b["policy"]
    if p.get("query_budget") is None:
        text = "unlimited"
    else:
        text = f"{b.get('budget_left', p['query_budget'])} of {p['query_budget']} left"
    if p.get("client_budget") is not None:
        text += f", {p['client_budget']} per client"
    return text


def _print_bundle(b: dict[str, Any]) -> None:
    from rich.markup import escape

    from ..console import console

    p = b["policy"]
    state = (
        f"[red]revoked[/] ({escape(str(b['revoked_reason']))})"
        if b["revoked"]
        else "[green]active[/]"
    )
    console.print(
        f"[bold]{b['key_id']}[/]  {state}  clients {b['clients']}"
        f"{'/' + str(p['max_clients']) if p['max_clients'] else ''}  "
        f"expires {_when(p['expires_at'])}  software {'yes' if p['allow_software'] else 'no'}  "
        f"licence {p['licence_ttl']} s  budget {_budget(b)}  "
        f"offline {'yes' if p['offline'] else 'no'}  "
        f"requires {', '.join(p.get('require_protections') or []) or 'no protections'}",
        highlight=False,
    )


def policy_changes(args: argparse.Namespace) -> dict[str, Any]:
    ch: dict[str, Any] = {}
    if args.set:
        try:
            ch.update(json.loads(args.set))
        except ValueError:
            raise InputError("--set expects a JSON object of policy fields.") from None
    if args.allow_software is not None:
        ch["allow_software"] = args.allow_software
    if args.offline is not None:
        ch["offline"] = args.offline
    if args.expires_in is not None:
        ch["expires_at"] = int(time.time()) + int(args.expires_in)
    if args.expires_at is not None:
        ch["expires_at"] = int(args.expires_at)
    for name in ("max_clients", "licence_ttl", "query_budget", "client_budget", "budget_slice"):
        v = getattr(args, name)
        if v is not None:
            ch[name] = None if v == 0 and name != "licence_ttl" else v
    for name in ("allowed_binaries", "mrenclaves", "mrsigners"):
        v = getattr(args, name)
        if v:
            ch[name] = v
    if args.require_protections is not None:
        ch["require_protections"] = _protection_names(args.require_protections)
    ch.update(_hardware_policy(args))
    return ch


def _protection_names(text: str) -> list[str]:
    """`--require-protections a,b` (or `none`): distinct names the key server knows."""
    from .evidence import REQUIREMENTS

    names = [] if text.strip() == "none" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in REQUIREMENTS]
    if unknown or len(set(names)) != len(names) or (not names and text.strip() != "none"):
        raise InputError(
            f"--require-protections expects distinct names among {', '.join(REQUIREMENTS)} "
            f"(comma-separated), or none; got {text!r}."
        )
    return names


def _hardware_policy(args: argparse.Namespace) -> dict[str, Any]:
    """The per-kind sections (`sgx`, `tdx`, `snp`; docs/attestation.md) the flags set; the
    server merges each section field by field into the key's policy."""
    sgx: dict[str, Any] = {}
    tdx: dict[str, Any] = {}
    snp: dict[str, Any] = {}
    if getattr(args, "min_isv_svn", None) is not None:
        sgx["min_isv_svn"] = args.min_isv_svn
    if getattr(args, "tdx_mrtds", None):
        tdx["mrtds"] = [h.lower() for h in args.tdx_mrtds]
    for item in getattr(args, "tdx_rtmrs", None) or []:
        index, sep, value = item.partition("=")
        if not sep or index not in ("0", "1", "2", "3") or not value:
            raise InputError(f"--tdx-rtmr {item!r} is not N=HEX with N from 0 to 3.")
        tdx.setdefault("rtmrs", {})[index] = value.lower()
    if getattr(args, "snp_measurements", None):
        snp["measurements"] = [h.lower() for h in args.snp_measurements]
    if getattr(args, "snp_min_guest_svn", None) is not None:
        snp["min_guest_svn"] = args.snp_min_guest_svn
    if getattr(args, "accept_tcb", None):
        statuses = ["UpToDate", *[t for t in args.accept_tcb if t != "UpToDate"]]
        sgx["accepted_tcb_statuses"] = statuses
        tdx["accepted_tcb_statuses"] = statuses
    return {k: v for k, v in (("sgx", sgx), ("tdx", tdx), ("snp", snp)) if v}


def cmd_keys(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from ..console import console

    with _client(args) as ks:
        if args.keys_cmd == "list":
            rows = ks.list()
            if args.json:
                print(json.dumps(rows, indent=2))
            for b in [] if args.json else rows:
                _print_bundle(b)
            if not rows and not args.json:
                console.print("No keys registered.")
        elif args.keys_cmd == "show":
            b = ks.get(args.key_id)
            print(json.dumps(b, indent=2)) if args.json else _print_bundle(b)
        elif args.keys_cmd == "register":
            from pathlib import Path

            from ..bundle import licence_required, manifest_digest, read_manifest
            from ..keystore import Keystore

            if args.keystore and not Path(args.keystore).expanduser().exists():
                raise InputError(
                    f"The keystore {args.keystore} does not exist; pass the keystore file "
                    "`ennclave split` stored the bundle's data key in."
                )
            manifest, _ = read_manifest(Path(args.bundle))
            if not licence_required(manifest):  # its sealed manifest lets it run unlicensed
                raise InputError(
                    f"{args.bundle} is a local-key bundle, which would run without a licence "
                    "even with its key on the server; re-split the model with `ennclave split "
                    "MODEL --cut ... --keyserver URL` instead."
                )
            key_id = manifest["private"]["key_id"]
            digest = manifest_digest(manifest)
            key = Keystore(args.keystore).get(key_id)
            b = ks.register(key_id, key, digest, policy_changes(args))
            del key
            _print_bundle(b)
        elif args.keys_cmd == "policy":
            ch = policy_changes(args)
            if not ch:
                raise InputError("Nothing to change; pass at least one policy option.")
            _print_bundle(ks.set_policy(args.key_id, ch))
        elif args.keys_cmd == "revoke":
            _print_bundle(ks.revoke(args.key_id, args.reason))
        elif args.keys_cmd == "audit":
            rows = ks.audit(args.key_id, args.limit)
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                for r in rows:
                    t = dt.datetime.fromtimestamp(r["ts_ms"] / 1000, dt.UTC).strftime(
                        "%Y-%m-%d %H:%M:%S"
                    )
                    colour = "green" if r["decision"] in ("granted", "done") else "red"
                    rest = (
                        f" {r['reason']:<22} {r['key_id'] or '-'}  {r['evidence'] or ''} "
                        f"{r['peer'] or ''} {r['detail'] or ''}"
                    )
                    console.print(
                        f"{t}  {escape(r['event']):<8} [{colour}]{escape(r['decision']):<8}[/]"
                        + escape(rest),
                        highlight=False,
                    )
    return 0


def _admin_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--keyserver",
        metavar="URL",
        action="append",
        help="key server; several (replicas) comma-separated or repeated, tried in order "
        "(default: the saved owner config)",
    )
    add_token_options(p)


def add_token_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding the owner token (default: ENNCLAVE_OWNER_TOKEN, else the saved "
        "owner config for the key server's URL)",
    )
    p.add_argument(
        "--token",
        help="owner token on the command line (visible to other users: prefer --token-file)",
    )


def _policy_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-software",
        dest="allow_software",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="release to software (non-TEE) workers (default off)",
    )
    p.add_argument(
        "--offline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="licences allow an offline key cache until they expire",
    )
    p.add_argument("--expires-in", type=int, metavar="S", help="no release after now + S seconds")
    p.add_argument("--expires-at", type=int, metavar="UNIX", help="no release after this time")
    p.add_argument("--max-clients", type=int, metavar="N", help="distinct clients (0 = unlimited)")
    p.add_argument("--licence-ttl", type=int, metavar="S", help="licence lifetime in seconds")
    p.add_argument(
        "--query-budget",
        type=int,
        metavar="N",
        help="the key's total samples over all releases and workers (0 = unlimited)",
    )
    p.add_argument(
        "--client-budget",
        type=int,
        metavar="N",
        help="each client's total samples (0 = unlimited)",
    )
    p.add_argument(
        "--budget-slice",
        type=int,
        metavar="N",
        help="samples handed out per release of a metered key (default 1000; 0 = default)",
    )
    p.add_argument(
        "--allowed-binary",
        dest="allowed_binaries",
        action="append",
        metavar="SHA256",
        help="accept only this worker binary (repeatable)",
    )
    p.add_argument(
        "--mrenclave",
        dest="mrenclaves",
        action="append",
        metavar="HEX",
        help="accept only SGX enclaves with this MRENCLAVE (repeatable)",
    )
    p.add_argument(
        "--mrsigner",
        dest="mrsigners",
        action="append",
        metavar="HEX",
        help="accept only SGX enclaves signed by this MRSIGNER (repeatable)",
    )
    p.add_argument(
        "--min-isv-svn", type=int, metavar="N", help="SGX: lowest ISVSVN accepted by MRSIGNER"
    )
    p.add_argument(
        "--tdx-mrtd",
        dest="tdx_mrtds",
        action="append",
        metavar="HEX",
        help="accept only TDs with this MRTD (repeatable; none pinned: TDX refused)",
    )
    p.add_argument(
        "--tdx-rtmr",
        dest="tdx_rtmrs",
        action="append",
        metavar="N=HEX",
        help="TDX: RTMR N (0-3) must equal HEX (repeatable)",
    )
    p.add_argument(
        "--snp-measurement",
        dest="snp_measurements",
        action="append",
        metavar="HEX",
        help="accept only SEV-SNP guests with this launch MEASUREMENT (repeatable; none "
        "pinned: SEV-SNP refused)",
    )
    p.add_argument(
        "--snp-min-guest-svn", type=int, metavar="N", help="SEV-SNP: lowest GUEST_SVN accepted"
    )
    p.add_argument(
        "--accept-tcb",
        dest="accept_tcb",
        action="append",
        metavar="STATUS",
        help="SGX/TDX: a TCB level to accept besides UpToDate, e.g. SWHardeningNeeded "
        "(repeatable); debug enclaves and TDs stay refused unless --set allows them",
    )
    p.add_argument(
        "--require-protections",
        metavar="NAMES",
        help="release only to workers whose evidence reports these protections, "
        "comma-separated: memfd_secret, locked_memory, seccomp, no_tracer, "
        "environment_check, mapping_check, non_dumpable, static_binary (none: clear)",
    )
    p.add_argument("--set", metavar="JSON", help="policy fields as a JSON object")


def add_commands(sub: Any, parents: list[argparse.ArgumentParser] | None = None) -> None:
    common = {"parents": parents or []}
    sk = sub.add_parser(
        "keyserver", help="run the owner's key server (attested key release)", **common
    )
    sk.add_argument(
        "--db",
        default="keys.db",
        help="SQLite file or database URL (postgresql://…) (default keys.db)",
    )
    sk.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sk.add_argument("--port", type=int, default=8470, help="port to listen on (default 8470)")
    sk.add_argument(
        "--kek-file",
        metavar="PATH",
        help="key-encryption key for the stored data keys (default: in the config dir)",
    )
    sk.add_argument(
        "--rate", type=float, default=20.0, help="requests/s per client IP (0 = off; default 20)"
    )
    sk.add_argument("--burst", type=int, default=40, help="rate-limit burst (default 40)")
    sk.add_argument("--max-body", type=int, default=64 * 1024, help="largest request body in bytes")
    sk.add_argument(
        "--nonce-ttl", type=int, default=120, help="challenge validity in seconds (default 120)"
    )
    sk.add_argument(
        "--max-nonces", type=int, default=100_000, help="outstanding challenges (default 100000)"
    )
    sk.add_argument(
        "--max-nonces-per-peer",
        type=int,
        default=256,
        help="outstanding challenges per client IP (default 256)",
    )
    sk.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds to send a request's headers (default 10)",
    )
    sk.add_argument(
        "--body-timeout", type=float, default=10.0, help="seconds to send a body (default 10)"
    )
    sk.add_argument(
        "--max-connections", type=int, default=1000, help="open connections (default 1000)"
    )
    sk.add_argument(
        "--max-connections-per-peer",
        type=int,
        default=64,
        help="open connections per client IP (default 64)",
    )
    sk.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")
    sk.set_defaults(func=cmd_keyserver)

    kp = sub.add_parser("keys", help="manage keys on the owner's key server", **common)
    ksub = kp.add_subparsers(dest="keys_cmd", required=True, metavar="ACTION")
    key_id = {"help": "the bundle's data key id (see `ennclave keys list`)"}
    as_json = {"action": "store_true", "help": "print JSON"}
    a = ksub.add_parser("list", help="list registered keys", **common)
    a.add_argument("--json", **as_json)
    _admin_opts(a)
    a = ksub.add_parser("show", help="one key's policy and state", **common)
    a.add_argument("key_id", **key_id)
    a.add_argument("--json", **as_json)
    _admin_opts(a)
    a = ksub.add_parser(
        "register", help="register a local-keystore bundle's key on the server", **common
    )
    a.add_argument("bundle", help="bundle directory written by `ennclave split`")
    a.add_argument("--keystore", metavar="PATH", help="the keystore holding its data key")
    _admin_opts(a)
    _policy_opts(a)
    a = ksub.add_parser("policy", help="change a key's release policy", **common)
    a.add_argument("key_id", **key_id)
    _admin_opts(a)
    _policy_opts(a)
    a = ksub.add_parser("revoke", help="revoke a key: no further releases", **common)
    a.add_argument("key_id", **key_id)
    a.add_argument("--reason", default="revoked by the owner", help="recorded in the audit log")
    _admin_opts(a)
    a = ksub.add_parser("audit", help="show the audit log", **common)
    a.add_argument("key_id", nargs="?", help="only this key's entries (default: all)")
    a.add_argument("--limit", type=int, default=50, help="newest entries shown (default 50)")
    a.add_argument("--json", **as_json)
    _admin_opts(a)
    kp.set_defaults(func=cmd_keys)
