"""The public part of a bundle, run in its framework: Keras or ONNX Runtime, on a GPU
when one is available.

The one object that runs a public part: `split` verifies through it and the runtime
predicts through it, so what is verified is the code path that ships.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._deps import require
from ..errors import BundleError, InputError


class PublicPart:
    """The public part in its framework; call it on a batch (float32, batch first) to
    get the cut tensor; a public part of several inputs takes a list of arrays in the
    order of `input_names` (the manifest's public.inputs). `providers`: ONNX Runtime's
    execution providers (default: a GPU provider where one is installed, then the
    CPU)."""

    def __init__(
        self,
        path: Path,
        framework: str,
        providers: list[str] | None = None,
        input_names: list[str] | None = None,
    ) -> None:
        self.framework = framework
        self._names = list(input_names or [])
        if framework == "keras":
            keras = require("keras")
            try:
                self._model = keras.saving.load_model(path, compile=False)
            except Exception as e:
                raise BundleError(
                    f"Keras cannot load {path} ({e}); the bundle may need a newer Keras."
                ) from None
        elif framework == "onnx":
            ort = require("onnxruntime")
            if providers is None:
                avail = ort.get_available_providers()
                gpu = [p for p in ("CUDAExecutionProvider", "ROCMExecutionProvider") if p in avail]
                providers = [*gpu, "CPUExecutionProvider"]
            opts = ort.SessionOptions()
            opts.log_severity_level = 3  # warnings about unused initializers are noise here
            try:
                self._sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as e:
                raise BundleError(f"ONNX Runtime cannot load {path} ({e}).") from None
            inp = self._sess.get_inputs()[0]
            self._input = inp.name
            if not self._names:
                self._names = [i.name for i in self._sess.get_inputs()]
            # A model exported with a fixed batch size runs chunk by chunk.
            self._fixed_batch = (
                inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) else None
            )
        else:
            raise BundleError(f"Unknown public framework {framework!r}; upgrade ennclave.")
        self.on_gpu = self._detect_gpu()

    def _detect_gpu(self) -> bool:
        """Whether the public part runs on a GPU: ONNX Runtime's first provider, or the
        device of the Keras backend (TensorFlow, JAX or PyTorch) in use."""
        if self.framework == "onnx":
            return self._sess.get_providers()[0] != "CPUExecutionProvider"
        try:
            import keras

            backend = keras.backend.backend()
            if backend == "tensorflow":
                import tensorflow as tf

                return bool(tf.config.list_logical_devices("GPU"))
            if backend == "jax":
                import jax

                return jax.default_backend() in ("gpu", "cuda", "rocm")
            if backend == "torch":
                import torch

                return bool(torch.cuda.is_available())
        except Exception:  # a backend without GPU support installed
            pass
        return False

    def __call__(self, x: np.ndarray | list[np.ndarray]) -> np.ndarray:
        xs = list(x) if isinstance(x, (list, tuple)) else [x]
        if self.framework == "keras":
            # predict_on_batch runs Keras's compiled predict function (a tf.function
            # traced once per input shape): about twice as fast as an eager call here.
            arg = xs[0] if len(xs) == 1 else xs
            return np.asarray(self._model.predict_on_batch(arg), dtype=np.float32)
        names = self._names if len(xs) > 1 else [self._input]
        if len(names) != len(xs):
            raise InputError(f"The public part takes {len(names)} inputs {names}, got {len(xs)}.")
        n = len(xs[0])
        fixed = self._fixed_batch
        if fixed is None or fixed == n:
            out = self._sess.run(None, dict(zip(names, xs, strict=True)))[0]
            return np.asarray(out, dtype=np.float32)
        if n % fixed:
            raise InputError(f"The model's batch size is fixed at {fixed}; pass a multiple of it.")
        parts = [
            self._sess.run(None, {k: a[i : i + fixed] for k, a in zip(names, xs, strict=True)})[0]
            for i in range(0, n, fixed)
        ]
        return np.concatenate(parts).astype(np.float32, copy=False)
