"""`private.memory` (issue #14, item 4): locked secret memory is required unless the
owner seals `"unlocked-ok"` (`split --allow-unlocked-memory`). The worker side is
attacks/unlocked_memory.py and the Rust test `secmem::tests`."""

from __future__ import annotations

from ennclave.bundle import MEMORY_UNLOCKED_OK, SourceSpec, build_manifest
from ennclave.cli import build_parser


def _manifest(**kw):
    return build_manifest(
        source=SourceSpec("m.onnx", "onnx", None),
        cut={"index": 0, "name": "x", "tensor": "x"},
        public=None,
        private_inputs=[],
        private_outputs=[],
        key_id="k",
        **kw,
    )


def test_locked_memory_is_the_default() -> None:
    assert "memory" not in _manifest()["private"]
    assert _manifest(allow_unlocked_memory=True)["private"]["memory"] == MEMORY_UNLOCKED_OK


def test_split_flag() -> None:
    p = build_parser()
    args = p.parse_args(["split", "m.keras", "--cut", "auto", "-o", "b"])
    assert args.allow_unlocked_memory is False
    args = p.parse_args(["split", "m.keras", "--cut", "auto", "-o", "b", "--allow-unlocked-memory"])
    assert args.allow_unlocked_memory is True
