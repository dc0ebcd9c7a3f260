"""Optional frameworks: import them on first use, with an install hint if missing."""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

from .errors import EnnclaveError

# Optional module -> the extra that installs it.
EXTRAS = {
    "keras": "keras",
    "tensorflow": "keras",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "tf2onnx": "test",
    "matplotlib": "plot",
    "fastapi": "server",
    "uvicorn": "server",
    "sqlalchemy": "server",
    "httpx": "server",
    "starlette": "server",
    "pydantic": "server",
}

# Set by the CLI (not `-v`): TensorFlow's C++ start-up lines are written to file
# descriptor 2 before its log level applies, so its import runs with them discarded.
QUIET_FRAMEWORKS = False


class MissingDependency(EnnclaveError):
    pass


def missing_message(module: str) -> str | None:
    """The install hint for an optional module, or None for a module we do not know."""
    extra = EXTRAS.get(module.split(".")[0])
    if extra is None:
        return None
    return (
        f"This needs {module.split('.')[0]}, which is not installed; "
        f"install it with: pip install 'ennclave[{extra}]'."
    )


@contextlib.contextmanager
def _stderr_discarded() -> Iterator[None]:
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def require(module: str) -> ModuleType:
    """Import `module` or explain which extra installs it."""
    quiet: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if module.split(".")[0] in ("keras", "tensorflow"):
        # Quiet TensorFlow's C++ start-up chatter unless the user asked for it.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        if QUIET_FRAMEWORKS:
            quiet = _stderr_discarded()
    try:
        with quiet:
            return importlib.import_module(module)
    except ImportError as e:
        name = e.name or module
        raise MissingDependency(
            missing_message(name)
            or missing_message(module)
            or f"{module} cannot be imported ({e}); reinstall ennclave."
        ) from None
