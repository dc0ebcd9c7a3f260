"""`ennclave split`: cut a model, lower and verify the private part, seal, write a bundle.

The bundle is written into a temporary sibling directory and renamed into place only
when everything (verification included) succeeded, so a failed split leaves nothing.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .adapters import ModelAdapter, load_model
from .bundle import (
    VERIFICATION_FILE,
    BundleWriter,
    PublicSpec,
    SourceSpec,
    build_manifest,
    check_destination,
    manifest_digest,
)
from .errors import InputError, VerificationError
from .graph import CutPoint, input_ancestors
from .passes import optimize
from .plan import resolve_cut
from .program import WEIGHT_DTYPES
from .verify import Verification, verify_split


@dataclass
class SplitResult:
    bundle: Path
    cut: CutPoint
    verification: Verification
    manifest: dict[str, Any]
    key_id: str


def split_model(
    model: str | Path | ModelAdapter,
    cut: str | int,
    out_dir: str | Path,
    *,
    samples: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    weights: str = "fp32",
    tolerance: float = 1e-4,
    rtol: float = 1e-4,
    n_random: int = 16,
    seed: int = 0,
    keystore: str | Path | None = None,
    output_policy: dict[str, Any] | None = None,
    overwrite: bool = False,
    keyserver: str | None = None,
    keyserver_token: str | None = None,
    keyserver_policy: dict[str, Any] | None = None,
    allow_unlocked_memory: bool = False,
    progress: Callable[[str], None] | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    output: str | None = None,
) -> SplitResult:
    """Split `model` at `cut` (name, index or "auto") into the bundle `out_dir`.

    With `keyserver` (URL) the data key is registered on the owner's key server (owner
    token: `keyserver_token` or the saved owner config) and never written locally; the
    manifest says `key_source: "keyserver"` and names the URL. `progress` is told each
    step as it starts (the CLI shows it). A model file is opened with `input_shapes`
    and `output` as `ennclave.adapters.load_model` does (`output`: the model output the
    split ends in, required when it has several).

    `weights` (`fp32`, `bf16`, `int8`) is how dense and conv kernels are stored in the
    sealed program (docs/enclave-program.md); the float32 program is verified against
    the model as always, and the verification also reports the shipped program's error
    and, with `labels` for the `samples`, both accuracies."""
    from .keystore import Keystore
    from .seal import HEADER_BYTES, new_data_key, seal_container

    if weights not in WEIGHT_DTYPES:
        raise InputError(f"Unknown weight type {weights!r}; use one of {', '.join(WEIGHT_DTYPES)}.")
    out = Path(out_dir)
    check_destination(out, overwrite)  # before the model is loaded: that can take seconds
    adapter = model if isinstance(model, ModelAdapter) else load_model(model, input_shapes, output)
    step = progress or (lambda _text: None)
    point = resolve_cut(adapter, cut)
    step(f"Lowering the private part (cut {point.index}, after {point.name!r})…")
    program = optimize(adapter.lower_private(point))
    shipped = program.quantised(weights)

    with BundleWriter(out, overwrite=overwrite) as writer:
        public = None
        if point.index > 0:
            public = PublicSpec(
                f"public{adapter.public_suffix}",
                adapter.framework,
                [t.to_json() for t in input_ancestors(adapter.graph, {point.tensor.name})],
                [point.tensor.to_json()],
            )
            step("Saving the public part…")
            adapter.save_public(point, writer.dir / public.file)
        step("Verifying the split against the original model…")
        verification = verify_split(
            adapter,
            point,
            program,
            writer.dir / public.file if public else None,
            samples=samples,
            tolerance=tolerance,
            rtol=rtol,
            n_random=n_random,
            seed=seed,
            quantised=shipped if shipped is not program else None,
            labels=labels,
        )
        if program.num_params == 0:
            verification.warnings.append(
                f"the enclave of cut {point.index} ({point.name!r}) holds no weights, only "
                f"{', '.join(sorted({n.op for n in program.nodes})) or 'nothing'}: it protects "
                "nothing; cut earlier so that private layers are inside"
            )
        writer.write_json(VERIFICATION_FILE, asdict(verification))
        if not verification.passed:
            raise VerificationError(_failure_sentence(verification))
        step("Sealing the enclave program…")
        key, key_id = new_data_key(), secrets.token_hex(16)
        manifest = build_manifest(
            source=SourceSpec.of(adapter.path, adapter.framework),
            cut={"index": point.index, "name": point.name, "tensor": point.tensor.name},
            public=public,
            model_inputs=[t.to_json() for t in adapter.graph.inputs],
            private_inputs=[t.to_json() for t in program.inputs],
            private_outputs=[t.to_json() for t in program.outputs],
            key_id=key_id,
            output_policy=output_policy,
            keyserver_url=keyserver,
            allow_unlocked_memory=allow_unlocked_memory,
        )
        container = shipped.to_container(offset=HEADER_BYTES)
        manifest["private"]["plaintext_bytes"] = len(container)
        sealed = seal_container(container, manifest, key)
        del container
        manifest = writer.finish(manifest, sealed, public_file=public.file if public else None)
        # The key goes to the keystore last: a failed split registers nothing.
        if keyserver:
            _register_on_keyserver(
                keyserver, keyserver_token, key_id, key, manifest, keyserver_policy
            )
        else:
            Keystore(keystore).put(key_id, key)
        del key
        writer.commit()
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

    cfg = resolve_admin(url, token)
    with KeyServerClient(cfg.url, cfg.token) as ks:
        ks.register(key_id, key, manifest_digest(manifest), policy)


def _failure_sentence(v: Verification) -> str:
    """Why verification failed, in one sentence; a lowering bug is named only when the
    float64 reference shows one."""
    head = (
        f"The split model differs from the original by up to {v.max_abs_error:.3g} "
        f"(allowed {v.allowed:.3g}: atol {v.tolerance:g} + rtol {v.rtol:g} × output scale) "
        f"on {v.probe}; nothing was written."
    )
    if v.lowering_bug:
        return (
            f"{head[:-1]}, and against a float64 run of the enclave program the split is off "
            f"by {v.split_vs_float64:.3g} where the framework is off by "
            f"{v.framework_vs_float64:.3g}: this is a bug in ennclave's lowering of a private "
            "layer, please report it."
        )
    if v.split_vs_float64 is None:
        return f"{head[:-1]}; the outputs are not finite, check the model and the samples."
    return (
        f"{head[:-1]}; a float64 run shows no lowering error (split off by "
        f"{v.split_vs_float64:.3g}, framework by {v.framework_vs_float64:.3g}), so loosen "
        "--tolerance or --rtol."
    )
