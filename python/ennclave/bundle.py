"""The bundle on disk (docs/bundle.md): the one thing that travels from owner to client.

Every reader and writer goes through here: `split` builds a manifest with
`build_manifest` and writes with `BundleWriter` (a temporary sibling directory, renamed
into place only when complete, so a failed write leaves nothing); the runtime, the
audit and `ennclave keys register` read with `read_manifest`, which checks the format,
the version and every integrity digest before anything else touches the files.

Only plain specs come in: this module never sees an adapter, so the client side never
imports a framework adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .errors import BundleError
from .seal import canonical_manifest, looks_sealed

BUNDLE_FORMAT = "ennclave-bundle"
BUNDLE_VERSION = 1
PROGRAM_VERSION = 1
CIPHER = "AES-256-GCM"
MANIFEST_FILE = "manifest.json"
SEALED_FILE = "private.sealed"
VERIFICATION_FILE = "verification.json"
DEFAULT_OUTPUT_POLICY: dict[str, Any] = {"mode": "full"}


LICENCE_REQUIRED = "required"


MEMORY_UNLOCKED_OK = "unlocked-ok"
"""`private.memory`: the owner lets the worker run in unlocked memory (issue #14)."""


def licence_required(manifest: dict[str, Any]) -> bool:
    """Whether the worker gets the data key only with a key-server licence: the
    authenticated `private.licence: "required"` or `private.key_source: "keyserver"`
    (the worker checks both). `licence` absent or "none": no licence needed. Any other
    value is refused, as the worker refuses it."""
    private = manifest.get("private") or {}
    value = private.get("licence", "none")
    if value not in ("none", LICENCE_REQUIRED):
        raise BundleError(
            f"manifest.json says private.licence is {value!r}, which this ennclave does not "
            "know; upgrade ennclave or ask the owner for a fresh bundle."
        )
    return value == LICENCE_REQUIRED or private.get("key_source") == "keyserver"


def output_policy(manifest: dict[str, Any]) -> dict[str, Any]:
    """The bundle's output policy (a copy), the default where the manifest has none."""
    return dict(manifest.get("output_policy") or DEFAULT_OUTPUT_POLICY)


# ------------------------------------------------------------------ digests


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def digest_path(path: Path) -> str:
    """SHA-256 of a file, or of a directory's files in sorted order (SavedModel dirs)."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 (hex) of the authenticated manifest: what the key server pins a key to."""
    return hashlib.sha256(canonical_manifest(manifest)).hexdigest()


# ------------------------------------------------------------------ building a manifest


@dataclass(frozen=True)
class SourceSpec:
    """The model file a bundle was split from."""

    file: str
    framework: str
    sha256: str | None

    @classmethod
    def of(cls, path: Path, framework: str) -> SourceSpec:
        return cls(path.name, framework, sha256_file(path) if path.is_file() else None)


@dataclass(frozen=True)
class PublicSpec:
    """The public part: its file in the bundle, framework, and tensor specs (JSON)."""

    file: str
    framework: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]


def build_manifest(
    *,
    source: SourceSpec,
    cut: dict[str, Any],
    public: PublicSpec | None,
    private_inputs: list[dict[str, Any]],
    model_inputs: list[dict[str, Any]] | None = None,
    private_outputs: list[dict[str, Any]],
    key_id: str,
    output_policy: dict[str, Any] | None = None,
    keyserver_url: str | None = None,
    allow_unlocked_memory: bool = False,
) -> dict[str, Any]:
    """The manifest of a new bundle, without `plaintext_bytes` and `integrity` (the
    writer adds both once the sealed file exists). `allow_unlocked_memory`: the worker
    may keep the decrypted program in plain, swappable memory where it can lock none
    (authenticated `private.memory: "unlocked-ok"`; absent, it refuses to unseal)."""
    private: dict[str, Any] = {
        "file": SEALED_FILE,
        "program_version": PROGRAM_VERSION,
        "inputs": private_inputs,
        "outputs": private_outputs,
        "cipher": CIPHER,
        "key_id": key_id,
        "key_source": "keyserver" if keyserver_url else "local",
    }
    if keyserver_url:
        private["keyserver"] = {"url": keyserver_url.rstrip("/")}
        # Authenticated: the worker refuses the key without a licence, whatever the
        # key source says (docs/key-release.md "Licences").
        private["licence"] = LICENCE_REQUIRED
    if allow_unlocked_memory:
        private["memory"] = MEMORY_UNLOCKED_OK
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "created_by": f"ennclave {__version__}",
        "source": {"file": source.file, "framework": source.framework, "sha256": source.sha256},
        "cut": dict(cut),
        "public": None
        if public is None
        else {
            "file": public.file,
            "framework": public.framework,
            "inputs": public.inputs,
            "outputs": public.outputs,
        },
        "private": private,
        "output_policy": dict(output_policy or DEFAULT_OUTPUT_POLICY),
    }
    if model_inputs is not None and len(model_inputs) > 1:
        # Several model inputs: which the client passes (`predict([...])` or a dict by
        # name); the public part takes those in public.inputs and the private part the
        # cut tensor followed by those in private.inputs[1:] (docs/bundle.md).
        manifest["inputs"] = model_inputs
    return manifest


# ------------------------------------------------------------------ writing


class BundleWriter:
    """Builds a bundle in a temporary sibling directory of `out`.

        with BundleWriter(out, overwrite=False) as w:
            adapter.save_public(cut, w.dir / "public.keras")   # stage files
            manifest = w.finish(manifest, sealed, public_file="public.keras")
            w.commit()                                          # rename into place

    Leaving the block without `commit()` (an error, a failed verification) removes
    the temporary directory: nothing half-written remains."""

    def __init__(self, out: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.out = Path(out)
        check_destination(self.out, overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(
            tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".partial", dir=self.out.parent)
        )
        self._committed = False

    def write_json(self, name: str, value: Any) -> None:
        (self.dir / name).write_text(json.dumps(value, indent=2) + "\n")

    def finish(
        self, manifest: dict[str, Any], sealed: bytes, *, public_file: str | None = None
    ) -> dict[str, Any]:
        """Write the sealed file, the integrity digests and manifest.json; returns the
        manifest as written. `manifest` must already hold `plaintext_bytes` (it is
        authenticated, so it was fixed before sealing)."""
        sealed_name = manifest["private"].get("file", SEALED_FILE)
        (self.dir / sealed_name).write_bytes(sealed)
        files = [public_file, sealed_name] if public_file else [sealed_name]
        manifest = {
            **manifest,
            "integrity": {"files": {f: digest_path(self.dir / f) for f in files}},
        }
        self.write_json(MANIFEST_FILE, manifest)
        return manifest

    def commit(self) -> Path:
        """Move the finished bundle into place (replacing `out` if overwrite was given)."""
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out, old)
            os.replace(self.dir, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.dir, self.out)
        self._committed = True
        return self.out

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            shutil.rmtree(self.dir, ignore_errors=True)


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse a destination that would lose data, before any work is done."""
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out} is a file, not a directory; choose a new path for the bundle.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BundleError(
            f"{out} already exists and is not empty; choose a new path or overwrite it."
        )


def write_bundle(
    out: str | os.PathLike[str],
    manifest: dict[str, Any],
    sealed: bytes,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a bundle that has no public part in one step; returns the manifest."""
    with BundleWriter(out, overwrite=overwrite) as w:
        written = w.finish(manifest, sealed)
        w.commit()
    return written


# ------------------------------------------------------------------ reading


def read_manifest(bundle: Path) -> tuple[dict[str, Any], bytes]:
    """Parse and sanity-check manifest.json; verify the integrity digests. Returns the
    manifest and its raw bytes (what the worker authenticates)."""
    if not bundle.is_dir():
        raise BundleError(
            f"{bundle} is not a bundle directory; pass the folder `ennclave split` wrote."
        )
    mpath = bundle / MANIFEST_FILE
    _require_regular(mpath, directory_ok=False)
    try:
        raw = mpath.read_bytes()
    except FileNotFoundError:
        raise BundleError(
            f"{bundle} has no {MANIFEST_FILE}; it is not a complete bundle."
        ) from None
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise BundleError(
            f"{mpath} is not valid JSON; the bundle is damaged, download it again."
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{mpath} is not an ennclave bundle manifest.")
    if manifest.get("version") != BUNDLE_VERSION:
        raise BundleError(
            f"{bundle} is bundle version {manifest.get('version')}, this ennclave reads version "
            f"{BUNDLE_VERSION}; upgrade ennclave."
        )
    private = manifest.get("private")
    if not isinstance(private, dict) or not isinstance(private.get("key_id"), str):
        raise BundleError(f"{mpath} has no valid `private` section; the bundle is damaged.")
    files = ((manifest.get("integrity") or {}).get("files")) or {}
    needed = [private.get("file", SEALED_FILE)]
    if manifest.get("public"):
        needed.append(manifest["public"]["file"])
    for name in needed:
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise BundleError(f"{mpath} names an invalid file {name!r}; the bundle is damaged.")
        p = bundle / name
        if not p.exists():
            raise BundleError(f"{p} is missing; the bundle is incomplete, download it again.")
        # A FIFO or device here would block the digest (and the worker) forever.
        _require_regular(p, directory_ok=name != needed[0])
        want = files.get(name)
        if want is None:
            raise BundleError(f"{mpath} has no integrity digest for {name}; the bundle is damaged.")
        if digest_path(p) != want:
            raise BundleError(
                f"{p} does not match its SHA-256 digest in {MANIFEST_FILE}; the file is damaged "
                "or was modified, download the bundle again."
            )
    _check_sealed_header(bundle / needed[0])
    return manifest, raw


def _require_regular(path: Path, *, directory_ok: bool) -> None:
    """A bundle holds regular files (and, for a SavedModel public part, a directory of
    them); anything else is refused before it is opened. A missing file passes: the
    caller names what is missing."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode) or (directory_ok and stat.S_ISDIR(mode)):
        return
    raise BundleError(
        f"{path} is not a regular file; a bundle holds only regular files, download it again."
    )


def sealed_path(bundle: Path, manifest: dict[str, Any]) -> Path:
    return bundle / manifest["private"].get("file", SEALED_FILE)


def _check_sealed_header(path: Path) -> None:
    """Catch a truncated or foreign private.sealed before a worker is spawned for it."""
    with path.open("rb") as f:
        head = f.read(16)
        size = path.stat().st_size
    if not looks_sealed(head, size):
        raise BundleError(
            f"{path} is truncated or not an ennclave sealed program; the bundle is damaged, "
            "download it again."
        )
