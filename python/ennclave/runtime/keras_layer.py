"""A Keras layer that computes a bundle's private part inside the enclave worker.

Put it at the end of a Keras model whose last tensor is the bundle's cut tensor:

    enclave = EnclaveLayer("bundle/")
    outputs = enclave(public_model.output)
    model = keras.Model(public_model.input, outputs)

A bundle whose private part reads model inputs besides the cut tensor (a padding
mask) takes a list: `enclave([cut_tensor, padding_mask])`, in the order of
`EnclavedModel.private_input_names`.

The layer has no weights; `call` crosses into numpy (`tf.numpy_function` under the
TensorFlow backend, `jax.experimental.io_callback` under JAX, eager conversion under
PyTorch), so it is not differentiable and runs on the host CPU. Output: float32
`(N, *private_output_shape)` for the `full` and `round` policies, `(N, 1)` (the label
as float) for `label`, `(N, 2k)` (k indices then k values) for `top_k`. `get_config` stores the bundle and keystore paths only.
"""

from __future__ import annotations

import os
from typing import Any

import keras
import numpy as np

from .model import EnclavedModel


@keras.saving.register_keras_serializable(package="ennclave")
class EnclaveLayer(keras.layers.Layer):
    def __init__(
        self,
        bundle: str | os.PathLike[str] | None = None,
        *,
        keystore: str | os.PathLike[str] | None = None,
        model: EnclavedModel | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        if model is None:
            if bundle is None:
                raise ValueError("EnclaveLayer needs a bundle path or an EnclavedModel")
            model = EnclavedModel(bundle, keystore)
        self._bundle = str(bundle if bundle is not None else model.bundle)
        self._keystore = None if keystore is None else str(keystore)
        self.enclaved = model
        mode = model.output_policy.get("mode", "full")
        if mode == "label":
            self._out = (1,)
        elif mode == "top_k":
            self._out = (2 * int(model.output_policy["k"]),)
        else:
            self._out = tuple(model.output_shape[1:])

    def _run(self, *xs: np.ndarray) -> np.ndarray:
        hs = [np.asarray(x, dtype=np.float32) for x in xs]
        y = self.enclaved.predict_private(hs[0] if len(hs) == 1 else hs)
        return y.reshape((y.shape[0], *self._out)).astype(np.float32, copy=False)

    def call(self, x: Any) -> Any:
        xs = list(x) if isinstance(x, (list, tuple)) else [x]
        backend = keras.backend.backend()
        if backend == "tensorflow":
            import tensorflow as tf

            y = tf.numpy_function(self._run, xs, tf.float32, stateful=True)
            y.set_shape((None, *self._out))
            return y
        if backend == "jax":
            # Keras traces the model with jax.jit; io_callback (not pure_callback) is
            # never dropped or repeated by the compiler: each call spends query budget.
            import jax
            from jax.experimental import io_callback

            shape = jax.ShapeDtypeStruct((xs[0].shape[0], *self._out), np.float32)
            return io_callback(self._run, shape, *xs)
        # PyTorch (and NumPy) run eagerly.
        return keras.ops.convert_to_tensor(self._run(*[keras.ops.convert_to_numpy(t) for t in xs]))

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        if (
            isinstance(input_shape, list)
            and input_shape
            and isinstance(input_shape[0], (list, tuple))
        ):
            input_shape = input_shape[0]  # several inputs: the cut tensor's batch
        return (input_shape[0], *self._out)

    def get_config(self) -> dict[str, Any]:
        cfg = super().get_config()
        cfg.update({"bundle": self._bundle, "keystore": self._keystore})
        return cfg

    def close(self) -> None:
        self.enclaved.close()
