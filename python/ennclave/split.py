"""`ennclave split`: cut a model, lower and verify the private part, seal, write a bundle.

The bundle is written into a temporary sibling directory and renamed into place only
when everything (verification included) succeeded, so a failed split leaves nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .adapters import ModelAdapter, load_model
from .errors import BundleError, VerificationError
from .graph import CutPoint
from .lower import optimize
from .plan import resolve_cut
from .program import Program
from .verify import Verification, verify_split

BUNDLE_FORMAT = "ennclave-bundle"
BUNDLE_VERSION = 1
SEALED_FILE = "private.sealed"
DEFAULT_OUTPUT_POLICY: dict[str, Any] = {"mode": "full"}


@dataclass
class SplitResult:
    bundle: Path
    cut: CutPoint
    verification: Verification
    manifest: dict[str, Any]
    key_id: str


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def split_model(
    model: str | Path | ModelAdapter,
    cut: str | int,
    out_dir: str | Path,
    *,
    samples: np.ndarray | None = None,
    tolerance: float = 1e-4,
    n_random: int = 16,
    seed: int = 0,
    keystore: str | Path | None = None,
    output_policy: dict[str, Any] | None = None,
    overwrite: bool = False,
    keyserver: str | None = None,
    keyserver_token: str | None = None,
    keyserver_policy: dict[str, Any] | None = None,
) -> SplitResult:
    """Split `model` at `cut` (name, index or "auto") into the bundle `out_dir`.

    With `keyserver` (URL) the data key is registered on the owner's key server (owner
    token: `keyserver_token` or the saved owner config) and never written locally; the
    manifest says `key_source: "keyserver"` and names the URL."""
    from .keys.keystore import Keystore
    from .seal import new_data_key, seal_container

    adapter = model if isinstance(model, ModelAdapter) else load_model(model)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BundleError(
            f"{out} already exists and is not empty; choose a new path or overwrite it."
        )
    point = resolve_cut(adapter, cut)
    program = optimize(adapter.lower_private(point))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        public_file = None
        if point.index > 0:
            public_file = f"public{adapter.public_suffix}"
            adapter.save_public(point, tmp / public_file)
        verification = verify_split(
            adapter,
            point,
            program,
            tmp / public_file if public_file else None,
            samples=samples,
            tolerance=tolerance,
            n_random=n_random,
            seed=seed,
        )
        (tmp / "verification.json").write_text(json.dumps(asdict(verification), indent=2) + "\n")
        if not verification.passed:
            raise VerificationError(
                f"The split model differs from the original by up to "
                f"{verification.max_abs_error:.3g} (tolerance {tolerance:g}); nothing was written. "
                "This is a bug in ennclave's lowering of a private layer: please report it."
            )
        key, key_id = new_data_key(), secrets.token_hex(16)
        manifest = build_manifest(
            adapter, point, program, public_file, key_id, output_policy or DEFAULT_OUTPUT_POLICY
        )
        if keyserver:
            manifest["private"]["key_source"] = "keyserver"
            manifest["private"]["keyserver"] = {"url": keyserver.rstrip("/")}
        container = program.to_container()
        manifest["private"]["plaintext_bytes"] = len(container)
        (tmp / SEALED_FILE).write_bytes(seal_container(container, manifest, key))
        del container
        files = [public_file, SEALED_FILE] if public_file else [SEALED_FILE]
        manifest["integrity"] = {"files": {f: _digest_path(tmp / f) for f in files}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        # The key goes to the keystore last: a failed split registers nothing.
        if keyserver:
            _register_on_keyserver(
                keyserver, keyserver_token, key_id, key, manifest, keyserver_policy
            )
        else:
            Keystore(keystore).put(key_id, key)
        del key
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SplitResult(out, point, verification, manifest, key_id)


def _register_on_keyserver(
    url: str,
    token: str | None,
    key_id: str,
    key: bytes,
    manifest: dict[str, Any],
    policy: dict[str, Any] | None,
) -> None:
    from .keyserver.client import KeyServerClient
    from .keyserver.config import resolve_admin
    from .seal import canonical_manifest

    cfg = resolve_admin(url, token)
    digest = hashlib.sha256(canonical_manifest(manifest)).hexdigest()
    with KeyServerClient(cfg.url, cfg.token) as ks:
        ks.register(key_id, key, digest, policy)


def _digest_path(path: Path) -> str:
    """SHA-256 of a file, or of a directory's files in sorted order (SavedModel dirs)."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def build_manifest(
    adapter: ModelAdapter,
    point: CutPoint,
    program: Program,
    public_file: str | None,
    key_id: str,
    output_policy: dict[str, Any],
) -> dict[str, Any]:
    graph = adapter.graph
    source = adapter.path
    public = None
    if public_file:
        public = {
            "file": public_file,
            "framework": adapter.framework,
            "inputs": [t.to_json() for t in graph.inputs],
            "outputs": [point.tensor.to_json()],
        }
    return {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "created_by": f"ennclave {__version__}",
        "source": {
            "file": source.name,
            "framework": adapter.framework,
            "sha256": sha256_file(source) if source.is_file() else None,
        },
        "cut": {"index": point.index, "name": point.name, "tensor": point.tensor.name},
        "public": public,
        "private": {
            "file": SEALED_FILE,
            "program_version": 1,
            "inputs": [t.to_json() for t in program.inputs],
            "outputs": [t.to_json() for t in program.outputs],
            "cipher": "AES-256-GCM",
            "key_id": key_id,
            "key_source": "local",
        },
        "output_policy": dict(output_policy),
    }
