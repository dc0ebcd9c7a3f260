"""The enclave worker under Gramine (docs/platforms.md): its manifest and its SGX
measurement (the commands `ennclave gramine` and `ennclave measure` are in
gramine_cli.py).

A *Gramine directory* holds a copy of the worker binary (`ennclave-enclave`) and the
manifest rendered for it (`ennclave-enclave.manifest`, from the template shipped with
this package); under SGX also the signed `ennclave-enclave.manifest.sgx` and
`ennclave-enclave.sig`. The manifest's URIs are relative to the directory, so the
MRENCLAVE depends on the worker binary, this Gramine build at /opt/gramine, the host's
libgcc_s and the template's values, not on where the directory is.

Gramine's tools are looked up in /opt/gramine/bin (where the package must be
installed, see /work/shared/gramine/README.md), then on $PATH. They are Python
scripts that import `graminelibos`; its folder is added to PYTHONPATH for them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import EnnclaveError

BINARY_NAME = "ennclave-enclave"  # = worker.BINARY_NAME (worker.py imports this module)

PREFIX = Path("/opt/gramine")
TEMPLATE = Path(__file__).with_name(BINARY_NAME + ".manifest.template")
MANIFEST = BINARY_NAME + ".manifest"
ARCH_LIBDIR = "/lib/x86_64-linux-gnu"
MAX_THREADS = 32  # the manifest's default sgx.max_threads
DEFAULTS = {"log_level": "error", "enclave_size": "1G", "max_threads": MAX_THREADS}
SGX_DEVICE = Path("/dev/sgx_enclave")
# Executor threads the host asks for by default under Gramine: the manifest's default
# max_threads less the main thread and Gramine's own helpers.
WORKER_THREADS_MAX = MAX_THREADS - 4


class GramineError(EnnclaveError):
    """Gramine is missing, or one of its tools failed."""


def tool(name: str) -> Path | None:
    """A Gramine tool: /opt/gramine/bin/NAME, else NAME on $PATH."""
    p = PREFIX / "bin" / name
    if p.is_file() and os.access(p, os.X_OK):
        return p
    found = shutil.which(name)
    return Path(found) if found else None


def need_tool(name: str) -> Path:
    p = tool(name)
    if p is None:
        raise GramineError(
            f"Gramine's {name} was not found in {PREFIX}/bin or on PATH; install Gramine v1.9 "
            f"at {PREFIX} (see docs/platforms.md)."
        )
    return p


def tool_env() -> dict[str, str]:
    """The environment for Gramine's Python tools: PYTHONPATH gets graminelibos."""
    env = dict(os.environ)
    site = sorted((PREFIX / "lib").glob("python3*/site-packages"))
    extra = [str(s) for s in site]
    if env.get("PYTHONPATH"):
        extra.append(env["PYTHONPATH"])
    if extra:
        env["PYTHONPATH"] = os.pathsep.join(extra)
    env["PATH"] = os.pathsep.join([str(PREFIX / "bin"), env.get("PATH", "")])
    return env


def _run(argv: list[str], cwd: Path, what: str) -> str:
    try:
        r = subprocess.run(
            argv, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=300
        )
    except OSError as e:
        raise GramineError(f"{what} could not be started ({e.strerror}).") from None
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise GramineError(f"{what} failed: {tail[0]}")
    return r.stdout


def write_manifest(
    out_dir: str | os.PathLike[str],
    binary: str | os.PathLike[str],
    *,
    log_level: str = "error",
    enclave_size: str = "1G",
    max_threads: int = MAX_THREADS,
) -> Path:
    """Copy the worker binary into `out_dir` and render its manifest there with
    gramine-manifest (which hashes the trusted files now). Returns the manifest path."""
    gm = need_tool("gramine-manifest")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(binary)
    dst = out / BINARY_NAME
    if src.resolve() != dst.resolve():
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dst)
    # Stale signatures would describe the old binary: remove them.
    for stale in (MANIFEST + ".sgx", BINARY_NAME + ".sig"):
        (out / stale).unlink(missing_ok=True)
    shutil.copyfile(TEMPLATE, out / TEMPLATE.name)
    _run(
        [
            str(gm),
            f"-Dlog_level={log_level}",
            f"-Darch_libdir={ARCH_LIBDIR}",
            f"-Denclave_size={enclave_size}",
            f"-Dmax_threads={int(max_threads)}",
            TEMPLATE.name,
            MANIFEST,
        ],
        out,
        "gramine-manifest",
    )
    return out / MANIFEST


def manifest_dir_for(binary: Path) -> Path:
    """The cached Gramine directory for worker `binary` (one per binary content), made
    on first use: $ENNCLAVE_GRAMINE_DIR, else ~/.cache/ennclave/gramine/<sha256>."""
    digest = hashlib.sha256(binary.read_bytes()).hexdigest()[:16]
    base = os.environ.get("ENNCLAVE_GRAMINE_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "ennclave" / "gramine"
    d = root / digest
    if not (d / MANIFEST).is_file():
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=digest + ".", dir=d.parent))
        write_manifest(tmp, binary)
        try:
            os.rename(tmp, d)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return d


def signing_available() -> bool:
    return tool("gramine-sgx-sign") is not None and tool("gramine-sgx-sigstruct-view") is not None


def sign(manifest_dir: str | os.PathLike[str], key: str | os.PathLike[str] | None = None) -> Path:
    """Sign the directory's manifest (gramine-sgx-sign, date 0000-00-00 so the output is
    the same every day) with `key`, or with a throw-away key when none is given (the
    MRENCLAVE does not depend on the key; MRSIGNER does). Returns the .sig path."""
    d = Path(manifest_dir).resolve()
    if not (d / MANIFEST).is_file():
        raise GramineError(f"{d} has no {MANIFEST}; write it with `ennclave gramine {d}` first.")
    signer = need_tool("gramine-sgx-sign")
    with tempfile.TemporaryDirectory() as tmp:
        if key is None:
            key = Path(tmp) / "throwaway-key.pem"
            _run(
                [str(need_tool("gramine-sgx-gen-private-key")), str(key)],
                d,
                "gramine-sgx-gen-private-key",
            )
        _run(
            [
                str(signer),
                "--manifest",
                MANIFEST,
                "--output",
                MANIFEST + ".sgx",
                "--key",
                str(Path(key).resolve()),
                "--date",
                "0000-00-00",
            ],
            d,
            "gramine-sgx-sign",
        )
    return d / (BINARY_NAME + ".sig")


def measure(
    manifest_dir: str | os.PathLike[str], key: str | os.PathLike[str] | None = None
) -> dict[str, str]:
    """Sign the manifest (see `sign`) and return {"mr_enclave", "mr_signer"} (hex)."""
    sig = sign(manifest_dir, key)
    out = _run(
        [str(need_tool("gramine-sgx-sigstruct-view")), "--output-format", "json", str(sig)],
        sig.parent,
        "gramine-sgx-sigstruct-view",
    )
    try:
        view = json.loads(out)
        return {"mr_enclave": str(view["mr_enclave"]), "mr_signer": str(view["mr_signer"])}
    except (ValueError, KeyError, TypeError):
        raise GramineError("gramine-sgx-sigstruct-view printed no measurement.") from None
