"""The package's shape: imports follow the data flow, and the host's copy of the worker
protocol agrees with the worker's own definition (enclave/src/protocol.rs)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from ennclave.runtime import worker as w

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "python" / "ennclave"

# Layers in data-flow order. A module may import only from its own layer or an earlier
# one, so nothing upstream reaches into what consumes it: the vocabulary (errors, the
# graph view, the enclave program) comes first; then the owner's stages in the order
# data moves through them (model file -> adapter -> plan -> passes/verify -> seal ->
# bundle); then the client's (bundle -> seal -> runtime -> worker); then what drives
# both (split, audit, the key-server service) and last the faces (CLI, demo, reports).
LAYERS: list[list[str]] = [
    ["errors", "_deps", "console"],
    ["graph", "program"],
    ["reference"],
    ["passes"],
    ["adapters"],
    ["plan"],
    ["runtime.public"],
    ["verify"],
    ["seal", "attest"],
    ["keystore"],
    ["bundle"],
    ["keyserver.licence", "keyserver.config", "keyserver.cache", "keyserver.client"],
    ["runtime.worker", "runtime.gramine"],  # gramine: the worker under Gramine
    ["runtime"],  # model, keras_layer, __init__
    ["split"],
    ["audit"],
    ["keyserver"],  # the service: app, routes, store, evidence, server, openapi
    ["report", "bench", "demo"],
    ["cli", "keyserver.cli", "attest.cli", "runtime.gramine_cli", "__main__", "__init__"],
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> int:
    """The layer of the longest listed prefix of `module`."""
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best_len:
                best, best_len = i, len(name)
    assert best is not None, f"module {module} is in no layer of tests/test_structure.py"
    return best


def _imports(path: Path) -> set[str]:
    """Every ennclave module `path` imports, at module level or inside functions."""
    module = _module_name(path)
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    package = parts[:-1]  # the package that relative imports start from
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.split(".")[0] == "ennclave":
                target = node.module.removeprefix("ennclave").lstrip(".")
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                # `from . import x` names a module when x is one, else a symbol of target.
                found.add(sub if _exists(sub) else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ennclave":
                    found.add(alias.name.removeprefix("ennclave").lstrip("."))
    found.discard("")
    return {m for m in found if m != module}


def _exists(module: str) -> bool:
    p = PACKAGE.joinpath(*module.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_imports_follow_the_data_flow() -> None:
    backwards = [
        f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
        for m, targets in _graph().items()
        for t in sorted(targets)
        if _layer(t) > _layer(m)
    ]
    assert not backwards, "imports against the data flow:\n" + "\n".join(backwards)


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycle = [*stack[stack.index(t) :], t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t in graph and t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_client_side_never_imports_the_owner_tools() -> None:
    """What a client installs to run a bundle must not pull in framework adapters,
    planning or splitting."""
    graph = _graph()
    client = [m for m in graph if m.startswith("runtime") or m in ("bundle", "seal")]
    owner_only = ("adapters", "plan", "passes", "split", "verify", "audit")
    for m in client:
        bad = sorted(t for t in graph[m] if t.split(".")[0] in owner_only)
        assert not bad, f"{m} imports owner-side modules {bad}"


# ------------------------------------------------------------------ protocol constants


def _rust_constants() -> dict[str, dict[str, int]]:
    """`pub const NAME: T = VALUE;` of protocol.rs, by module (`""` for the top level)."""
    text = (REPO / "enclave" / "src" / "protocol.rs").read_text()
    consts: dict[str, dict[str, int]] = {}
    mod, depth = "", 0
    for line in text.splitlines():
        s = line.strip()
        m = re.match(r"pub mod (\w+) \{", s)
        if m and depth == 0:
            mod, depth = m.group(1), 1
            continue
        if mod and s.startswith("}") and line.startswith("}"):
            mod, depth = "", 0
            continue
        m = re.match(r"pub const (\w+): \w+ = ([0-9a-fA-Fx_ <]+);", s)
        if m and (line.startswith("pub const") or mod):
            value = m.group(2).replace("_", "")
            if "<<" in value:
                a, b = value.split("<<")
                number = int(a, 0) << int(b, 0)
            else:
                number = int(value, 0)
            consts.setdefault(mod if not line.startswith("pub const") else "", {})[m.group(1)] = (
                number
            )
    return consts


# Rust name -> the host's name, per protocol.rs module.
HOST_NAMES = {
    "": {n: n for n in ("PROTOCOL_VERSION", "MAX_FRAME", "INFER_ALLOW_NONFINITE")},
    "ty": {
        n: n
        for n in (
            "HELLO CHALLENGE EVIDENCE MANIFEST SEALED_BEGIN SEALED_CHUNK CHUNK_OK KEY READY "
            "LICENCE KEY_CACHE CACHED_KEY INFER RESULT PING PONG USAGE SHUTDOWN BYE ERROR"
        ).split()
    },
    "code": {
        "BAD_REQUEST": "E_BAD_REQUEST",
        "BAD_INPUT_SIZE": "E_BAD_INPUT_SIZE",
        "NONFINITE_INPUT": "E_NONFINITE",
        "BUDGET_EXHAUSTED": "E_BUDGET",
        "AUTHENTICATION": "E_AUTH",
        "KEY": "E_KEY",
        "PROGRAM": "E_PROGRAM",
        "PROTOCOL": "E_PROTOCOL",
        "INTERNAL": "E_INTERNAL",
        "MANIFEST": "E_MANIFEST",
        "SANDBOX": "E_SANDBOX",
        "LICENCE_EXPIRED": "E_LICENCE_EXPIRED",
        "LICENCE_INVALID": "E_LICENCE_INVALID",
    },
    "doorbell": {
        "REQ_SEQ": "DB_REQ_SEQ",
        "REQ_BATCH": "DB_REQ_BATCH",
        "REQ_PROGRESS": "DB_REQ_PROGRESS",
        "ANS_SEQ": "DB_ANS_SEQ",
        "ANS_STATUS": "DB_ANS_STATUS",
        "ANS_PROGRESS": "DB_ANS_PROGRESS",
        "EVENTS": "DB_EVENTS",
        "WORKER_SLEEPS": "DB_WORKER_SLEEPS",
        "STATUS_OK": "DB_STATUS_OK",
    },
}


def test_protocol_constants_agree_with_the_worker() -> None:
    rust = _rust_constants()
    for mod, names in HOST_NAMES.items():
        assert mod in rust, f"protocol.rs has no `{mod or 'top-level'}` constants"
        for rust_name, host_name in names.items():
            assert rust_name in rust[mod], f"protocol.rs lost {mod}::{rust_name}"
            assert getattr(w, host_name) == rust[mod][rust_name], (
                f"runtime/worker.py {host_name} = {getattr(w, host_name)} but protocol.rs "
                f"{mod}::{rust_name} = {rust[mod][rust_name]}"
            )
    # Every message type and error code the worker defines is known to the host.
    for mod in ("ty", "code"):
        missing = set(rust[mod]) - set(HOST_NAMES[mod])
        assert not missing, f"protocol.rs {mod} has {sorted(missing)} that the host lacks"
    # The packed layouts sit at the worker's offsets: flags after batch; the answer's
    # batch, output length and queries-left words after its status.
    db = rust["doorbell"]
    assert db["REQ_FLAGS"] == db["REQ_BATCH"] + w._DB_REQ.size // 2
    assert w._DB_ANS.format == "<IIIQ"
    assert (db["ANS_BATCH"], db["ANS_OUT_LEN"], db["ANS_LEFT"]) == (
        db["ANS_STATUS"] + 4,
        db["ANS_STATUS"] + 8,
        db["ANS_STATUS"] + 12,
    )
