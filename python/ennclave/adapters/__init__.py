"""Framework adapters: one file per framework, chosen by the model file's suffix."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelLoadError
from .base import ModelAdapter

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
ONNX_SUFFIXES = (".onnx",)


def load_model(
    path: str | Path,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    output: str | None = None,
) -> ModelAdapter:
    """Open a model file with the adapter for its framework. `input_shapes` fixes the
    dynamic dimensions of named inputs (``--input-shape images=1x3x320x320``; the first
    dimension is the batch and stays free): ONNX models, and Keras models with a dynamic
    axis such as a keras-hub backbone's sequence length. `output` (``--output NAME``)
    names the model output the split model ends in, required when the model has
    several (an ONNX export with `last_hidden_state` and `pooler_output`): the graph is
    pruned to what that output needs."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"Model file {p} does not exist; check the path.")
    suffix = p.suffix.lower()
    if suffix in KERAS_SUFFIXES:
        from .keras import KerasAdapter

        return KerasAdapter(p, input_shapes, output)
    if suffix in ONNX_SUFFIXES:
        from .onnx import OnnxAdapter

        return OnnxAdapter(p, input_shapes, output)
    raise ModelLoadError(
        f"Cannot tell the framework of {p.name}: use a Keras (.keras, .h5) or ONNX (.onnx) file."
    )


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """`NAME=1x3x320x320` -> ("NAME", (1, 3, 320, 320))."""
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d <= 0 for d in shape):
        raise ModelLoadError(
            f"--input-shape {text!r} is not NAME=DxDx…, e.g. images=1x3x320x320 (positive "
            "sizes; the first is the batch)."
        )
    return name, shape


__all__ = ["ModelAdapter", "load_model", "parse_input_shape"]
