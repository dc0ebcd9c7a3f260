"""Framework adapters: one file per framework, chosen by the model file's suffix."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelLoadError
from .base import ModelAdapter

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
ONNX_SUFFIXES = (".onnx",)


def load_model(path: str | Path) -> ModelAdapter:
    """Open a model file with the adapter for its framework."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"Model file {p} does not exist; check the path.")
    suffix = p.suffix.lower()
    if suffix in KERAS_SUFFIXES:
        from .keras import KerasAdapter

        return KerasAdapter(p)
    if suffix in ONNX_SUFFIXES:
        from .onnx import OnnxAdapter

        return OnnxAdapter(p)
    raise ModelLoadError(
        f"Cannot tell the framework of {p.name}: use a Keras (.keras, .h5) or ONNX (.onnx) file."
    )


__all__ = ["ModelAdapter", "load_model"]
