"""The enclave program: the private part as a tiny op graph plus float32 weights.

The format is specified in docs/enclave-program.md. `ProgramBuilder` is what lowering
uses to write one; `Program` is the in-memory form the reference executor runs and
the container (`to_container` / `from_container`) is what gets sealed.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from .errors import ProgramError
from .graph import TensorInfo

FORMAT = "ennclave-program"
VERSION = 1
CONTAINER_MAGIC = b"ENCPROG1"

ACTIVATIONS = (
    "linear relu relu6 leaky_relu elu selu gelu sigmoid hard_sigmoid hard_swish tanh swish "
    "softmax clip exp log sqrt abs neg reciprocal erf erfc"
).split()

OPS = (
    "dense conv conv_transpose pool global_pool reduce pad reshape transpose slice resize "
    "scale_shift layer_norm add sub mul div max min pow equal where cast expand concat constant "
    "activation matmul softmax gather"
).split()


PANEL = 32  # columns per panel of the panels32 dense-kernel layout


def pack_panels(kernel: np.ndarray) -> np.ndarray:
    """`[in, out]` → `[ceil(out / 32), in, 32]`: panel p holds columns 32p … 32p+31 row
    by row, the last one zero-padded (docs/enclave-program.md, `kernel_layout`)."""
    k, n = kernel.shape
    panels = -(-n // PANEL)
    padded = np.zeros((k, panels * PANEL), dtype=np.float32)
    padded[:, :n] = kernel
    return np.ascontiguousarray(padded.reshape(k, panels, PANEL).transpose(1, 0, 2))


def unpack_panels(panels: np.ndarray, units: int) -> np.ndarray:
    """The inverse of `pack_panels`."""
    if panels.ndim != 3:
        raise ProgramError(f"A panels32 dense kernel must have 3 dimensions, not {panels.ndim}.")
    p, k, width = panels.shape
    if width != PANEL or p != -(-units // PANEL):
        raise ProgramError(
            f"A panels32 dense kernel of shape {list(panels.shape)} does not fit {units} units."
        )
    return np.ascontiguousarray(panels.transpose(1, 0, 2).reshape(k, p * PANEL)[:, :units])


@dataclass
class ProgramNode:
    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op": self.op,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "attrs": self.attrs,
            "weights": self.weights,
        }


@dataclass
class Program:
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    nodes: list[ProgramNode]
    weights: dict[str, np.ndarray]

    # -- serialisation -----------------------------------------------------------
    def graph_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "nodes": [n.to_json() for n in self.nodes],
        }

    def json_bytes(self) -> bytes:
        return json.dumps(self.graph_json(), indent=1).encode()

    def weights_bytes(self) -> bytes:
        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.weights.items()}
        return st_save(tensors, metadata={"format": FORMAT})

    def shipped(self) -> Program:
        """The form that is sealed: every dense kernel packed into 32-column panels
        (`kernel_layout: panels32`), so the worker streams it contiguously without
        re-packing at load. The in-memory form (`self`) keeps `[in, out]` kernels."""
        nodes, weights = [], dict(self.weights)
        for node in self.nodes:
            key = node.weights.get("kernel")
            if node.op == "dense" and key is not None and "kernel_layout" not in node.attrs:
                kernel = weights[key]
                weights[key] = pack_panels(kernel)
                attrs = {**node.attrs, "kernel_layout": "panels32", "units": int(kernel.shape[1])}
                node = ProgramNode(
                    node.name, node.op, node.inputs, node.outputs, attrs, node.weights
                )
            nodes.append(node)
        return Program(self.inputs, self.outputs, nodes, weights)

    def unpacked(self) -> Program:
        """The inverse of `shipped`: dense kernels back to `[in, out]`."""
        nodes, weights = [], dict(self.weights)
        for node in self.nodes:
            if node.op == "dense" and node.attrs.get("kernel_layout") == "panels32":
                key = node.weights["kernel"]
                attrs = dict(node.attrs)
                del attrs["kernel_layout"]
                units = attrs.pop("units", None)
                if not isinstance(units, int) or units < 1 or key not in weights:
                    raise ProgramError(
                        f"Dense node {node.name!r} has a panels32 kernel without a valid "
                        "'units' attribute or kernel; the program is malformed."
                    )
                weights[key] = unpack_panels(weights[key], units)
                node = ProgramNode(
                    node.name, node.op, node.inputs, node.outputs, attrs, node.weights
                )
            nodes.append(node)
        return Program(self.inputs, self.outputs, nodes, weights)

    def to_container(self, offset: int = 0) -> bytes:
        """The container bytes. `offset`: where the container will sit in the buffer the
        worker decrypts into (`seal.HEADER_BYTES` for a sealed file): the worker uses the
        tensor data in place, so program.json is padded with spaces until that data
        starts 64-byte aligned there (else the worker first moves the container, a few
        ms for a large model)."""
        shipped = self.shipped()
        j = shipped.json_bytes()
        w = shipped.weights_bytes()
        (hn,) = struct.unpack("<Q", w[:8])
        j += b" " * (-(offset + 16 + len(j) + 8 + hn) % 64)
        return CONTAINER_MAGIC + struct.pack("<Q", len(j)) + j + w

    @classmethod
    def from_parts(cls, graph_json: bytes, weights: bytes) -> Program:
        try:
            g = json.loads(graph_json)
        except (ValueError, UnicodeDecodeError) as e:
            raise ProgramError(f"program.json is not valid JSON ({e}).") from None
        if g.get("format") != FORMAT or g.get("version") != VERSION:
            raise ProgramError(
                f"Not an {FORMAT} version {VERSION} program "
                f"(format={g.get('format')!r}, version={g.get('version')!r})."
            )
        try:
            w = st_load(weights)
        except Exception as e:  # safetensors raises its own error types
            raise ProgramError(f"weights.safetensors is unreadable ({e}).") from None

        def tinfo(d: dict[str, Any]) -> TensorInfo:
            return TensorInfo(d["name"], tuple(d["shape"]), d.get("dtype", "float32"))

        return cls(
            inputs=[tinfo(t) for t in g["inputs"]],
            outputs=[tinfo(t) for t in g["outputs"]],
            nodes=[
                ProgramNode(
                    n["name"],
                    n["op"],
                    n["inputs"],
                    n["outputs"],
                    n.get("attrs", {}),
                    n.get("weights", {}),
                )
                for n in g["nodes"]
            ],
            weights=dict(w),
        ).unpacked()

    @classmethod
    def from_container(cls, data: bytes) -> Program:
        if len(data) < 16 or data[:8] != CONTAINER_MAGIC:
            raise ProgramError("Not an enclave program container (bad magic).")
        (n,) = struct.unpack("<Q", data[8:16])
        if 16 + n > len(data):
            raise ProgramError("Enclave program container is truncated.")
        return cls.from_parts(data[16 : 16 + n], data[16 + n :])

    @property
    def num_params(self) -> int:
        return int(sum(v.size for v in self.weights.values()))


class ProgramBuilder:
    """Accumulates nodes and weights while an adapter lowers the private side."""

    def __init__(self) -> None:
        self.nodes: list[ProgramNode] = []
        self.weights: dict[str, np.ndarray] = {}
        self._names: set[str] = set()
        self._counter = 0

    def fresh(self, hint: str) -> str:
        """A tensor or node name not used yet, derived from `hint`."""
        base = hint.replace(":", "_") or "t"
        name = base
        while name in self._names:
            self._counter += 1
            name = f"{base}_{self._counter}"
        self._names.add(name)
        return name

    def weight(self, hint: str, value: np.ndarray) -> str:
        key = self.fresh(hint)
        self.weights[key] = np.ascontiguousarray(value, dtype=np.float32)
        return key

    def add(
        self,
        op: str,
        inputs: list[str],
        name: str,
        attrs: dict[str, Any] | None = None,
        weights: dict[str, np.ndarray] | None = None,
        output: str | None = None,
    ) -> str:
        """Append a node with one output; returns the output tensor name."""
        if op not in OPS:
            raise ProgramError(f"Internal error: unknown program op {op!r}.")
        node_name = self.fresh(name)
        out = output if output is not None else self.fresh(f"{node_name}:0")
        if output is not None:
            self._names.add(output)
        wrefs = {role: self.weight(f"{node_name}.{role}", v) for role, v in (weights or {}).items()}
        self.nodes.append(ProgramNode(node_name, op, list(inputs), [out], attrs or {}, wrefs))
        return out

    def constant(self, name: str, value: np.ndarray) -> str:
        return self.add("constant", [], name, weights={"value": value})

    def build(self, inputs: list[TensorInfo], outputs: list[TensorInfo]) -> Program:
        return Program(inputs, outputs, self.nodes, self.weights)


def activation(fn: str, **params: Any) -> dict[str, Any]:
    if fn not in ACTIVATIONS:
        raise ProgramError(f"Internal error: unknown activation {fn!r}.")
    return {"fn": fn, **params}
