"""Framework-neutral rewrites of an enclave program, run on every adapter's output.

Adapters only translate layer by layer (a Keras BatchNormalization becomes a
`scale_shift`, an ONNX Mul by a constant a `mul`); `optimize` then does the folding and
fusing once for all of them, so a Keras model and its ONNX export ship the same ops.
"""

from __future__ import annotations

import numpy as np

from .program import Program, ProgramNode, activation
from .reference import run_node

Shapes = dict[str, tuple[int | None, ...]]


def _copy(program: Program) -> Program:
    """Nodes copied (the rewrites edit them), weight arrays shared (they are replaced,
    never written to)."""
    nodes = [
        ProgramNode(n.name, n.op, list(n.inputs), list(n.outputs), dict(n.attrs), dict(n.weights))
        for n in program.nodes
    ]
    return Program(list(program.inputs), list(program.outputs), nodes, dict(program.weights))


def infer_shapes(program: Program) -> Shapes:
    """Every tensor's shape, batch first as None, found by running the reference
    executor on one all-zero sample (exact for every op the format has, and one sample
    costs little next to verification)."""
    values: dict[str, np.ndarray] = {}
    shapes: Shapes = {}
    for inp in program.inputs:
        x = np.zeros((1, *[int(d) for d in inp.shape[1:]]), dtype=np.float64)
        values[inp.name] = x
        shapes[inp.name] = (None, *x.shape[1:])
    with np.errstate(all="ignore"):
        for node in program.nodes:
            y = np.asarray(run_node(node, [values[t] for t in node.inputs], program.weights))
            values[node.outputs[0]] = y
            # Constants carry no batch axis; everything else is batch first.
            shapes[node.outputs[0]] = (
                tuple(y.shape) if node.op == "constant" else (None, *y.shape[1:])
            )
    return shapes


def optimize(program: Program) -> Program:
    """Peephole clean-up, exact up to float rounding: fold per-channel affine ops
    (batch norm's scale_shift, constant mul/add/sub) and activations into the preceding
    dense/conv, merge reshape/transpose chains, turn x * sigmoid(x) into swish, then
    drop nodes and weights nothing uses. Returns a new program; `program` is unchanged."""
    prog = _copy(program)
    pshape = infer_shapes(prog)
    out_name = prog.outputs[0].name
    while _fuse_linear(prog, pshape, out_name) or _simplify(prog, pshape, out_name):
        pass
    needed = {out_name}
    live: list[ProgramNode] = []
    for n in reversed(prog.nodes):
        if any(t in needed for t in n.outputs):
            live.append(n)
            needed.update(n.inputs)
    prog.nodes[:] = list(reversed(live))
    used = {k for n in prog.nodes for k in n.weights.values()}
    for k in list(prog.weights):
        if k not in used:
            del prog.weights[k]
    return prog


def _consumers(prog: Program) -> dict[str, list[ProgramNode]]:
    consumers: dict[str, list[ProgramNode]] = {}
    for n in prog.nodes:
        for t in n.inputs:
            consumers.setdefault(t, []).append(n)
    return consumers


def _fuse_linear(prog: Program, pshape: Shapes, out_name: str) -> bool:
    consumers = _consumers(prog)
    const_of = {n.outputs[0]: n for n in prog.nodes if n.op == "constant"}
    for lin in prog.nodes:
        if lin.op not in ("dense", "conv") or lin.attrs.get("activation"):
            continue
        y = lin.outputs[0]
        users = consumers.get(y, [])
        if y == out_name or len(users) != 1:
            continue
        nxt = users[0]
        if _fuse(prog, lin, nxt, const_of, pshape):
            lin.outputs = list(nxt.outputs)
            prog.nodes.remove(nxt)
            return True
    return False


def _simplify(prog: Program, pshape: Shapes, out_name: str) -> bool:
    consumers = _consumers(prog)
    producers = {n.outputs[0]: n for n in prog.nodes}
    for n in prog.nodes:
        if n.op in ("reshape", "transpose"):
            x, y = n.inputs[0], n.outputs[0]
            in_shape = pshape.get(x)
            identity = (
                n.attrs["perm"] == sorted(n.attrs["perm"])
                if n.op == "transpose"
                else in_shape is not None and list(in_shape[1:]) == list(n.attrs["shape"])
            )
            if identity and y != out_name:
                for m in consumers.get(y, []):
                    m.inputs = [x if t == y else t for t in m.inputs]
                prog.nodes.remove(n)
                return True
            src = producers.get(x)
            if (
                src is not None
                and src.op == n.op
                and x != out_name
                and len(consumers.get(x, [])) == 1
            ):
                if n.op == "transpose":
                    p1 = src.attrs["perm"]
                    n.attrs["perm"] = [p1[i] for i in n.attrs["perm"]]
                n.inputs = list(src.inputs)
                prog.nodes.remove(src)
                return True
        if n.op == "mul" and len(n.inputs) == 2:
            for a, b in (n.inputs, n.inputs[::-1]):
                sig = producers.get(b)
                if (
                    sig is not None
                    and sig.op == "activation"
                    and sig.attrs["activation"]["fn"] == "sigmoid"
                    and sig.inputs[0] == a
                    and len(consumers.get(b, [])) == 1
                    and b != out_name
                ):
                    n.op, n.inputs = "activation", [a]
                    n.attrs = {"activation": activation("swish")}
                    prog.nodes.remove(sig)
                    return True
    return False


def _channel_vector(value: np.ndarray, cout: int) -> np.ndarray | None:
    """`value` as a [cout] vector if it only varies along the last axis."""
    if value.ndim and any(d != 1 for d in value.shape[:-1]):
        return None
    flat = value.reshape(-1)
    if flat.size not in (1, cout):
        return None
    return np.broadcast_to(flat, (cout,)).astype(np.float64)


def _fuse(
    prog: Program,
    lin: ProgramNode,
    nxt: ProgramNode,
    const_of: dict[str, ProgramNode],
    pshape: Shapes,
) -> bool:
    w = prog.weights
    kernel = w[lin.weights["kernel"]].astype(np.float64)
    cout = kernel.shape[-1]
    bias = w[lin.weights["bias"]].astype(np.float64) if "bias" in lin.weights else np.zeros(cout)
    y = lin.outputs[0]
    rank = len(pshape.get(y, ()))
    if nxt.op == "activation":
        lin.attrs["activation"] = nxt.attrs["activation"]
        return True
    if nxt.op == "scale_shift":
        if rank == 0 or nxt.attrs.get("axis", -1) % rank != rank - 1:
            return False
        scale = w[nxt.weights["scale"]].astype(np.float64)
        shift = w[nxt.weights["shift"]].astype(np.float64)
        kernel, bias = kernel * scale, bias * scale + shift
    elif nxt.op in ("mul", "add", "sub") and len(nxt.inputs) == 2:
        other = [t for t in nxt.inputs if t != y]
        if len(other) != 1 or other[0] not in const_of:
            return False
        if nxt.op == "sub" and nxt.inputs[0] != y:
            return False  # c - x is not an affine fold into the bias alone
        value = w[const_of[other[0]].weights["value"]].astype(np.float64)
        if value.ndim > rank - 1:
            return False
        vec = _channel_vector(value, cout)
        if vec is None:
            return False
        if nxt.op == "mul":
            kernel, bias = kernel * vec, bias * vec
        elif nxt.op == "add":
            bias = bias + vec
        else:
            bias = bias - vec
    else:
        return False
    w[lin.weights["kernel"]] = kernel.astype(np.float32)
    if "bias" not in lin.weights:
        key = f"{lin.name}.bias"
        while key in w:
            key += "_"
        lin.weights["bias"] = key
    w[lin.weights["bias"]] = bias.astype(np.float32)
    return True
