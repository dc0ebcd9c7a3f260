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
    # Tensors that may cross a cut beside the cut tensor: model inputs (the host passes
    # them to the private part: they are the client's own inputs) and tensors the
    # adapter can recompute on the private side from model inputs alone (a padding
    # mask from the token ids). Empty: an adapter that lowers single-input programs only.
    passthrough: set[str] = field(default_factory=set)

    def producer(self, tensor: str) -> Node | None:
        for node in self.nodes:
            if tensor in node.outputs:
                return node
        return None


@dataclass
class CutPoint:
    """A tensor that alone separates the model inputs from the outputs, except for
    pass-through model inputs (`GraphView.passthrough`).

    `position` is the number of nodes (in topological order) on the public side.
    Index 0 is the model input itself: everything is private. `extra_inputs`: the
    model inputs the private side also reads (directly or through tensors it
    recomputes from them), in model-input order; the private program's inputs are
    the cut tensor followed by these.
    """

    index: int
    tensor: TensorInfo
    name: str
    op_type: str
    position: int
    extra_inputs: tuple[TensorInfo, ...] = ()

    @property
    def private_inputs(self) -> list[TensorInfo]:
        """The private program's inputs: the cut tensor, then `extra_inputs`."""
        return [self.tensor, *self.extra_inputs]


def input_ancestors(graph: GraphView, tensors: set[str]) -> list[TensorInfo]:
    """The model inputs that `tensors` are computed from, in model-input order. A
    constant (e.g. an ONNX Shape of an input, which only its static dims decide) does
    not make its input an ancestor."""
    producers = {t: n for n in graph.nodes for t in n.outputs}
    seen: set[str] = set()
    todo = list(tensors)
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in graph.constant_tensors:
            continue
        node = producers.get(t)
        if node is not None:
            todo.extend(node.inputs)
    return [i for i in graph.inputs if i.name in seen]


def find_cut_points(graph: GraphView) -> list[CutPoint]:
    """Every single-tensor boundary between the model inputs and its outputs.

    Walk the nodes in topological order and keep the set of *live* tensors: produced
    so far (or model inputs), not constant, and still needed later (by a later node or
    as a model output). Wherever exactly one tensor is live, everything downstream
    depends on the model input only through it: a valid cut. Inside a residual block
    two tensors are live (the skip and the branch), so no cut is offered there.
    Pass-through tensors (`GraphView.passthrough`) do not count as live: the private
    side gets the model inputs they come from (`CutPoint.extra_inputs`).
    """
    last_use: dict[str, int] = {}
    for pos, node in enumerate(graph.nodes):
        if node.outputs and all(t in graph.constant_tensors for t in node.outputs):
            continue  # e.g. an ONNX Shape: it reads only static dims, not the values
        for t in node.inputs:
            last_use[t] = pos
    n = len(graph.nodes)
    for out in graph.outputs:
        last_use[out.name] = n  # needed until the end

    def is_dynamic(t: str) -> bool:
        return t not in graph.constant_tensors

    cuts: list[CutPoint] = []
    through = graph.passthrough
    if len(graph.inputs) == 1:
        inp = graph.inputs[0]
        cuts.append(CutPoint(0, inp, inp.name, "Input", 0))
    elif graph.inputs and all(i.name in through for i in graph.inputs[1:]):
        used = [i for i in graph.inputs if i.name in last_use]
        if used:
            cuts.append(CutPoint(0, used[0], used[0].name, "Input", 0, tuple(used[1:])))

    live: set[str] = {t.name for t in graph.inputs}
    output_names = {t.name for t in graph.outputs}
    seen: set[str] = set()
    for pos, node in enumerate(graph.nodes):
        live.update(t for t in node.outputs if is_dynamic(t))
        live = {t for t in live if last_use.get(t, -1) > pos}
        main = {t for t in live if t not in through}
        if pos == n - 1 or len(main) != 1:
            continue
        (t,) = main
        if (
            t in seen
            or t in output_names
            or t in graph.uncuttable
            or t in {i.name for i in graph.inputs}
        ):
            continue
        if through and not any(m.params for m in graph.nodes[: pos + 1]):
            # Nothing with weights on the public side (a cast of a pass-through mask):
            # the same as cut 0, which is offered for such graphs.
            continue
        seen.add(t)
        producer = graph.producer(t)
        assert producer is not None
        extra = tuple(input_ancestors(graph, live - main)) if live != main else ()
        cuts.append(
            CutPoint(len(cuts), graph.tensors[t], producer.name, producer.op_type, pos + 1, extra)
        )
    return cuts
