"""What every framework adapter provides. Planning, splitting and verification use
only this interface, so adding a framework means adding one file here."""

from __future__ import annotations

import abc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..graph import CutPoint, GraphView
from ..program import Program


class ModelAdapter(abc.ABC):
    framework: str  # "keras" | "onnx"
    public_suffix: str  # file suffix of the public part: ".keras" | ".onnx"

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    @abc.abstractmethod
    def graph(self) -> GraphView:
        """The flattened graph, nodes in topological order."""

    @abc.abstractmethod
    def node_weights(self) -> dict[str, list[np.ndarray]]:
        """Weights of every node that has any, by node name (for --public-base)."""

    @abc.abstractmethod
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Run the original, unsplit model."""

    @abc.abstractmethod
    def save_public(self, cut: CutPoint, path: Path) -> None:
        """Write the public side of `cut` (model input -> cut tensor) to `path`."""

    @abc.abstractmethod
    def lower_private(self, cut: CutPoint) -> Program:
        """Lower the private side of `cut` (cut tensor -> model output) to a program.

        Raises UnsupportedOpError naming the first node that cannot be lowered."""

    def random_inputs(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Probe inputs in a realistic range: uniform in [0, 1) for float inputs (the
        range of normalised images and most features; standard-normal inputs drove the
        logits of deep CNNs to thousands, where float32 rounding alone exceeds any
        absolute tolerance)."""
        (inp,) = self.graph.inputs
        shape = (n, *[int(d or 1) for d in inp.shape[1:]])
        return rng.random(shape, dtype=np.float32)


Translator = Callable[..., Any]


class Translators:
    """A registry from a layer or operator type to the function that translates it into
    enclave-program ops, filled by decorating the translator:

        OPS = Translators()

        class _Lowering:
            @OPS.register("MaxPool", "AveragePool")
            def pool(self, node, attrs): ...

    Both adapters dispatch through one of these, so what a framework supports is exactly
    what is registered (`types()`)."""

    def __init__(self) -> None:
        self._by_type: dict[str, Translator] = {}

    def register(self, *types: str) -> Callable[[Translator], Translator]:
        def add(fn: Translator) -> Translator:
            for t in types:
                if t in self._by_type:
                    raise ValueError(f"{t} has two translators")
                self._by_type[t] = fn
            return fn

        return add

    def get(self, op_type: str) -> Translator | None:
        return self._by_type.get(op_type)

    def types(self) -> set[str]:
        return set(self._by_type)
