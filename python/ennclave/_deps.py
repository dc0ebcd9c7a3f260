"""Optional frameworks: import them on first use, with an install hint if missing."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from .errors import EnnclaveError

_EXTRA = {"keras": "keras", "tensorflow": "keras", "onnx": "onnx", "onnxruntime": "onnx"}


class MissingDependency(EnnclaveError):
    pass


def require(module: str) -> ModuleType:
    """Import `module` or explain which extra installs it."""
    if module in ("keras", "tensorflow"):
        # Quiet TensorFlow's C++ start-up chatter unless the user asked for it.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = _EXTRA.get(module.split(".")[0], module)
        raise MissingDependency(
            f"{module} is needed for this but is not installed ({e}); "
            f"install it with: pip install 'ennclave[{extra}]'."
        ) from None
