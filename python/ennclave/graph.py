"""A framework-neutral view of a model: nodes, tensors, and where it can be cut.

Adapters (keras, onnx) translate their framework's graph into a `GraphView`; planning
and cutting only ever look at this view, never at the framework.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TensorInfo:
    """A tensor crossing between nodes. `shape[0]` is the batch dim (None)."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @property
    def elements_per_sample(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= int(d or 1)
        return n


@dataclass
class Node:
    """One layer (Keras) or operator (ONNX) in topological order.

    `params` counts the weights this node owns; `trainable` is True/False for nodes
    with weights in frameworks that record it, None when unknown or weightless.
    `handle` is the adapter's own object (layer or NodeProto); only adapters use it.
    """

    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    params: int = 0
    flops: int = 0
    trainable: bool | None = None
    handle: Any = field(default=None, repr=False, compare=False)


@dataclass
class GraphView:
    framework: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    nodes: list[Node]
    tensors: dict[str, TensorInfo]
    # Tensors that do not depend on any model input (ONNX constants, shape values).
    constant_tensors: set[str] = field(default_factory=set)
    # Tensors that must not be offered as cuts although they separate the graph, e.g.
    # ONNX tensors whose dim 0 is the batch merged with other dims by a Reshape.
    uncuttable: set[str] = field(default_factory=set)

    def producer(self, tensor: str) -> Node | None:
        for node in self.nodes:
            if tensor in node.outputs:
                return node
        return None


@dataclass
class CutPoint:
    """A tensor that alone separates the model inputs from the outputs.

    `position` is the number of nodes (in topological order) on the public side.
    Index 0 is the model input itself: everything is private.
    """

    index: int
    tensor: TensorInfo
    name: str
    op_type: str
    position: int


def find_cut_points(graph: GraphView) -> list[CutPoint]:
    """Every single-tensor boundary between the model inputs and its outputs.

    Walk the nodes in topological order and keep the set of *live* tensors: produced
    so far (or model inputs), not constant, and still needed later (by a later node or
    as a model output). Wherever exactly one tensor is live, everything downstream
    depends on the model input only through it: a valid cut. Inside a residual block
    two tensors are live (the skip and the branch), so no cut is offered there.
    """
    last_use: dict[str, int] = {}
    for pos, node in enumerate(graph.nodes):
        for t in node.inputs:
            last_use[t] = pos
    n = len(graph.nodes)
    for out in graph.outputs:
        last_use[out.name] = n  # needed until the end

    def is_dynamic(t: str) -> bool:
        return t not in graph.constant_tensors

    cuts: list[CutPoint] = []
    if len(graph.inputs) == 1:
        inp = graph.inputs[0]
        cuts.append(CutPoint(0, inp, inp.name, "Input", 0))

    live: set[str] = {t.name for t in graph.inputs}
    output_names = {t.name for t in graph.outputs}
    seen: set[str] = set()
    for pos, node in enumerate(graph.nodes):
        live.update(t for t in node.outputs if is_dynamic(t))
        live = {t for t in live if last_use.get(t, -1) > pos}
        if pos == n - 1 or len(live) != 1:
            continue
        (t,) = live
        if (
            t in seen
            or t in output_names
            or t in graph.uncuttable
            or t in {i.name for i in graph.inputs}
        ):
            continue
        seen.add(t)
        producer = graph.producer(t)
        assert producer is not None
        cuts.append(CutPoint(len(cuts), graph.tensors[t], producer.name, producer.op_type, pos + 1))
    return cuts
