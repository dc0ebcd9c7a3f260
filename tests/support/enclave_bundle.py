"""Hand-built bundles for runtime/security tests: a 2-layer dense head, sealed.

The program container is written by hand (program.json + safetensors), independent of
the split toolchain, so the runtime tests exercise only seal → worker → inference.
"""

from __future__ import annotations

import json
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save as st_save

from ennclave.bundle import SourceSpec, build_manifest
from ennclave.bundle import write_bundle as write_bundle_files
from ennclave.errors import WorkerNotFound
from ennclave.keystore import Keystore
from ennclave.runtime import worker as wmod
from ennclave.seal import new_data_key, seal_container


def _worker_available() -> bool:
    try:
        wmod.find_worker_binary()
        return True
    except WorkerNotFound:
        return False


# CI builds the worker first, so these tests always run there.
needs_worker = pytest.mark.skipif(
    not _worker_available(), reason="ennclave-enclave not built (cargo build-worker in enclave/)"
)

IN, HID, OUT = 8, 16, 5


def program_container(w: dict[str, np.ndarray]) -> bytes:
    program = {
        "format": "ennclave-program",
        "version": 1,
        "inputs": [{"name": "x", "shape": [None, IN], "dtype": "float32"}],
        "outputs": [{"name": "y", "shape": [None, OUT], "dtype": "float32"}],
        "nodes": [
            {
                "name": "fc1",
                "op": "dense",
                "inputs": ["x"],
                "outputs": ["h"],
                "attrs": {"activation": {"fn": "relu"}},
                "weights": {"kernel": "fc1.kernel", "bias": "fc1.bias"},
            },
            {
                "name": "fc2",
                "op": "dense",
                "inputs": ["h"],
                "outputs": ["y"],
                "attrs": {"activation": {"fn": "linear"}},
                "weights": {"kernel": "fc2.kernel", "bias": "fc2.bias"},
            },
        ],
    }
    pj = json.dumps(program).encode()
    return b"ENCPROG1" + struct.pack("<Q", len(pj)) + pj + st_save(w)


def make_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "fc1.kernel": rng.standard_normal((IN, HID)).astype(np.float32),
        "fc1.bias": rng.standard_normal(HID).astype(np.float32) * 0.1,
        "fc2.kernel": rng.standard_normal((HID, OUT)).astype(np.float32),
        "fc2.bias": rng.standard_normal(OUT).astype(np.float32) * 0.1,
    }


def reference(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = np.maximum(x.astype(np.float64) @ w["fc1.kernel"] + w["fc1.bias"], 0)
    return (h @ w["fc2.kernel"] + w["fc2.bias"]).astype(np.float32)


def manifest_for(key_id: str, policy: dict[str, Any], plaintext_bytes: int) -> dict[str, Any]:
    manifest = build_manifest(
        source=SourceSpec("handmade", "keras", None),
        cut={"index": 0, "name": "input", "tensor": "x"},
        public=None,
        private_inputs=[{"name": "x", "shape": [None, IN], "dtype": "float32"}],
        private_outputs=[{"name": "y", "shape": [None, OUT], "dtype": "float32"}],
        key_id=key_id,
        output_policy=policy,
    )
    manifest["private"]["plaintext_bytes"] = plaintext_bytes
    return manifest


@dataclass
class Bundle:
    path: Path
    keystore: Path
    key_id: str
    weights: dict[str, np.ndarray]


def write_bundle(
    dest: Path,
    keystore: Path,
    *,
    policy: dict[str, Any] | None = None,
    seed: int = 0,
    weights: dict[str, np.ndarray] | None = None,
    extra_manifest: dict[str, Any] | None = None,
    key_source: str = "local",
    licence: str | None = None,
    memory: str | None = None,
) -> Bundle:
    w = weights if weights is not None else make_weights(seed)
    container = program_container(w)
    key, key_id = new_data_key(), secrets.token_hex(8)
    manifest = manifest_for(key_id, policy or {"mode": "full"}, len(container))
    manifest.update(extra_manifest or {})
    manifest["private"]["key_source"] = key_source
    if licence is not None:
        manifest["private"]["licence"] = licence
    if memory is not None:  # "unlocked-ok": the worker may, and then must, say it is unlocked
        manifest["private"]["memory"] = memory
    sealed = seal_container(container, manifest, key)
    del container
    write_bundle_files(dest, manifest, sealed)
    Keystore(keystore).put(key_id, key)
    return Bundle(dest, keystore, key_id, w)
