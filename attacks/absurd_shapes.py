"""Attack: hand the client a bundle with absurd declared shapes (2**62 elements, a
negative or boolean dimension, a product that overflows 64 bits) or absurdly deep
nesting, in the manifest or inside the sealed program (the bundle's author holds the
key of a local-key bundle, so the program is theirs too). Before issue #14 the host
raised a raw OverflowError or RecursionError (or tried to allocate the shape).
Claim: every such bundle is one clean BundleError sentence, within seconds: never
OverflowError, RecursionError, MemoryError, a crashed worker or a hang."""

from __future__ import annotations

import json
import struct
import sys
import tempfile
from pathlib import Path

from _common import error_within, step

from ennclave.bundle import write_bundle as write_bundle_files
from ennclave.errors import BundleError
from ennclave.keystore import Keystore
from ennclave.seal import new_data_key, seal_container
from support.enclave_bundle import IN, OUT, make_weights, manifest_for, program_container

SHAPES = {
    "2**62 elements": [None, 2**62],
    "a negative dimension": [None, -3],
    "a product over 2**64": [None, 2**32, 2**32],
    "a boolean dimension": [None, True],
    "a 200-bit dimension": [None, 2**200],
}
DEPTH = 100_000


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def load(bundle: Path, keystore: Path) -> BaseException | None:
    import ennclave

    def go() -> None:
        with ennclave.load(bundle, keystore=keystore) as m:
            import numpy as np

            m.predict(np.ones((1, IN), np.float32))

    return error_within(go, 60)


def check(what: str, bundle: Path, keystore: Path) -> None:
    err = load(bundle, keystore)
    if err is None:
        raise AssertionError(f"ATTACK SUCCEEDED: the bundle with {what} loaded and answered")
    if not isinstance(err, BundleError):
        raise AssertionError(f"ATTACK SUCCEEDED: {what} raised {type(err).__name__}: {err!r}")
    text = str(err)
    assert text and "\n" not in text and len(text) < 400, repr(text)
    step(f"{what}: BundleError: {text}")


def manifest_bundle(tmp: Path, name: str, edit) -> tuple[Path, Path]:
    """A sound bundle whose manifest.json is then rewritten by `edit` (the host checks
    the manifest before the worker authenticates it)."""
    from support.enclave_bundle import write_bundle

    b = write_bundle(tmp / name, tmp / f"{name}.json")
    mpath = b.path / "manifest.json"
    mpath.write_text(edit(mpath.read_text()))
    return b.path, b.keystore


def program_bundle(tmp: Path, name: str, program: bytes, inputs=None) -> tuple[Path, Path]:
    """A bundle sealed by its author around `program` (a hostile enclave program),
    with a consistent manifest (its private.inputs may be set to `inputs`)."""
    key, key_id = new_data_key(), f"absurd{len(name)}{abs(hash(name)) % 10**6}"
    manifest = manifest_for(key_id, {"mode": "full"}, len(program))
    manifest["private"]["key_source"] = "local"
    if inputs is not None:
        manifest["private"]["inputs"][0]["shape"] = inputs
    write_bundle_files(tmp / name, manifest, seal_container(program, manifest, key))
    Keystore(tmp / f"{name}.json").put(key_id, key)
    return tmp / name, tmp / f"{name}.json"


def with_program(edit) -> bytes:
    """The test bundle's program container with its program.json rewritten."""
    c = program_container(make_weights())
    n = struct.unpack("<Q", c[8:16])[0]
    pj = json.loads(c[16 : 16 + n])
    edit(pj)
    raw = pj if isinstance(pj, bytes) else json.dumps(pj).encode()
    return b"ENCPROG1" + struct.pack("<Q", len(raw)) + raw + c[16 + n :]


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for i, (what, shape) in enumerate(SHAPES.items()):

            def edit(text: str, shape=shape) -> str:
                m = json.loads(text)
                m["private"]["inputs"][0]["shape"] = shape
                return json.dumps(m)

            check(f"manifest input shape with {what}", *manifest_bundle(tmp, f"m{i}", edit))

        def outputs(text: str) -> str:
            m = json.loads(text)
            m["private"]["outputs"][0]["shape"] = [None, 2**62]
            return json.dumps(m)

        check("manifest output shape with 2**62 elements", *manifest_bundle(tmp, "out", outputs))
        check(
            f"a manifest nested {DEPTH} deep",
            *manifest_bundle(tmp, "deep", lambda _: "[" * DEPTH + "]" * DEPTH),
        )
        check(
            f"a manifest object nested {DEPTH} deep in a valid bundle",
            *manifest_bundle(tmp, "deep2", lambda t: t[:-1] + ',"extra":' + nested(DEPTH) + "}"),
        )

        # Inside the sealed program (checked by the worker after unsealing).
        def huge_input(pj) -> None:
            pj["inputs"][0]["shape"] = [None, 2**62]

        check(
            "a sealed program whose input has 2**62 elements",
            *program_bundle(tmp, "p1", with_program(huge_input)),
        )

        def negative_output(pj) -> None:
            pj["outputs"][0]["shape"] = [None, -OUT]

        check(
            "a sealed program with a negative output dimension",
            *program_bundle(tmp, "p2", with_program(negative_output)),
        )

        def deep_attrs(pj) -> None:
            pj["nodes"][0]["attrs"]["deep"] = json.loads(nested(500))

        check(
            "a sealed program with attributes nested 500 deep",
            *program_bundle(tmp, "p3", with_program(deep_attrs)),
        )
        deep_program = with_program(lambda pj: None)
        n = struct.unpack("<Q", deep_program[8:16])[0]
        raw = b"[" * DEPTH + b"]" * DEPTH
        deep_program = b"ENCPROG1" + struct.pack("<Q", len(raw)) + raw + deep_program[16 + n :]
        check(
            f"a sealed program.json nested {DEPTH} deep",
            *program_bundle(tmp, "p4", deep_program),
        )
        c = program_container(make_weights())
        lying = c[:8] + struct.pack("<Q", 2**62) + c[16:]
        check(
            "a sealed program whose header claims 2**62 bytes of program.json",
            *program_bundle(tmp, "p5", lying),
        )
    print("the attack failed, as it should")
    return 0


if __name__ == "__main__":
    sys.exit(main())
