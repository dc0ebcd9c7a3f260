"""Framework-neutral rewrites of an enclave program, run on every adapter's output.

Adapters only translate layer by layer (a Keras BatchNormalization becomes a
`scale_shift`, an ONNX Mul by a constant a `mul`); `optimize` then does the folding and
fusing once for all of them, so a Keras model and its ONNX export ship the same ops.
"""

from __future__ import annotations

import numpy as np

from .program import Program, ProgramNode, activation
from .reference import apply_activation, run_node

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
    dense/conv, merge reshape/transpose chains, turn x * sigmoid(x) into swish, fuse
    add(x, mask) → softmax into a masked softmax and exporters' decomposed layer norms
    and gelus back into `layer_norm` and `gelu`, then drop nodes and weights nothing
    uses. Returns a new program; `program` is unchanged."""
    prog = _copy(program)
    pshape = infer_shapes(prog)
    out_name = prog.outputs[0].name
    while (
        _fuse_linear(prog, pshape, out_name)
        or _simplify(prog, pshape, out_name)
        or _fuse_softmax_mask(prog, pshape, out_name)
        or _fuse_regions(prog, pshape, out_name)
    ):
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


def _fuse_softmax_mask(prog: Program, pshape: Shapes, out_name: str) -> bool:
    """softmax(add(x, mask)) → softmax(x, mask): the attention mask is added in the
    softmax pass instead of in a tensor of its own."""
    consumers = _consumers(prog)
    producers = {n.outputs[0]: n for n in prog.nodes}
    for sm in prog.nodes:
        if sm.op != "activation" or sm.attrs["activation"]["fn"] != "softmax":
            continue
        add = producers.get(sm.inputs[0])
        s = sm.inputs[0]
        if add is None or add.op != "add" or len(add.inputs) != 2 or s == out_name:
            continue
        if len(consumers.get(s, [])) != 1:
            continue
        full = [t for t in add.inputs if pshape.get(t) == pshape.get(s)]
        if not full or pshape.get(full[0], (1,))[0] is not None:
            continue  # x must be the batched operand of the sum's own shape
        x = full[0]
        mask = add.inputs[1] if add.inputs[0] == x else add.inputs[0]
        sm.op, sm.inputs = "softmax", [x, mask]
        sm.attrs = {"axis": sm.attrs["activation"].get("axis", -1)}
        prog.nodes.remove(add)
        return True
    return False


_ELEMENTWISE = ("add", "sub", "mul", "div", "pow", "max", "min")
_REGION_LIMIT = 24  # nodes: exporters' layer norm is about a dozen


def _regions(prog: Program, pshape: Shapes, x: str) -> list[list[ProgramNode]]:
    """Closed elementwise regions starting at x, smallest first: node sets whose only
    computed input is x, built from elementwise ops, activations and mean reductions
    over the last axis, whose only output read outside is the last node's."""
    consumers = _consumers(prog)
    const = {n.outputs[0] for n in prog.nodes if n.op == "constant"}
    rank = len(pshape.get(x, ()))
    inside, region = {x}, []
    for n in prog.nodes:
        if len(region) >= _REGION_LIMIT:
            break
        if not any(t in inside for t in n.inputs) or not all(
            t in inside or t in const for t in n.inputs
        ):
            continue
        ok = (
            n.op in _ELEMENTWISE
            or (n.op == "activation" and n.attrs["activation"]["fn"] != "softmax")
            or (
                n.op == "reduce"
                and n.attrs.get("kind") == "mean"
                and [a % rank for a in n.attrs.get("axes", [])] == [rank - 1]
                and n.attrs.get("keepdims", False)
            )
        )
        if ok and pshape.get(n.outputs[0], ())[:1] == (None,):
            region.append(n)
            inside.add(n.outputs[0])
    out: list[list[ProgramNode]] = []
    for i, end in enumerate(region):
        members = {end.outputs[0]}
        for n in reversed(region[: i + 1]):
            if n.outputs[0] in members:
                members.update(t for t in n.inputs if t != x)
        nodes = [n for n in region[: i + 1] if n.outputs[0] in members]
        names = {id(n) for n in nodes}
        closed = all(
            n is end or all(id(m) in names for m in consumers.get(n.outputs[0], [])) for n in nodes
        )
        if closed and len(nodes) >= 3 and pshape.get(end.outputs[0]) == pshape.get(x):
            out.append(nodes)
    return out


def _run_region(
    prog: Program, nodes: list[ProgramNode], x: str, value: np.ndarray
) -> dict[str, np.ndarray]:
    """Every value the region's nodes compute from x = `value` (float64)."""
    env = {x: value}
    for n in prog.nodes:
        if n.op == "constant":
            env[n.outputs[0]] = run_node(n, [], prog.weights)
    with np.errstate(all="ignore"):
        for n in nodes:
            env[n.outputs[0]] = np.asarray(run_node(n, [env[t] for t in n.inputs], prog.weights))
    return env


def _gelu_probe(shape: tuple) -> np.ndarray:
    values = np.linspace(-8.0, 8.0, 1601)
    per_sample = int(np.prod(shape[1:]))
    rows = -(-values.size // per_sample)  # enough samples to hold every probe value
    return np.resize(values, (rows, *shape[1:]))


def _as_gelu(got: np.ndarray, wants: list[tuple[dict, np.ndarray]]) -> dict | None:
    """The gelu activation (exact or tanh form) whose values on the probe, `wants`,
    are `got`, if any."""
    for act, want in wants:
        if np.allclose(got, want, rtol=1e-5, atol=1e-6):
            return act
    return None


def _ln_probe(shape: tuple) -> np.ndarray:
    rng = np.random.default_rng(0)
    h = int(shape[-1])
    rows = max(8, 64 // max(1, int(np.prod(shape[1:-1]))))
    # Rows of very different scales: small ones tell epsilon apart.
    scales = np.logspace(-3, 1, rows).reshape(rows, *[1] * (len(shape) - 1))
    return rng.standard_normal((rows, *shape[1:])) * scales + rng.standard_normal(h)


def _as_layer_norm(
    prog: Program, nodes: list[ProgramNode], probe: np.ndarray, got: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray] | None:
    """(epsilon, gamma, beta) of the layer norm over the last axis that maps `probe`
    to `got`, if it is one; epsilon is one of the region's scalar constants."""
    eps_candidates = sorted(
        {
            float(prog.weights[n.weights["value"]].reshape(-1)[0])
            for n in prog.nodes
            if n.op == "constant"
            and prog.weights[n.weights["value"]].size == 1
            and any(n.outputs[0] in m.inputs for m in nodes)
        }
    )
    h = probe.shape[-1]
    flat_x, flat_y = probe.reshape(-1, h), got.reshape(-1, h)
    mean = flat_x.mean(axis=1, keepdims=True)
    var = ((flat_x - mean) ** 2).mean(axis=1, keepdims=True)
    for eps in (e for e in eps_candidates if 0 < e < 0.1):
        z = (flat_x - mean) / np.sqrt(var + eps)
        # Per channel, y = gamma·z + beta by least squares, then checked everywhere.
        zm, ym = z.mean(axis=0), flat_y.mean(axis=0)
        cov = ((z - zm) * (flat_y - ym)).mean(axis=0)
        gamma = cov / np.maximum(((z - zm) ** 2).mean(axis=0), 1e-300)
        beta = ym - gamma * zm
        if np.allclose(z * gamma + beta, flat_y, rtol=1e-4, atol=1e-5):
            return eps, gamma, beta
    return None


def _fuse_regions(prog: Program, pshape: Shapes, out_name: str) -> bool:
    """Exporters' decomposed layer norm (ReduceMean, Sub, Pow or Mul, ReduceMean, Add
    eps, Sqrt, Div or Reciprocal·Mul, Mul gamma, Add beta, in tf2onnx's and torch's
    orders) → `layer_norm` on the last axis, and decomposed gelu (x·0.5·(1 + erf(x/√2)),
    0.5·x·erfc(−x/√2) as 1 − erf, the tanh form) → the `gelu` activation. A region is
    recognised by what it computes, not by its node order: it is run in float64 on
    probe inputs and compared with the fused op (layer norm's gamma and beta are fitted
    per channel, epsilon is one of the region's constants)."""
    fns = {"erf", "tanh"}
    starts = [prog.inputs[0].name, *[n.outputs[0] for n in prog.nodes if n.op != "constant"]]
    gelu_wants: dict[tuple, list[tuple[dict, np.ndarray]]] = {}
    fused = False
    for x in starts:  # one pass fuses every region it finds
        consumers = _consumers(prog)
        shape = pshape.get(x)
        if not shape or len(consumers.get(x, [])) < 2 or x == out_name:
            continue
        best = None
        candidates = [
            nodes
            for nodes in _regions(prog, pshape, x)
            if not any(n.outputs[0] == out_name for n in nodes[:-1])
        ]
        # Each probe runs once over every node of the candidates (a node's value does
        # not depend on which candidate it is judged in).
        ids = {id(n) for c in candidates for n in c}
        everything = [n for n in prog.nodes if id(n) in ids]
        lns = [c for c in candidates if any(n.op == "reduce" for n in c)]
        gelus = [
            c
            for c in candidates
            if c not in lns
            and any(n.op == "activation" and n.attrs["activation"]["fn"] in fns for n in c)
        ]
        if lns:
            probe = _ln_probe(shape)
            env = _run_region(prog, everything, x, probe)
            for nodes in lns:
                found = _as_layer_norm(prog, nodes, probe, env[nodes[-1].outputs[0]])
                if found is not None:
                    best = (nodes, "layer_norm", found)
        if gelus and best is None:
            probe = _gelu_probe(shape)
            if shape not in gelu_wants:
                acts = [activation("gelu", approximate=a) for a in (False, True)]
                gelu_wants[shape] = [(a, apply_activation(probe, a)) for a in acts]
            env = _run_region(prog, everything, x, probe)
            for nodes in gelus:
                act = _as_gelu(env[nodes[-1].outputs[0]], gelu_wants[shape])
                if act is not None:
                    best = (nodes, "gelu", act)
        if best is None:
            continue
        nodes, kind, found = best
        end = nodes[-1]
        for n in nodes[:-1]:
            prog.nodes.remove(n)
        end.inputs = [x]
        if kind == "gelu":
            end.op, end.attrs, end.weights = "activation", {"activation": found}, {}
        else:
            eps, gamma, beta = found
            end.op, end.attrs = "layer_norm", {"axes": [-1], "epsilon": eps}
            end.weights = {}
            for role, value in (("gamma", gamma), ("beta", beta)):
                key = f"{end.name}.{role}"
                while key in prog.weights:
                    key += "_"
                prog.weights[key] = value.astype(np.float32)
                end.weights[role] = key
        fused = True
    return fused
