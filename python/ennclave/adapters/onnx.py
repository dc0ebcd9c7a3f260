"""ONNX adapter: graph view, public-part extraction and lowering to enclave programs.

ONNX tensors are channels-first (NCHW) while enclave programs are channels-last.
Rather than wrapping every spatial op in a transpose pair and cancelling pairs later,
lowering tracks, for every ONNX tensor, the program tensor that holds it *and* the
permutation between the two (`_Val.perm`). Transposes are then materialised only when
an op needs a layout the value is not already in; ONNX `Transpose` nodes become free
relabelings. A Keras model exported with tf2onnx (NHWC input, Transpose -> Conv ->
Transpose) therefore lowers without a single transpose node.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._deps import require
from ..errors import CutError, InputError, ModelLoadError, UnsupportedOpError
from ..graph import CutPoint, GraphView, Node, TensorInfo
from ..program import Program, ProgramBuilder, activation
from .base import ModelAdapter, Translators

MIN_OPSET = 13
# Older models are upgraded to MIN_OPSET with the onnx version converter, which starts at 7.
MIN_CONVERTIBLE_OPSET = 7

# Batch sizes substituted for the symbolic batch dim when folding Shape-dependent
# constants: a value that differs between the probes depends on the batch size.
_PROBES = (7, 11)

_UNARY_ACTIVATIONS = {
    "Relu": "relu",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "Erf": "erf",
    "Sqrt": "sqrt",
    "Exp": "exp",
    "Log": "log",
    "Abs": "abs",
    "Neg": "neg",
    "Reciprocal": "reciprocal",
}
_BINARY = {
    "Add": "add",
    "Sub": "sub",
    "Mul": "mul",
    "Div": "div",
    "Pow": "pow",
    "Max": "max",
    "Min": "min",
    "Sum": "add",
}
_REDUCE = {"ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "max", "ReduceMin": "min"}
_ALIASES = ("Identity", "Dropout", "Cast")
# Ops that only move or compare values: exact on integer ids (which travel as floats),
# so they may read them; the shape ops' outputs are still ids.
_ID_SHAPE_OPS = ("Identity", "Unsqueeze", "Squeeze", "Reshape", "Expand", "Transpose", "Flatten")
_COMPARE = ("Less", "Greater", "LessOrEqual", "GreaterOrEqual")
# Integer Add/Sub/Mul of ids, 0/1 flags and integer constants are exact in float32
# below 2^24 (Keras's Embedding wraps negative ids as where(ids < 0, ids + V, ids));
# Div, Pow, Mod would round differently.
_ID_ARITH = ("Add", "Sub", "Mul")
_ID_EXACT_OPS = (*_ID_SHAPE_OPS, *_ID_ARITH, *_COMPARE, "Cast", "Equal", "Where", "Not")
# Ops that turn model inputs into attention masks: what they compute from pass-through
# inputs alone is computed again on the private side (GraphView.passthrough).
_MASK_OPS = (*_ID_EXACT_OPS, "Slice", "Neg", "Div")
# Operator type -> translator; filled by @OPS.register on `_Lowering` below.
OPS = Translators()
# Ops that treat dim 0 like any row index, so a batch merged with other dims is fine.
_ROWWISE = {
    *_UNARY_ACTIVATIONS,
    *_BINARY,
    *_ALIASES,
    "MatMul",
    "Gemm",
    "Reshape",
    "LeakyRelu",
    "Elu",
    "Selu",
    "HardSigmoid",
    "HardSwish",
    "Gelu",
    "Clip",
    "PRelu",
    "Softmax",
    "LayerNormalization",
    "Equal",
    "Where",
    "Not",
    "Transpose",
}
# Ops whose outputs are static even for dynamic inputs (given static non-batch dims).
_SHAPE_OPS = ("Shape", "Size")

# ONNX Runtime's input type strings -> numpy dtypes (for feeding probe inputs).
_ONNX_TYPE_TO_NP = {
    "tensor(float)": np.float32,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
}

_ONNX_TO_NP = {
    1: "float32",
    2: "uint8",
    3: "int8",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
    16: "bfloat16",
}


def _np_dtype(dtype: str) -> Any:
    """The numpy dtype to feed an input of `dtype` (a TensorInfo dtype) with."""
    return np.dtype(dtype) if dtype.startswith(("int", "uint", "bool")) else np.float32


def _inv(perm: tuple[int, ...]) -> tuple[int, ...]:
    out = [0] * len(perm)
    for i, p in enumerate(perm):
        out[p] = i
    return tuple(out)


def _ident(rank: int) -> tuple[int, ...]:
    return tuple(range(rank))


def _channels_last(rank: int) -> tuple[int, ...]:
    return (0, *range(2, rank), 1)


@dataclass(frozen=True)
class _Val:
    """An ONNX tensor during lowering: program tensor `name` holds
    `np.transpose(onnx_value, perm)`; `shape` is the ONNX (logical) shape."""

    name: str
    perm: tuple[int, ...]
    shape: tuple[int | None, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def pshape(self) -> tuple[int | None, ...]:
        return tuple(self.shape[p] for p in self.perm)

    def phys_axis(self, logical_axis: int) -> int:
        return self.perm.index(logical_axis % self.rank)


def _attrs(node: Any) -> dict[str, Any]:
    onnx = require("onnx")
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _s(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _as_shipped(model: Any, file: str, input_shapes: dict[str, tuple[int, ...]]) -> Any:
    """A model as exporters ship it, made ready for splitting: batch dims written as
    -1 or 0 become symbolic, dims fixed by `input_shapes` (``--input-shape``) are set,
    opsets 7-12 are upgraded to 13 with the onnx version converter, and every graph
    input must then have static non-batch dims."""
    onnx = require("onnx")
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    # -1 / 0 are not valid dims (the converter and numpy reject them): make them free.
    for vi in [*inputs, *model.graph.output, *model.graph.value_info]:
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value <= 0:
                d.dim_param = "N" if i == 0 else f"{vi.name}_{i}"
    unknown = set(input_shapes) - {i.name for i in inputs}
    if unknown:
        raise ModelLoadError(
            f"--input-shape names {', '.join(sorted(unknown))}, which {file} does not take; "
            f"its inputs are {', '.join(i.name for i in inputs)}."
        )
    for vi in inputs:
        if vi.name not in input_shapes:
            continue
        dims, want = vi.type.tensor_type.shape.dim, input_shapes[vi.name]
        if len(want) != len(dims):
            raise ModelLoadError(
                f"--input-shape gives {vi.name} {len(want)} dimensions, but it has {len(dims)}."
            )
        for i, (d, v) in enumerate(zip(dims, want, strict=True)):
            if i == 0:
                continue  # the batch stays free
            if d.HasField("dim_value") and d.dim_value != v:
                raise ModelLoadError(
                    f"--input-shape sets dimension {i} of {vi.name} to {v}, but the model "
                    f"fixes it at {d.dim_value}."
                )
            d.dim_value = int(v)
        del model.graph.value_info[:]  # inferred for the old dims: infer again
    opset = _opset(model)
    if opset < MIN_CONVERTIBLE_OPSET:
        raise ModelLoadError(
            f"{file} uses ONNX opset {opset}; ennclave reads opset {MIN_CONVERTIBLE_OPSET} and "
            "later, so re-export it with a newer opset."
        )
    if opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as e:
            raise ModelLoadError(
                f"{file} uses ONNX opset {opset} and the onnx version converter cannot upgrade "
                f"it to {MIN_OPSET} ({type(e).__name__}: {e}); re-export it with opset "
                f"{MIN_OPSET} or later."
            ) from None
    for vi in (i for i in model.graph.input if i.name not in inits):
        dims = vi.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims[1:]):
            shown = "x".join(
                d.dim_param or "?" if not d.HasField("dim_value") else str(d.dim_value)
                for d in dims
            )
            example = "x".join(
                ["1", *[str(d.dim_value) if d.HasField("dim_value") else "224" for d in dims[1:]]]
            )
            raise ModelLoadError(
                f"The input {vi.name} of {file} has dynamic dimensions ({shown}) and the "
                f"enclave needs static ones: fix them with --input-shape {vi.name}={example} "
                "(your sizes; the first dimension is the batch and stays free)."
            )
    _replace_erfc(model)
    return model


def _keep_output(model: Any, file: str, output: str | None) -> None:
    """Make `model` end in the one graph output `output` (the enclave program has one
    output): the other outputs and every node and initializer only they need are
    dropped, so cut points and the public part see only what that output needs. A
    model of several outputs needs the choice; one of one output may name it."""
    g = model.graph
    names = [o.name for o in g.output]
    if output is None:
        if len(names) > 1:
            raise ModelLoadError(
                f"{file} has {len(names)} outputs ({', '.join(names)}) and a split model ends "
                f"in one: choose it with --model-output NAME (Python: output=NAME), e.g. "
                f"--model-output {names[0]}."
            )
        return
    if output not in names:
        raise ModelLoadError(
            f"--model-output {output!r} is not an output of {file}; its outputs are {', '.join(names)}."
        )
    if len(names) == 1:
        return
    keep_out = [o for o in g.output if o.name == output]
    needed = {output}
    kept: set[int] = set()
    changed = True
    while changed:  # a fixpoint: the file's node order need not be topological
        changed = False
        for i in range(len(g.node) - 1, -1, -1):
            n = g.node[i]
            if i not in kept and any(t in needed for t in n.output):
                kept.add(i)
                needed.update(t for t in n.input if t)
                changed = True
    nodes = [n for i, n in enumerate(g.node) if i in kept]
    inits = [t for t in g.initializer if t.name in needed]
    dropped = {t.name for t in g.initializer} - needed
    ins = [i for i in g.input if i.name not in dropped]  # old IRs list initializers too
    del g.input[:]
    g.input.extend(ins)
    del g.output[:]
    g.output.extend(keep_out)
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(inits)
    produced = {t for n in nodes for t in n.output}
    vis = [vi for vi in g.value_info if vi.name in produced]
    del g.value_info[:]
    g.value_info.extend(vis)


def _replace_erfc(model: Any) -> None:
    """tf2onnx cannot convert TensorFlow's Erfc (Keras's exact gelu is
    0.5·x·erfc(−x/√2)) and leaves it in the default domain, where ONNX has no such
    operator and ONNX Runtime refuses the model: rewrite each as 1 − Erf(x), which
    ONNX Runtime runs and the passes fuse back into gelu."""
    onnx = require("onnx")
    g = model.graph
    if not any(n.op_type == "Erfc" and n.domain in ("", "ai.onnx") for n in g.node):
        return
    one = "ennclave_erfc_one"
    g.initializer.append(onnx.numpy_helper.from_array(np.array(1.0, np.float32), one))
    nodes = []
    for n in g.node:
        if n.op_type != "Erfc" or n.domain not in ("", "ai.onnx"):
            nodes.append(n)
            continue
        erf = f"{n.output[0]}_erf"
        nodes.append(onnx.helper.make_node("Erf", [n.input[0]], [erf], name=f"{n.name}_erf"))
        nodes.append(onnx.helper.make_node("Sub", [one, erf], [n.output[0]], name=n.name))
    del g.node[:]
    g.node.extend(nodes)


class OnnxAdapter(ModelAdapter):
    framework = "onnx"
    public_suffix = ".onnx"

    def __init__(
        self,
        path: Path,
        input_shapes: dict[str, tuple[int, ...]] | None = None,
        output: str | None = None,
    ) -> None:
        super().__init__(Path(path))
        onnx = require("onnx")
        try:
            model = onnx.load(str(self.path))
        except Exception as e:  # protobuf raises DecodeError, OSError, ...
            raise ModelLoadError(
                f"{self.path.name} is not a readable ONNX model ({type(e).__name__}: {e})."
            ) from None
        model = _as_shipped(model, self.path.name, input_shapes or {})
        _keep_output(model, self.path.name, output)
        self.opset = _opset(model)
        try:
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception as e:
            raise ModelLoadError(
                f"ONNX shape inference failed on {self.path.name} ({e}); check the model "
                f"with onnx.checker.check_model."
            ) from None
        self.model = model
        self._graph: GraphView | None = None
        self._session: Any = None
        self._const_cache: dict[int, dict[str, np.ndarray]] | None = None
        self._probed: dict[str, tuple[int | None, ...]] | None = None

    # -- graph view --------------------------------------------------------------
    @property
    def graph(self) -> GraphView:
        if self._graph is None:
            self._graph = self._build_graph()
        return self._graph

    def _initializers(self) -> dict[str, Any]:
        return {t.name: t for t in self.model.graph.initializer}

    def _build_graph(self) -> GraphView:
        g = self.model.graph
        inits = self._initializers()
        for n in g.node:
            if n.op_type in ("If", "Loop", "Scan"):
                raise ModelLoadError(
                    f"Node {n.name or n.op_type!r} is a control-flow op ({n.op_type}), which "
                    f"ennclave cannot split; export the model without control flow."
                )

        # Every tensor's type: graph inputs/outputs, value_info, initializers.
        types: dict[str, tuple[str, tuple[int | None, ...] | None]] = {}
        for vi in [*g.input, *g.value_info, *g.output]:
            tt = vi.type.tensor_type
            shape = None
            if tt.HasField("shape"):
                shape = tuple(
                    d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim
                )
            types[vi.name] = (_ONNX_TO_NP.get(tt.elem_type, str(tt.elem_type)), shape)
        for t in g.initializer:
            types[t.name] = (_ONNX_TO_NP.get(t.data_type, str(t.data_type)), tuple(t.dims))

        # Name every node uniquely (ONNX names may be empty or repeated).
        names: set[str] = set()
        protos: list[tuple[str, Any]] = []
        for i, n in enumerate(g.node):
            name = n.name or f"{n.op_type}_{i}"
            while name in names:
                name = f"{name}_{i}"
            names.add(name)
            protos.append((name, n))

        # Topological sort (stable: keeps file order where it is already valid).
        graph_inputs = [i.name for i in g.input if i.name not in inits]
        available = set(graph_inputs) | set(inits) | {""}
        pending = list(protos)
        ordered: list[tuple[str, Any]] = []
        while pending:
            rest = []
            for name, n in pending:
                if all(t in available for t in n.input):
                    ordered.append((name, n))
                    available.update(n.output)
                else:
                    rest.append((name, n))
            if len(rest) == len(pending):
                missing = sorted({t for _, n in rest for t in n.input if t not in available})
                raise ModelLoadError(
                    f"{self.path.name} has a cycle or undefined tensors ({missing[:3]}); "
                    f"check it with onnx.checker.check_model."
                )
            pending = rest

        # Constant tensors: no dependence on a graph input (Shape/Size outputs count as
        # constant: they only depend on the batch size, which folding handles).
        const: set[str] = set(inits)
        for _, n in ordered:
            ins = [t for t in n.input if t]
            if n.op_type in _SHAPE_OPS or all(t in const for t in ins):
                const.update(n.output)

        def info(name: str) -> TensorInfo:
            dtype, shape = types.get(name, ("float32", None))
            if shape is None:
                shape = ()
            if name not in const and len(shape) > 0:
                shape = (None, *shape[1:])  # dim 0 of a dynamic tensor is the batch
            return TensorInfo(name, tuple(shape), dtype)

        tensors: dict[str, TensorInfo] = {}
        for name in types:
            tensors[name] = info(name)
        for _, n in ordered:
            for t in [*n.input, *n.output]:
                if t and t not in tensors:
                    tensors[t] = info(t)
        self._fill_shapes_by_running(tensors, const, graph_inputs)

        # Float leaves (initializers, Constant outputs) count as parameters once, at
        # their first consumer.
        leaf_sizes = {
            t.name: int(np.prod(t.dims)) for t in g.initializer if t.data_type in (1, 10, 11, 16)
        }
        for _, n in ordered:
            if n.op_type == "Constant":
                a = n.attribute[0] if n.attribute else None
                if a is not None and a.name == "value" and a.t.data_type in (1, 10, 11, 16):
                    leaf_sizes[n.output[0]] = int(np.prod(a.t.dims))
        counted: set[str] = set()
        nodes: list[Node] = []
        for name, n in ordered:
            params = 0
            for t in n.input:
                if t in leaf_sizes and t not in counted:
                    counted.add(t)
                    params += leaf_sizes[t]
            nodes.append(
                Node(
                    name=name,
                    op_type=n.op_type,
                    inputs=[t for t in n.input if t],
                    outputs=list(n.output),
                    params=params,
                    flops=self._flops(n, tensors, const),
                    trainable=None,
                    handle=n,
                )
            )
        view = GraphView(
            framework="onnx",
            inputs=[tensors[t] for t in graph_inputs],
            outputs=[tensors[o.name] for o in g.output],
            nodes=nodes,
            tensors=tensors,
            constant_tensors=const,
            passthrough=self._passthrough(ordered, tensors, graph_inputs, const),
        )
        view.uncuttable = self._batch_merged(view) | self._inside_layer_norms(view)
        return view

    @staticmethod
    def _inside_layer_norms(view: GraphView) -> set[str]:
        """The tensors inside an exporter's decomposed layer norm (x − mean(x), its
        quotient by the std, and that times gamma, before + beta): each alone crosses
        the graph there, but a cut at one would split the layer norm that the passes
        fuse, and list every block's norms several times in the plan."""
        producer = {t: n for n in view.nodes for t in n.outputs}
        readers: dict[str, list[Node]] = {}
        for n in view.nodes:
            for t in n.inputs:
                readers.setdefault(t, []).append(n)
        inside: set[str] = set()
        for sub in view.nodes:
            mean = producer.get(sub.inputs[1]) if sub.op_type == "Sub" and sub.inputs[1:] else None
            if mean is None or mean.op_type != "ReduceMean" or mean.inputs[0] != sub.inputs[0]:
                continue
            t = sub.outputs[0]
            inside.add(t)
            div = [r for r in readers.get(t, []) if r.op_type == "Div" and r.inputs[0] == t]
            if len(div) != 1:
                continue
            t = div[0].outputs[0]
            for op in ("Mul", "Add"):
                nxt = readers.get(t, [])
                if len(nxt) != 1 or nxt[0].op_type != op:
                    break
                inside.add(t)
                t = nxt[0].outputs[0]
        return inside

    @staticmethod
    def _passthrough(
        ordered: list[tuple[str, Any]],
        tensors: dict[str, TensorInfo],
        graph_inputs: list[str],
        const: set[str],
    ) -> set[str]:
        """Tensors that may cross a cut beside the cut tensor (GraphView.passthrough):
        the inputs of a model of several inputs and integer inputs (BERT's
        attention_mask and token ids, which the blocks read again after the embeddings),
        and what mask ops compute from them alone (the extended mask (1 − mask)·min,
        casts and comparisons of ids), which the private side computes again. An
        embedding lookup (Gather of a table) is no mask op: its output is a cut."""
        through = {
            t
            for t in graph_inputs
            if len(graph_inputs) > 1 or tensors[t].dtype.startswith(("int", "uint", "bool"))
        }
        for _, n in ordered:
            ins = [t for t in n.input if t and t not in const]
            if n.op_type in _MASK_OPS and ins and all(t in through for t in ins):
                through.update(t for t in n.output if t)
        return through

    def _fill_shapes_by_running(
        self, tensors: dict[str, TensorInfo], const: set[str], graph_inputs: list[str]
    ) -> None:
        """Shapes static inference left unknown (a Reshape to a computed shape, as
        exporters write flattens) are read off one run of the model: a cut there needs
        them, for the plan's table and for the public part's output."""
        missing = [
            t
            for t, info in tensors.items()
            if t not in const
            and t not in graph_inputs
            and (not info.shape or any(d is None for d in info.shape[1:]))
        ]
        if not missing:
            return
        feeds = {}
        for name in graph_inputs:
            inp = tensors[name]
            dims = (1, *[int(d or 1) for d in inp.shape[1:]])
            # Zeros are valid for every integer input (ids index row 0).
            feeds[name] = np.zeros(dims, dtype=_np_dtype(inp.dtype))
        for t, shape in self._probe_shapes(missing, feeds).items():
            if t in tensors and shape:
                tensors[t] = TensorInfo(t, shape, tensors[t].dtype)

    def _batch_merged(self, view: GraphView) -> set[str]:
        """Tensors whose dim 0 is not the batch (a Reshape merged it with other dims,
        as tf2onnx does for Keras Dense on 3-D inputs): a public part ending there
        would hand the enclave rows, not samples. Found by running the model once."""
        reshapes = [
            n
            for n in view.nodes
            if n.op_type in ("Reshape", "Flatten") and n.inputs[0] not in view.constant_tensors
        ]
        if len(view.inputs) != 1 or not reshapes:
            return set()
        dim0 = view.inputs[0]
        fixed = next(
            (
                vi.type.tensor_type.shape.dim[0].dim_value
                for vi in self.model.graph.input
                if vi.name == dim0.name
                and len(vi.type.tensor_type.shape.dim)
                and vi.type.tensor_type.shape.dim[0].HasField("dim_value")
            ),
            0,
        )
        batch = fixed or 3
        names = [t for n in view.nodes for t in n.outputs if t not in view.constant_tensors and t]
        shape = (batch, *[int(d or 1) for d in dim0.shape[1:]])
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        shapes = self._probe_shapes(names, {dim0.name: x}, keep_batch=True)
        return {t for t, s in shapes.items() if s and s[0] != batch}

    @staticmethod
    def _flops(n: Any, tensors: dict[str, TensorInfo], const: set[str]) -> int:
        """Rough multiply-add count per sample (2 per MAC); elements for other ops."""
        if all(t in const for t in n.output):
            return 0
        out = tensors.get(n.output[0])
        out_el = out.elements_per_sample if out else 0
        if n.op_type in ("MatMul", "Gemm") and len(n.input) >= 2:
            a = tensors.get(n.input[0])
            k = 0
            if a and a.shape:
                k = int(
                    a.shape[0]
                    if (n.op_type == "Gemm" and _attrs(n).get("transA", 0))
                    else a.shape[-1] or 0
                )
            return 2 * out_el * k
        if n.op_type == "Conv" and len(n.input) >= 2:
            w = tensors.get(n.input[1])
            if w and len(w.shape) >= 3:
                per_out = int(np.prod([d or 1 for d in w.shape[1:]]))
                return 2 * out_el * per_out
        return out_el

    def node_weights(self) -> dict[str, list[np.ndarray]]:
        numpy_helper = require("onnx.numpy_helper")
        inits = self._initializers()
        out: dict[str, list[np.ndarray]] = {}
        for node in self.graph.nodes:
            ws = [numpy_helper.to_array(inits[t]) for t in node.inputs if t in inits]
            if ws:
                out[node.name] = ws
        return out

    # -- running -----------------------------------------------------------------
    @staticmethod
    def _run(session: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The first output for `feeds` (model input name -> batch)."""
        inputs = {i.name: i for i in session.get_inputs()}
        # Old-IR models may list initializers as inputs too: feed only what is given.
        feeds = {
            k: np.asarray(v, dtype=_ONNX_TYPE_TO_NP.get(inputs[k].type, np.float32))
            for k, v in feeds.items()
            if k in inputs
        }
        first = inputs[next(iter(feeds))]
        n = len(next(iter(feeds.values())))
        fixed = first.shape[0] if first.shape and isinstance(first.shape[0], int) else None
        if fixed is None or fixed == n:
            return np.asarray(session.run(None, feeds)[0])
        if n % fixed:
            raise ModelLoadError(
                f"The model's batch size is fixed at {fixed}; pass a multiple of it."
            )
        # A model exported with a fixed batch size runs chunk by chunk.
        parts = [
            session.run(None, {k: v[i : i + fixed] for k, v in feeds.items()})[0]
            for i in range(0, n, fixed)
        ]
        return np.concatenate(parts)

    def _feeds(self, x: Any) -> dict[str, np.ndarray]:
        """Model inputs by name from an array (one input), a list in model-input order
        or a dict by name."""
        names = [t.name for t in self.graph.inputs]
        if isinstance(x, dict):
            return {k: np.asarray(x[k]) for k in names}
        xs = list(x) if isinstance(x, (list, tuple)) else [x]
        if len(xs) != len(names):
            raise InputError(
                f"The model takes {len(names)} inputs {names}, got {len(xs)}; pass a list "
                "in this order or a dict by name."
            )
        return {k: np.asarray(v) for k, v in zip(names, xs, strict=True)}

    @staticmethod
    def _open_session(model_bytes_or_path: Any) -> Any:
        ort = require("onnxruntime")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        return ort.InferenceSession(
            model_bytes_or_path, sess_options=opts, providers=["CPUExecutionProvider"]
        )

    def random_inputs(self, n: int, rng: np.random.Generator) -> Any:
        """Floats in [0, 1), or, for integer inputs (token ids, byte values), ids below
        the row count of the smallest table a Gather looks them up in (2 without one);
        an integer or bool input named like a mask (`attention_mask`) gets a padding
        mask: ones, then zeros after a random length (at least one). A model of several
        inputs: a list in model-input order."""
        xs = [self._random_input(inp, n, rng) for inp in self.graph.inputs]
        return xs[0] if len(xs) == 1 else xs

    def _random_input(self, inp: TensorInfo, n: int, rng: np.random.Generator) -> np.ndarray:
        shape = (n, *[int(d or 1) for d in inp.shape[1:]])
        if inp.dtype not in ("int32", "int64", "uint8", "int8", "int16", "bool"):
            return rng.random(shape, dtype=np.float32)  # see ModelAdapter.random_inputs
        if "mask" in inp.name.lower() and len(shape) > 1:
            keep = rng.integers(1, shape[-1] + 1, size=(n, *shape[1:-1], 1))
            return (np.arange(shape[-1]) < keep).astype(_np_dtype(inp.dtype))
        inits = self._initializers()
        # The tables the ids index, also through casts (torch writes Cast → Gather).
        names = {inp.name}
        for m in self.graph.nodes:
            if m.op_type in ("Cast", "Identity") and m.inputs and m.inputs[0] in names:
                names.update(m.outputs)
        rows = [
            int(inits[m.inputs[0]].dims[int(_attrs(m.handle).get("axis", 0))])
            for m in self.graph.nodes
            if m.op_type == "Gather"
            and len(m.inputs) > 1
            and m.inputs[1] in names
            and m.inputs[0] in inits
        ]
        return rng.integers(0, min(rows, default=2), size=shape).astype(_np_dtype(inp.dtype))

    def predict(self, x: Any) -> np.ndarray:
        """The model's output for `x`: an array, or for a model of several inputs a
        list in model-input order or a dict by name."""
        if self._session is None:
            self._session = self._open_session(self.model.SerializeToString())
        return self._run(self._session, self._feeds(x))

    # -- public part -------------------------------------------------------------
    def save_public(self, cut: CutPoint, path: Path) -> None:
        onnx = require("onnx")
        if cut.position == 0:
            raise CutError("Cut 0 has no public part: the whole model is private.")
        g = self.model.graph
        target = cut.tensor.name
        public = self.graph.nodes[: cut.position]
        # Keep only what the cut tensor needs (dead branches would be wasted work).
        needed = {target}
        keep: list[Node] = []
        for node in reversed(public):
            if any(t in needed for t in node.outputs):
                keep.append(node)
                needed.update(node.inputs)
        keep.reverse()
        if not keep:
            raise CutError(f"Nothing in the model computes the cut tensor {target!r}.")
        vinfo = {vi.name: vi for vi in [*g.input, *g.value_info, *g.output]}
        known = target in vinfo and vinfo[target].type.tensor_type.HasField("shape")
        if known:
            out_vi = onnx.ValueInfoProto()
            out_vi.CopyFrom(vinfo[target])
        else:  # inference left it unknown: the shape read off a run of the model
            out_vi = onnx.helper.make_tensor_value_info(
                target, onnx.TensorProto.FLOAT, [None if d is None else d for d in cut.tensor.shape]
            )
        inits = [t for t in g.initializer if t.name in needed]
        init_names = {t.name for t in inits}
        inputs = [i for i in g.input if i.name in needed and i.name not in init_names]
        inner = {t for n in keep for t in n.outputs} | {i.name for i in inputs}
        value_info = [vi for vi in g.value_info if vi.name in inner and vi.name != target]
        graph = onnx.helper.make_graph(
            [n.handle for n in keep],
            f"{g.name or 'model'}_public",
            inputs,
            [out_vi],
            initializer=inits,
            value_info=value_info,
        )
        model = onnx.helper.make_model(
            graph,
            opset_imports=list(self.model.opset_import),
            producer_name="ennclave",
            ir_version=self.model.ir_version,
        )
        model.functions.extend(self.model.functions)
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as e:
            raise CutError(f"The extracted public part is not a valid ONNX model ({e}).") from None
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))

    # -- constant folding --------------------------------------------------------
    def _shapes(self) -> dict[str, tuple[int | None, ...]]:
        """Logical shapes of dynamic tensors (batch None); runs the model once to fill
        in what static shape inference could not work out."""
        shapes = {k: v.shape for k, v in self.graph.tensors.items()}
        missing = [
            t
            for n in self.graph.nodes
            for t in n.outputs
            if t not in self.graph.constant_tensors
            and (not shapes.get(t) or any(d is None for d in shapes[t][1:]))
        ]
        if missing and self._probed is None:
            x = self.random_inputs(1, np.random.default_rng(0))
            self._probed = self._probe_shapes(missing, self._feeds(x))
        if self._probed:
            shapes.update(self._probed)
        return shapes

    def _probe_shapes(
        self, names: list[str], feeds: dict[str, np.ndarray], keep_batch: bool = False
    ) -> dict[str, tuple[int | None, ...]]:
        onnx = require("onnx")
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        have = {o.name for o in m.graph.output}
        for t in names:
            if t not in have:
                m.graph.output.append(onnx.ValueInfoProto(name=t))
        try:
            sess = self._open_session(m.SerializeToString())
            outs = sess.run([o.name for o in sess.get_outputs()], feeds)
        except Exception:
            return {}
        return {
            o.name: (np.shape(v) if keep_batch else (None, *np.shape(v)[1:])) if np.ndim(v) else ()
            for o, v in zip(sess.get_outputs(), outs, strict=True)
        }

    def _constants(self) -> dict[int, dict[str, np.ndarray]]:
        """Values of every constant tensor, once per probe batch size."""
        if self._const_cache is not None:
            return self._const_cache
        numpy_helper = require("onnx.numpy_helper")
        reference = require("onnx.reference")
        g = self.graph
        # Probed shapes too: a Shape of a tensor that static inference left unknown
        # (torch's x.view(x.size(0), -1)) is still known once the model has run.
        shapes = self._shapes()
        base = {t.name: numpy_helper.to_array(t) for t in self.model.graph.initializer}
        opsets = {o.domain or "": o.version for o in self.model.opset_import}
        # A fixed batch size is the only one the model knows; otherwise probe two, and
        # only if some Shape/Size actually reads a computed tensor.
        fixed = 0
        for vi in self.model.graph.input:
            if g.inputs and vi.name == g.inputs[0].name:
                dims = vi.type.tensor_type.shape.dim
                fixed = dims[0].dim_value if len(dims) and dims[0].HasField("dim_value") else 0
        reads_batch = any(
            n.op_type in _SHAPE_OPS and n.inputs and n.inputs[0] not in g.constant_tensors
            for n in g.nodes
        )
        probes = (fixed,) if fixed else _PROBES if reads_batch else _PROBES[:1]
        result: dict[int, dict[str, np.ndarray]] = {}
        for batch in probes:
            vals = dict(base)
            for node in g.nodes:
                if not all(t in g.constant_tensors for t in node.outputs):
                    continue
                n = node.handle
                try:
                    if n.op_type in _SHAPE_OPS and n.input[0] not in g.constant_tensors:
                        shape = shapes.get(n.input[0])
                        if not shape or any(d is None for d in shape[1:]):
                            continue  # unknown: an error only if something uses it
                        full = np.array([batch, *shape[1:]], dtype=np.int64)
                        a = _attrs(n)
                        full = full[a.get("start", 0) : a.get("end", len(full))]
                        vals[n.output[0]] = (
                            full if n.op_type == "Shape" else np.array(np.prod(full), np.int64)
                        )
                        continue
                    if not all(t in vals for t in n.input if t):
                        continue
                    ev = reference.ReferenceEvaluator(n, opsets=opsets)
                    outs = ev.run(None, {t: vals[t] for t in n.input if t})
                    for name, v in zip(n.output, outs, strict=False):
                        if name:
                            vals[name] = np.asarray(v)
                except Exception:
                    continue  # left unknown: an error only if the private side uses it
            result[batch] = vals
        self._const_cache = result
        return result

    def _const(self, name: str, node: Node, per_sample: bool = False) -> np.ndarray:
        """A constant operand; it must not depend on the batch size. `per_sample`: an
        elementwise operand, which may also be one value repeated over the batch (as
        tf2onnx's BroadcastTo of a position embedding to [N, S, H]): that value is
        returned with a leading 1."""
        consts = self._constants()
        vals = [c.get(name) for c in consts.values()]
        if per_sample and all(v is not None for v in vals) and len(vals) > 1:
            rows = [np.asarray(v) for v in vals]
            if all(
                r.ndim and r.shape[0] == batch and (r == r[:1]).all()
                for r, batch in zip(rows, consts, strict=True)
            ) and all(np.array_equal(r[:1], rows[0][:1]) for r in rows):
                return rows[0][:1]
        if any(v is None for v in vals):
            raise UnsupportedOpError(
                f"Node {node.name!r} ({node.op_type}) uses {name!r}, a constant ennclave "
                f"could not evaluate; simplify the model (e.g. onnxsim) first."
            )
        first = vals[0]
        if any(v.shape != first.shape or not np.array_equal(v, first) for v in vals[1:]):
            raise UnsupportedOpError(
                f"Node {node.name!r} ({node.op_type}) uses {name!r}, which depends on the "
                f"batch size; the enclave program cannot express that."
            )
        return first

    # -- lowering ----------------------------------------------------------------
    def lower_private(self, cut: CutPoint) -> Program:
        g = self.graph
        if len(g.outputs) != 1:
            raise UnsupportedOpError(
                f"The enclave program needs a model with one output; this one has {len(g.outputs)}."
            )
        # What must be float32 is what crosses into the enclave and what comes out; the
        # model's own input may be anything the public part turns into floats.
        ids = cut.tensor.dtype in ("int32", "int64")  # token ids: only a Gather reads them
        if (cut.tensor.dtype != "float32" and not ids) or g.outputs[0].dtype != "float32":
            raise UnsupportedOpError(
                f"The enclave program computes in float32, but the tensor entering it "
                f"({cut.tensor.name!r}) is {cut.tensor.dtype} and the model's output is "
                f"{g.outputs[0].dtype}; cut after the layer that turns it into floats "
                "(e.g. an embedding lookup)."
            )
        return _Lowering(self, cut).run()


class _Lowering:
    """One lowering of the private side of `cut`."""

    def __init__(self, adapter: OnnxAdapter, cut: CutPoint) -> None:
        self.a = adapter
        self.g = adapter.graph
        self.cut = cut
        self.shapes = adapter._shapes()
        self.b = ProgramBuilder()
        self.env: dict[str, _Val] = {}
        self._layout_cache: dict[tuple[str, tuple[int, ...]], _Val] = {}
        self.pshape: dict[str, tuple[int | None, ...]] = {}
        # ONNX tensors whose dim 0 is the batch times these per-sample dims (a Reshape
        # merged them); they are held unmerged, [N, *dims, ...], and only row-wise ops
        # may touch them until a Reshape splits the batch out again.
        self.merged: dict[str, tuple[int, ...]] = {}
        self.used = {t for m in self.g.nodes for t in m.inputs} | {o.name for o in self.g.outputs}
        self.int_ids: set[str] = set()  # casts of the token ids (still ids)
        self.bools: set[str] = set()  # tensors known to hold only 0 and 1 (comparisons)
        self.integers: set[str] = set()  # integer-valued tensors (ids, also cast to float)

    # -- helpers -----------------------------------------------------------------
    def shape(self, tensor: str, node: Node) -> tuple[int | None, ...]:
        s = self.shapes.get(tensor)
        if tensor in self.merged and s:
            s = (None, *self.merged[tensor], *s[1:])
        if s is None or len(s) == 0 or any(d is None for d in s[1:]):
            raise UnsupportedOpError(
                f"Node {node.name!r} ({node.op_type}): the shape of {tensor!r} is not known "
                f"statically (got {s}); the enclave program needs static non-batch dims."
            )
        return (None, *s[1:])

    def emit(
        self,
        op: str,
        inputs: list[str],
        node: Node,
        out_shape: tuple[int | None, ...],
        attrs: dict[str, Any] | None = None,
        weights: dict[str, np.ndarray] | None = None,
    ) -> str:
        out = self.b.add(op, inputs, node.name, attrs=attrs, weights=weights)
        self.pshape[out] = out_shape
        return out

    def constant(self, node: Node, value: np.ndarray) -> str:
        out = self.b.constant(f"{node.name}.const", value.astype(np.float32))
        self.pshape[out] = tuple(value.shape)
        return out

    def to_layout(self, v: _Val, perm: tuple[int, ...], node: Node) -> _Val:
        if v.perm == perm:
            return v
        key = (v.name, perm)
        if key in self._layout_cache:
            return self._layout_cache[key]
        q = tuple(_inv(v.perm)[p] for p in perm)
        target = _Val("", perm, v.shape)
        # Moving only unit axes is a reshape (free) rather than a transpose.
        nonunit_now = [a for a in v.perm if v.shape[a] != 1]
        nonunit_then = [a for a in perm if v.shape[a] != 1]
        if nonunit_now == nonunit_then:
            name = self.emit(
                "reshape",
                [v.name],
                node,
                target.pshape,
                {"shape": [int(d) for d in target.pshape[1:]]},
            )
        else:
            name = self.emit("transpose", [v.name], node, target.pshape, {"perm": list(q)})
        out = _Val(name, perm, v.shape)
        self._layout_cache[key] = out
        return out

    def logical(self, v: _Val, node: Node) -> _Val:
        return self.to_layout(v, _ident(v.rank), node)

    def unsupported(self, node: Node, why: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"Node {node.name!r} ({node.op_type}): {why}.")

    def dyn(self, node: Node, i: int = 0) -> _Val:
        t = node.inputs[i] if i < len(node.inputs) else ""
        if t not in self.env:
            raise self.unsupported(node, f"input {i} must be a computed tensor, not a constant")
        return self.env[t]

    def opt_const(self, node: Node, i: int) -> np.ndarray | None:
        n = node.handle
        if i >= len(n.input) or not n.input[i]:
            return None
        if n.input[i] not in self.g.constant_tensors:
            raise self.unsupported(node, f"input {i} must be a constant")
        return self.a._const(n.input[i], node)

    def integral(self, t: str, ids: set[str]) -> bool:
        """Whether `t` holds integers only: ids (also cast to float), 0/1 flags, their
        integer sums and products, or an integer-valued constant."""
        if t in ids or t in self.bools or t in self.integers:
            return True
        if t in self.g.constant_tensors:
            vals = [v.get(t) for v in self.a._constants().values()]
            return all(
                v is not None
                and (
                    np.asarray(v).dtype.kind in "iub"
                    or np.array_equal(np.asarray(v), np.round(np.asarray(v)))
                )
                for v in vals
            )
        return False

    # -- driver ------------------------------------------------------------------
    def run(self) -> Program:
        g, cut = self.g, self.cut
        out_name = g.outputs[0].name
        # Only what the output needs, and nothing constant (that is folded). Masks the
        # public side computes from pass-through inputs are computed again here.
        needed = {out_name}
        todo: list[Node] = []
        for pos in range(len(g.nodes) - 1, -1, -1):
            node = g.nodes[pos]
            if not any(t in needed for t in node.outputs) or all(
                t in g.constant_tensors for t in node.outputs
            ):
                continue
            if pos < cut.position and not all(t in g.passthrough for t in node.outputs if t):
                continue  # public: the cut tensor, or (checked below) a second crossing
            todo.append(node)
            needed.update(node.inputs)
        todo.reverse()

        inputs: list[TensorInfo] = []
        for i, t in enumerate(cut.private_inputs):
            name = self.b.fresh(t.name)
            shape = (None, *self.shape(t.name, Node("input", "Input", [], []))[1:])
            self.env[t.name] = _Val(name, _ident(len(shape)), shape)
            self.pshape[name] = shape
            # Integer ids and masks travel as float32 (exact below 2^24); `gather`
            # checks every id. A bool input is declared int32 (0/1).
            dtype = t.dtype if t.dtype in ("int32", "int64") else "float32"
            if t.dtype.startswith(("int", "uint", "bool")):
                dtype = t.dtype if t.dtype in ("int32", "int64") else "int32"
                if i > 0:
                    self.int_ids.add(t.name)
                if t.dtype == "bool":
                    self.bools.add(t.name)
            inputs.append(TensorInfo(name, shape, dtype))
        for node in todo:
            for t in node.inputs:
                if t not in self.env and t not in g.constant_tensors:
                    raise CutError(
                        f"Cut {cut.name!r} does not separate the model: node {node.name!r} "
                        f"also reads {t!r} from the public side."
                    )
            self.lower_node(node)
        if out_name not in self.env:
            raise CutError(f"The private side of cut {cut.name!r} does not compute the output.")
        final = self.logical(self.env[out_name], g.nodes[-1])
        out_shape = self.shape(out_name, g.nodes[-1])
        return self.b.build(inputs, [TensorInfo(final.name, out_shape)])

    def lower_node(self, node: Node) -> None:
        op = node.op_type
        n = node.handle
        if n.domain not in ("", "ai.onnx"):
            raise self.unsupported(
                node,
                f"custom domain {n.domain!r} is not supported; "
                f"supported ops: {', '.join(SUPPORTED_OPS)}",
            )
        attrs = _attrs(n)
        ids = self.int_ids | (
            {self.cut.tensor.name} if self.cut.tensor.dtype in ("int32", "int64") else set()
        )
        for i, t in enumerate(node.inputs):
            # Integer ids travel as floats: only a lookup, a cast, a comparison or a
            # shape op may read them (integer arithmetic, e.g. Div, would round
            # differently).
            if t in ids and not (op in _ID_EXACT_OPS or (op == "Gather" and i == 1)):
                raise self.unsupported(
                    node,
                    f"it reads the integer tensor {t!r}; in the enclave integer ids may only "
                    "be looked up (Gather), cast, compared or reshaped; cut after this node",
                )
        if op in _ID_SHAPE_OPS and node.inputs and node.inputs[0] in ids:
            self.int_ids.update(t for t in n.output if t)
        if op in _ID_ARITH and any(t in ids for t in node.inputs):
            if not all(self.integral(t, ids) for t in node.inputs):
                raise self.unsupported(
                    node,
                    "it mixes integer ids with floats; in the enclave ids may only be "
                    "combined with integers",
                )
            self.int_ids.update(t for t in n.output if t)
        if op == "Where" and all(t in ids for t in node.inputs[1:]):
            self.int_ids.update(t for t in n.output if t)
        ks = {self.merged.get(t, ()) for t in node.inputs if t in self.env}
        if ks and ks != {()}:
            if len(ks) != 1 or op not in _ROWWISE:
                raise self.unsupported(
                    node,
                    "it needs the batch axis of a tensor that a Reshape merged with other axes",
                )
            (k,) = ks
            if op in ("Softmax", "LayerNormalization"):
                r0 = self.env[node.inputs[0]].rank - len(k)
                ax = attrs.get("axis", -1)
                ax = ax - r0 if ax >= 0 else ax
                if ax <= -r0:
                    raise self.unsupported(node, "its axis is a batch axis merged by a Reshape")
                attrs["axis"] = ax
            if op != "Reshape":
                for t in n.output:
                    self.merged[t] = k
        translate = OPS.get(op)
        if translate is None:
            raise UnsupportedOpError(
                f"Node {node.name!r} has op type {op}, which the enclave program does not "
                f"support; supported ops: {', '.join(SUPPORTED_OPS)}."
            )
        out = translate(self, node, attrs)
        # Integer values survive moves, casts and integer sums and products.
        ins = node.inputs[1:] if op == "Where" else node.inputs[:1]
        if op in (*_ID_SHAPE_OPS, *_ID_ARITH, "Cast", "Where"):
            if op in _ID_ARITH:
                ins = node.inputs
            if all(self.integral(t, ids) for t in ins):
                self.integers.update(t for t in n.output if t)
        if isinstance(out, list):  # one value per output (Split); None: an unread output
            for name, val in zip(n.output, out, strict=True):
                if name and val is not None:
                    self.env[name] = val
            return
        extra = [t for t in n.output[1:] if t]
        if any(t in self.used for t in extra):
            raise self.unsupported(node, "only its first output can be lowered")
        self.env[n.output[0]] = out

    @OPS.register(*_UNARY_ACTIVATIONS)
    def lower_unary(self, node: Node, a: dict[str, Any]) -> _Val:
        return self.act(node, self.dyn(node), activation(_UNARY_ACTIVATIONS[node.op_type]))

    @OPS.register(*_BINARY)
    def lower_binary(self, node: Node, a: dict[str, Any]) -> _Val:
        return self.binary(node, _BINARY[node.op_type], list(node.inputs))

    @OPS.register(*_REDUCE)
    def lower_reduce(self, node: Node, a: dict[str, Any]) -> _Val:
        return self.reduce(node, _REDUCE[node.op_type], a)

    @OPS.register("ReduceL2", "ReduceSumSquare")
    def lower_ReduceL2(self, node: Node, a: dict[str, Any]) -> _Val:
        # torch's F.normalize (sentence-transformers' Normalize) writes ReduceL2:
        # sqrt(sum(x·x)), as the program's mul, reduce sum and sqrt.
        v = self.dyn(node)
        sq = _Val(self.emit("mul", [v.name, v.name], node, v.pshape), v.perm, v.shape)
        total = self.reduce(node, "sum", a, sq)
        if node.op_type == "ReduceSumSquare":
            return total
        return self.act(node, total, activation("sqrt"))

    def act(self, node: Node, v: _Val, act: dict[str, Any]) -> _Val:
        name = self.emit("activation", [v.name], node, v.pshape, {"activation": act})
        return _Val(name, v.perm, v.shape)

    # -- elementwise -------------------------------------------------------------
    def binary(self, node: Node, op: str, inputs: list[str]) -> _Val:
        out_shape = self.shape(node.outputs[0], node)
        r = len(out_shape)
        dyn = [self.env[t] for t in inputs if t in self.env]
        if not dyn:
            raise self.unsupported(node, "all operands are constant")
        for v in dyn:
            if v.rank != r:
                raise self.unsupported(
                    node,
                    "operands of different rank that both depend "
                    "on the input cannot be broadcast batch-first",
                )
        perm = dyn[0].perm
        names: list[str] = []
        for t in inputs:
            if t in self.env:
                names.append(self.to_layout(self.env[t], perm, node).name)
                continue
            c = np.asarray(self.a._const(t, node, per_sample=True))
            if c.dtype.kind not in "fiub":
                raise self.unsupported(node, f"constant {t!r} is not numeric")
            if c.ndim > r:
                raise self.unsupported(node, f"constant {t!r} has a higher rank than the output")
            c = c.reshape((1,) * (r - c.ndim) + c.shape)
            if c.shape[0] != 1:
                raise self.unsupported(node, f"constant {t!r} would broadcast over the batch")
            c = np.transpose(c, perm)[0]
            while c.ndim and c.shape[0] == 1:  # leading unit dims broadcast anyway
                c = c[0]
            names.append(self.constant(node, c))
        pshape = tuple(out_shape[p] for p in perm)
        if len(names) == 1:
            return _Val(names[0], perm, out_shape)  # variadic op with one input
        if op in ("sub", "div", "pow", "equal") and len(names) != 2:
            raise self.unsupported(node, "expected exactly two inputs")
        if op == "where" and len(names) != 3:
            raise self.unsupported(node, "expected exactly three inputs")
        name = self.emit(op, names, node, pshape)
        return _Val(name, perm, out_shape)

    @OPS.register("Identity")
    def lower_Identity(self, node: Node, a: dict[str, Any]) -> _Val:
        return self.dyn(node)

    @OPS.register("Dropout")
    def lower_Dropout(self, node: Node, a: dict[str, Any]) -> _Val:
        training = self.opt_const(node, 2)
        if training is not None and bool(training.reshape(-1)[0]):
            raise self.unsupported(node, "training_mode=True")
        return self.dyn(node)  # inference: identity

    @OPS.register("Cast")
    def lower_Cast(self, node: Node, a: dict[str, Any]) -> _Val:
        v = self.dyn(node)
        src = node.inputs[0]
        ints = src in self.int_ids or (
            src == self.cut.tensor.name and self.cut.tensor.dtype in ("int32", "int64")
        )
        to = a.get("to")
        if (
            to == 1
            or (to in (6, 7) and (ints or src in self.bools))
            or (to == 9 and src in self.bools)
        ):
            # Values unchanged: to float32 (everything travels as float32), token ids
            # between int32 and int64, a 0/1 tensor to bool.
            if to in (6, 7):
                self.int_ids.add(node.outputs[0])
            if src in self.bools:
                self.bools.add(node.outputs[0])
            return v
        names = {9: "bool", 6: "int32", 7: "int64"}
        if to not in names:
            raise self.unsupported(
                node, "only casts to float32, bool, int32 and int64 are supported"
            )
        if to == 9:
            self.bools.add(node.outputs[0])
        name = self.emit("cast", [v.name], node, v.pshape, {"to": names[to]})
        return _Val(name, v.perm, v.shape)

    @OPS.register("Equal")
    def lower_Equal(self, node: Node, a: dict[str, Any]) -> _Val:
        self.bools.add(node.outputs[0])
        return self.binary(node, "equal", list(node.inputs))

    @OPS.register(*_COMPARE)
    def lower_compare(self, node: Node, a: dict[str, Any]) -> _Val:
        # On integers a < b is clip(b − a, 0, 1) and a ≤ b is clip(b − a + 1, 0, 1),
        # exactly; float operands would need a comparison op the format lacks.
        ids = self.int_ids | (
            {self.cut.tensor.name} if self.cut.tensor.dtype in ("int32", "int64") else set()
        )
        if not all(self.integral(t, ids) for t in node.inputs):
            raise self.unsupported(node, "comparisons are supported on integer tensors only")
        x, y = node.inputs
        lo, hi = (x, y) if node.op_type in ("Less", "LessOrEqual") else (y, x)
        d = self.binary(node, "sub", [hi, lo])
        if node.op_type.endswith("OrEqual"):
            one = self.constant(node, np.array(1.0, np.float32))
            d = _Val(self.emit("add", [d.name, one], node, d.pshape), d.perm, d.shape)
        self.bools.add(node.outputs[0])
        return self.act(node, d, activation("clip", min=0.0, max=1.0))

    @OPS.register("Not")
    def lower_Not(self, node: Node, a: dict[str, Any]) -> _Val:
        # On a 0/1 tensor, not x is 1 − x; a cast to bool first makes any tensor 0/1.
        v = self.dyn(node)
        if node.inputs[0] not in self.bools:
            v = _Val(self.emit("cast", [v.name], node, v.pshape, {"to": "bool"}), v.perm, v.shape)
        one = self.constant(node, np.array(1.0, np.float32))
        self.bools.add(node.outputs[0])
        return _Val(self.emit("sub", [one, v.name], node, v.pshape), v.perm, v.shape)

    @OPS.register("Where")
    def lower_Where(self, node: Node, a: dict[str, Any]) -> _Val:
        if node.inputs[1] in self.bools and node.inputs[2] in self.bools:
            self.bools.add(node.outputs[0])
        return self.binary(node, "where", list(node.inputs))

    @OPS.register("Expand")
    def lower_Expand(self, node: Node, a: dict[str, Any]) -> _Val:
        # The target shape may be built from Shape ops (torch's attention masks): the
        # output shape that shape inference (or a run) found is what counts.
        v = self.dyn(node)
        out_shape = self.shape(node.outputs[0], node)
        if v.rank != len(out_shape):
            raise self.unsupported(node, "expanding to a higher rank would move the batch axis")
        if node.inputs[0] in self.bools:
            self.bools.add(node.outputs[0])
        if tuple(out_shape[1:]) == tuple(v.shape[1:]):
            return v
        pshape = tuple(out_shape[p] for p in v.perm)
        attrs = {"shape": [int(d) for d in pshape[1:]]}  # type: ignore[arg-type]
        return _Val(self.emit("expand", [v.name], node, pshape, attrs), v.perm, out_shape)

    @OPS.register("Gather")
    def lower_Gather(self, node: Node, a: dict[str, Any]) -> _Val:
        if node.inputs[0] in self.env:
            return self.gather_constant_indices(node, a)
        # An embedding lookup: a constant table, computed integer ids.
        ids = self.dyn(node, 1)
        if int(a.get("axis", 0)) != 0:
            raise self.unsupported(node, "only lookups along axis 0 of a constant table")
        table = self.opt_const(node, 0)
        assert table is not None
        if ids.perm != _ident(ids.rank):
            ids = self.logical(ids, node)
        out_shape = (*ids.shape, *[int(d) for d in table.shape[1:]])
        w = {"table": table.astype(np.float32)}
        name = self.emit("gather", [ids.name], node, out_shape, weights=w)
        return _Val(name, _ident(len(out_shape)), out_shape)

    def gather_constant_indices(self, node: Node, a: dict[str, Any]) -> _Val:
        """Gather of a computed tensor at constant indices (e.g. the [CLS] position) →
        one `slice` per index, `concat`enated; a scalar index drops the axis."""
        v = self.logical(self.dyn(node), node)
        axis = int(a.get("axis", 0)) % v.rank
        if axis == 0:
            raise self.unsupported(node, "a Gather along the batch axis")
        idx = self.opt_const(node, 1)
        assert idx is not None
        if idx.ndim > 1:
            raise self.unsupported(node, "indices of rank above 1")
        size = int(v.shape[axis])
        parts = []
        for i in idx.reshape(-1):
            i = int(i) + (size if int(i) < 0 else 0)
            if not 0 <= i < size:
                raise self.unsupported(node, f"index {int(i)} is outside an axis of {size}")
            starts = [i if ax == axis else 0 for ax in range(1, v.rank)]
            sizes = [1 if ax == axis else int(v.shape[ax]) for ax in range(1, v.rank)]
            shp = (*v.shape[:axis], 1, *v.shape[axis + 1 :])
            parts.append(
                self.emit("slice", [v.name], node, shp, {"starts": starts, "sizes": sizes})
            )
        shp = (*v.shape[:axis], len(parts), *v.shape[axis + 1 :])
        out = parts[0] if len(parts) == 1 else self.emit("concat", parts, node, shp, {"axis": axis})
        if idx.ndim == 0:
            shp = (*v.shape[:axis], *v.shape[axis + 1 :])
            out = self.emit("reshape", [out], node, shp, {"shape": [int(d) for d in shp[1:]]})
        return _Val(out, _ident(len(shp)), shp)

    @OPS.register("LeakyRelu")
    def lower_LeakyRelu(self, node: Node, a: dict[str, Any]) -> _Val:
        return self.act(node, self.dyn(node), activation("leaky_relu", alpha=a.get("alpha", 0.01)))

    @OPS.register("Elu")
    def lower_Elu(self, node: Node, a: dict[str, Any]) -> _Val:
        return self.act(node, self.dyn(node), activation("elu", alpha=a.get("alpha", 1.0)))

    @OPS.register("Selu")
    def lower_Selu(self, node: Node, a: dict[str, Any]) -> _Val:
        if (
            abs(a.get("alpha", 1.6732632) - 1.6732632423543772) > 1e-6
            or abs(a.get("gamma", 1.0507010) - 1.0507009873554805) > 1e-6
        ):
            raise self.unsupported(node, "only the standard alpha/gamma are supported")
        return self.act(node, self.dyn(node), activation("selu"))

    @OPS.register("HardSigmoid")
    def lower_HardSigmoid(self, node: Node, a: dict[str, Any]) -> _Val:
        act = activation("hard_sigmoid", alpha=a.get("alpha", 0.2), beta=a.get("beta", 0.5))
        return self.act(node, self.dyn(node), act)

    @OPS.register("HardSwish")
    def lower_HardSwish(self, node: Node, a: dict[str, Any]) -> _Val:
        v = self.dyn(node)
        hs = self.act(node, v, activation("hard_sigmoid", alpha=1 / 6, beta=0.5))
        return _Val(self.emit("mul", [v.name, hs.name], node, v.pshape), v.perm, v.shape)

    @OPS.register("Gelu")
    def lower_Gelu(self, node: Node, a: dict[str, Any]) -> _Val:
        approx = _s(a.get("approximate", "none"))
        return self.act(node, self.dyn(node), activation("gelu", approximate=approx == "tanh"))

    @OPS.register("Softmax")
    def lower_Softmax(self, node: Node, a: dict[str, Any]) -> _Val:
        v = self.dyn(node)
        axis = v.phys_axis(a.get("axis", -1))
        if axis == 0:
            raise self.unsupported(node, "softmax over the batch axis")
        return self.act(node, v, activation("softmax", axis=axis - v.rank))

    @OPS.register("Clip")
    def lower_Clip(self, node: Node, a: dict[str, Any]) -> _Val:
        v = self.dyn(node)
        lo_c, hi_c = self.opt_const(node, 1), self.opt_const(node, 2)
        lo = float(lo_c.reshape(-1)[0]) if lo_c is not None else a.get("min")
        hi = float(hi_c.reshape(-1)[0]) if hi_c is not None else a.get("max")
        if lo is not None and hi is not None:
            if lo == 0 and hi == 6:
                return self.act(node, v, activation("relu6"))
            return self.act(node, v, activation("clip", min=lo, max=hi))
        if lo is not None and hi is None:
            if lo == 0:
                return self.act(node, v, activation("relu"))
            c = self.constant(node, np.array(lo, np.float32))
            return _Val(self.emit("max", [v.name, c], node, v.pshape), v.perm, v.shape)
        if hi is not None:
            c = self.constant(node, np.array(hi, np.float32))
            return _Val(self.emit("min", [v.name, c], node, v.pshape), v.perm, v.shape)
        return v

    @OPS.register("PRelu")
    def lower_PRelu(self, node: Node, a: dict[str, Any]) -> _Val:
        # max(x, 0) + slope * min(x, 0), exactly.
        v = self.dyn(node)
        slope = self.opt_const(node, 1)
        assert slope is not None
        perm = v.perm
        c = slope.reshape((1,) * (v.rank - slope.ndim) + slope.shape)
        c = np.transpose(c, perm)[0]
        zero = self.constant(node, np.array(0, np.float32))
        pos = self.emit("max", [v.name, zero], node, v.pshape)
        neg = self.emit("min", [v.name, zero], node, v.pshape)
        scaled = self.emit("mul", [neg, self.constant(node, c)], node, v.pshape)
        return _Val(self.emit("add", [pos, scaled], node, v.pshape), perm, v.shape)

    # -- linear ------------------------------------------------------------------
    def dense(self, node: Node, v: _Val, kernel: np.ndarray, bias: np.ndarray | None) -> _Val:
        if v.perm[-1] != v.rank - 1:
            v = self.logical(v, node)
        out_shape = (*v.shape[:-1], int(kernel.shape[1]))
        w = {"kernel": kernel}
        if bias is not None:
            w["bias"] = bias
        name = self.emit("dense", [v.name], node, tuple(out_shape[p] for p in v.perm), weights=w)
        return _Val(name, v.perm, out_shape)

    @OPS.register("MatMul")
    def lower_MatMul(self, node: Node, a: dict[str, Any]) -> _Val:
        v = self.dyn(node)
        if node.inputs[1] in self.env:
            return self.matmul_computed(node, v, self.env[node.inputs[1]])
        k = self.opt_const(node, 1)
        assert k is not None
        if k.ndim != 2:
            raise self.unsupported(node, "the constant right operand must be 2-D")
        return self.dense(node, v, k.astype(np.float32), None)

    def matmul_computed(self, node: Node, a: _Val, b: _Val) -> _Val:
        """MatMul of two computed tensors (attention) → `matmul`; an operand held with
        its last two axes swapped (e.g. a Transpose of K) is read transposed in place."""
        if a.rank != b.rank or a.rank < 3 or a.shape[1:-2] != b.shape[1:-2]:
            raise self.unsupported(
                node,
                f"a product of computed tensors of shapes {list(a.shape)} and {list(b.shape)}: "
                "the enclave multiplies tensors of one rank (at least 3) with equal leading "
                "axes, without broadcasting",
            )
        ident = _ident(a.rank)
        swapped = (*ident[:-2], ident[-1], ident[-2])
        attrs: dict[str, Any] = {}
        names = []
        for v, flag in ((a, "transpose_a"), (b, "transpose_b")):
            if v.perm == swapped:
                attrs[flag] = True
            elif v.perm != ident:
                v = self.logical(v, node)
            names.append(v.name)
        out_shape = (*a.shape[:-1], b.shape[-1])
        return _Val(self.emit("matmul", names, node, out_shape, attrs), ident, out_shape)

    @OPS.register("Gemm")
    def lower_Gemm(self, node: Node, a: dict[str, Any]) -> _Val:
        v = self.dyn(node)
        if a.get("transA", 0):
            raise self.unsupported(node, "transA=1 would transpose the batch axis")
        b = self.opt_const(node, 1)
        assert b is not None
        kernel = (b.T if a.get("transB", 0) else b).astype(np.float64) * a.get("alpha", 1.0)
        c = self.opt_const(node, 2)
        bias = None
        if c is not None:
            m = kernel.shape[1]
            if c.ndim == 2 and c.shape[0] != 1:
                raise self.unsupported(node, "C would broadcast over the batch")
            bias = np.broadcast_to(c.reshape(-1) if c.ndim else c, (m,)) * a.get("beta", 1.0)
        return self.dense(node, v, kernel, bias)

    def spatial_attrs(
        self,
        node: Node,
        a: dict[str, Any],
        in_sp: list[int],
        window: list[int],
    ) -> tuple[list[int], list[int], list[list[int]]]:
        nd = len(window)
        strides = list(a.get("strides", [1] * nd))
        dil = list(a.get("dilations", [1] * nd))
        pads = list(a.get("pads", [0] * (2 * nd)))
        auto = _s(a.get("auto_pad", "NOTSET"))
        pairs = [[int(pads[i]), int(pads[i + nd])] for i in range(nd)]
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            pairs = []
            for i in range(nd):
                out = -(-in_sp[i] // strides[i])
                total = max((out - 1) * strides[i] + (window[i] - 1) * dil[i] + 1 - in_sp[i], 0)
                small = total // 2
                pairs.append(
                    [small, total - small] if auto == "SAME_UPPER" else [total - small, small]
                )
        elif auto == "VALID":
            pairs = [[0, 0] for _ in range(nd)]
        elif auto != "NOTSET":
            raise self.unsupported(node, f"auto_pad={auto}")
        return strides, dil, pairs

    @OPS.register("Conv")
    def lower_Conv(self, node: Node, a: dict[str, Any]) -> _Val:
        v = self.dyn(node)
        if v.rank not in (3, 4):
            raise self.unsupported(node, "only 1-D and 2-D convolutions are supported")
        w = self.opt_const(node, 1)
        assert w is not None
        bias = self.opt_const(node, 2)
        window = [int(k) for k in w.shape[2:]]
        strides, dil, pads = self.spatial_attrs(node, a, [int(d) for d in v.shape[2:]], window)
        kernel = np.transpose(w, (*range(2, w.ndim), 1, 0))  # [k..., Cin/g, Cout]
        v = self.to_layout(v, _channels_last(v.rank), node)
        out_shape = self.shape(node.outputs[0], node)
        weights = {"kernel": kernel}
        if bias is not None:
            weights["bias"] = bias
        attrs = {"strides": strides, "dilations": dil, "pads": pads, "groups": a.get("group", 1)}
        perm = _channels_last(v.rank)
        name = self.emit("conv", [v.name], node, tuple(out_shape[p] for p in perm), attrs, weights)
        return _Val(name, perm, out_shape)

    def pool(self, node: Node, a: dict[str, Any], kind: str) -> _Val:
        v = self.dyn(node)
        if v.rank not in (3, 4):
            raise self.unsupported(node, "only 1-D and 2-D pooling is supported")
        window = [int(k) for k in a["kernel_shape"]]
        in_sp = [int(d) for d in v.shape[2:]]
        strides, dil, pads = self.spatial_attrs(node, a, in_sp, window)
        if any(d != 1 for d in dil):
            raise self.unsupported(node, "dilated pooling")
        out_shape = self.shape(node.outputs[0], node)
        for i in range(len(window)):
            # ceil_mode: the shape inference result tells how many windows there are;
            # extra end padding reproduces that for max (padding never wins).
            span = in_sp[i] + pads[i][0] + pads[i][1] - window[i]
            floor_out = span // strides[i] + 1
            extra = (int(out_shape[2 + i] or 0) - floor_out) * strides[i]
            if extra > 0:
                if kind != "max":
                    raise self.unsupported(
                        node, "ceil_mode=1 changes the output of an average pool"
                    )
                pads[i][1] += extra
        v = self.to_layout(v, _channels_last(v.rank), node)
        attrs: dict[str, Any] = {"kind": kind, "window": window, "strides": strides, "pads": pads}
        if kind == "avg":
            attrs["count_include_pad"] = bool(a.get("count_include_pad", 0))
        perm = _channels_last(v.rank)
        name = self.emit("pool", [v.name], node, tuple(out_shape[p] for p in perm), attrs)
        return _Val(name, perm, out_shape)

    @OPS.register("MaxPool")
    def lower_MaxPool(self, node: Node, a: dict[str, Any]) -> _Val:
        return self.pool(node, a, "max")

    @OPS.register("AveragePool")
    def lower_AveragePool(self, node: Node, a: dict[str, Any]) -> _Val:
        return self.pool(node, a, "avg")

    def global_pool(self, node: Node, kind: str) -> _Val:
        v = self.dyn(node)
        if v.rank < 3:
            raise self.unsupported(node, "global pooling needs spatial dims")
        out_shape = (None, v.shape[1], *([1] * (v.rank - 2)))
        if v.perm != _channels_last(v.rank):
            # Not channels-last already: a reduction avoids a transpose.
            axes = sorted(v.phys_axis(i) for i in range(2, v.rank))
            name = self.emit(
                "reduce",
                [v.name],
                node,
                tuple(out_shape[p] for p in v.perm),
                {"kind": kind if kind == "max" else "mean", "axes": axes, "keepdims": True},
            )
            return _Val(name, v.perm, out_shape)
        perm = v.perm
        name = self.emit(
            "global_pool",
            [v.name],
            node,
            tuple(out_shape[p] for p in perm),
            {"kind": kind, "keepdims": True},
        )
        return _Val(name, perm, out_shape)

    @OPS.register("GlobalAveragePool")
    def lower_GlobalAveragePool(self, node: Node, a: dict[str, Any]) -> _Val:
        return self.global_pool(node, "avg")

    @OPS.register("GlobalMaxPool")
    def lower_GlobalMaxPool(self, node: Node, a: dict[str, Any]) -> _Val:
        return self.global_pool(node, "max")

    @OPS.register("BatchNormalization")
    def lower_BatchNormalization(self, node: Node, a: dict[str, Any]) -> _Val:
        v = self.dyn(node)
        if a.get("training_mode", 0):
            raise self.unsupported(node, "training_mode=1")
        gamma, beta, mean, var = (self.opt_const(node, i) for i in (1, 2, 3, 4))
        assert gamma is not None and beta is not None and mean is not None and var is not None
        scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + a.get("epsilon", 1e-5))
        shift = beta - mean * scale
        axis = v.phys_axis(1)
        name = self.emit(
            "scale_shift",
            [v.name],
            node,
            v.pshape,
            {"axis": axis - v.rank},
            {"scale": scale, "shift": shift},
        )
        return _Val(name, v.perm, v.shape)

    @OPS.register("LayerNormalization")
    def lower_LayerNormalization(self, node: Node, a: dict[str, Any]) -> _Val:
        v = self.dyn(node)
        axis = a.get("axis", -1) % v.rank
        if axis == 0:
            raise self.unsupported(node, "normalizing over the batch axis")
        tail = tuple(range(axis, v.rank))
        if v.perm[axis:] != tail:
            v = self.logical(v, node)
        norm_shape = tuple(int(d) for d in v.shape[axis:])  # type: ignore[arg-type]
        w: dict[str, np.ndarray] = {}
        gamma, beta = self.opt_const(node, 1), self.opt_const(node, 2)
        if gamma is not None:
            w["gamma"] = np.broadcast_to(gamma, norm_shape)
        if beta is not None:
            w["beta"] = np.broadcast_to(beta, norm_shape)
        attrs = {"axes": list(range(axis - v.rank, 0)), "epsilon": a.get("epsilon", 1e-5)}
        name = self.emit("layer_norm", [v.name], node, v.pshape, attrs, w)
        return _Val(name, v.perm, v.shape)

    # -- shape ops ---------------------------------------------------------------
    def reshape_to(self, node: Node, v: _Val, out_shape: tuple[int | None, ...]) -> _Val:
        v = self.logical(v, node)
        name = self.emit(
            "reshape", [v.name], node, out_shape, {"shape": [int(d) for d in out_shape[1:]]}
        )  # type: ignore[arg-type]
        return _Val(name, _ident(len(out_shape)), out_shape)

    @OPS.register("Reshape")
    def lower_Reshape(self, node: Node, a: dict[str, Any]) -> _Val:
        v = self.dyn(node)
        k_in = self.merged.get(node.inputs[0], ())
        rest = [int(d) for d in v.shape[1 + len(k_in) :]]  # type: ignore[arg-type]
        unmerged = [*k_in, *rest]  # the input's per-sample dims, batch split out
        target_name = node.inputs[1]
        results = []
        for batch, consts in self.a._constants().items():
            t = consts.get(target_name)
            if t is None:
                raise self.unsupported(node, "its target shape could not be evaluated")
            in_shape = [batch * int(np.prod(k_in)), *rest]  # as ONNX sees the input
            out = [int(d) for d in t.reshape(-1)]
            if 0 in out and a.get("allowzero", 0):
                raise self.unsupported(node, "allowzero=1 with a zero in the shape")
            out = [in_shape[i] if d == 0 else d for i, d in enumerate(out)]
            if -1 in out:
                known = int(np.prod([d for d in out if d != -1]))
                out[out.index(-1)] = int(np.prod(in_shape)) // max(known, 1)
            # The leading dim must be the batch, possibly times whole leading dims
            # (e.g. Keras Dense on 3-D input: [N, T, D] -> [N*T, D] -> MatMul -> back).
            lead = out[0] // batch if out and out[0] % batch == 0 else 0
            j, prod = 0, 1
            while prod < lead and j < len(unmerged):
                prod *= unmerged[j]
                j += 1
            if not out or prod != lead or int(np.prod(out)) != int(np.prod(in_shape)):
                raise self.unsupported(
                    node, f"target shape {list(t.reshape(-1))} does not keep the batch axis first"
                )
            results.append((tuple(unmerged[:j]), tuple(out[1:])))
        if len(set(results)) != 1:
            raise self.unsupported(node, "its target shape depends on the batch size")
        k_out, tail = results[0]
        if k_out:
            self.merged[node.outputs[0]] = k_out
        else:
            self.merged.pop(node.outputs[0], None)
        return self.reshape_to(node, v, (None, *k_out, *tail))

    @OPS.register("Flatten")
    def lower_Flatten(self, node: Node, a: dict[str, Any]) -> _Val:
        v = self.dyn(node)
        axis = a.get("axis", 1) % max(v.rank, 1) if a.get("axis", 1) < 0 else a.get("axis", 1)
        if axis == 0 or node.inputs[0] in self.merged:
            raise self.unsupported(node, f"axis={axis} would merge the batch axis")
        rest = int(np.prod([int(d) for d in v.shape[axis:]]))  # type: ignore[arg-type]
        # [N, d1..d(a-1), ...] -> [N·d1·…, rest]: held unmerged as [N, d1, …, rest], like a
        # Reshape that merges the batch (only row-wise ops may follow until it is undone).
        lead = tuple(int(d) for d in v.shape[1:axis] if d != 1)  # type: ignore[arg-type]
        if lead:
            self.merged[node.outputs[0]] = lead
        return self.reshape_to(node, v, (None, *lead, rest))

    def _axes(self, node: Node, a: dict[str, Any], rank: int) -> list[int] | None:
        axes = self.opt_const(node, 1) if len(node.handle.input) > 1 else None
        if axes is None:
            axes = a.get("axes")
        if axes is None:
            return None
        return sorted(int(x) % rank for x in np.asarray(axes).reshape(-1))

    @OPS.register("Squeeze")
    def lower_Squeeze(self, node: Node, a: dict[str, Any]) -> _Val:
        v = self.dyn(node)
        axes = self._axes(node, a, v.rank)
        if axes is None:
            axes = [i for i in range(1, v.rank) if v.shape[i] == 1]
        if 0 in axes or any(v.shape[i] != 1 for i in axes):
            raise self.unsupported(node, "it squeezes the batch axis or a non-unit axis")
        # Dropping unit axes moves no data: keep the layout, reshape the physical dims.
        left = [p for p in v.perm if p not in axes]
        perm = tuple(sorted(left).index(p) for p in left)
        out_shape = tuple(d for i, d in enumerate(v.shape) if i not in axes)
        return self.phys_reshape(node, v, perm, out_shape)

    @OPS.register("Unsqueeze")
    def lower_Unsqueeze(self, node: Node, a: dict[str, Any]) -> _Val:
        v = self.dyn(node)
        out_shape = self.shape(node.outputs[0], node)
        axes = self._axes(node, a, len(out_shape))
        if axes is None or 0 in axes:
            raise self.unsupported(node, "unsqueezing at the batch axis")
        old = [i for i in range(len(out_shape)) if i not in axes]  # new index of old axes
        order = [old[p] for p in v.perm]
        for ax in sorted(axes):
            # Put a new unit axis physically next to its logical neighbour, so that
            # e.g. [N, W, C] -> [N, 1, W, C] -> transpose -> 2-D conv needs no transpose.
            nxt = next((o for o in old if o > ax), None)
            prev = max((o for o in order if o < ax), default=0)
            pos = order.index(nxt) if nxt is not None else order.index(prev) + 1
            order.insert(max(pos, 1), ax)
            old = sorted({*old, ax})
        return self.phys_reshape(node, v, tuple(order), out_shape)

    def phys_reshape(
        self, node: Node, v: _Val, perm: tuple[int, ...], out_shape: tuple[int | None, ...]
    ) -> _Val:
        out = _Val("", perm, out_shape)
        name = self.emit(
            "reshape", [v.name], node, out.pshape, {"shape": [int(d) for d in out.pshape[1:]]}
        )  # type: ignore[arg-type]
        return _Val(name, perm, out_shape)

    @OPS.register("Transpose")
    def lower_Transpose(self, node: Node, a: dict[str, Any]) -> _Val:
        v = self.dyn(node)
        t = tuple(a.get("perm", range(v.rank - 1, -1, -1)))
        if t[0] != 0:
            raise self.unsupported(node, f"perm {list(t)} moves the batch axis")
        k = self.merged.get(node.inputs[0], ())
        if k:  # batch merged with k (tf2onnx's einsum): those axes stay in front
            t = (*range(len(k) + 1), *[p + len(k) for p in t[1:]])
        # No program node: the data stays put, only its labels change.
        inv_t = _inv(t)
        return _Val(v.name, tuple(inv_t[p] for p in v.perm), tuple(v.shape[i] for i in t))

    @OPS.register("Concat")
    def lower_Concat(self, node: Node, a: dict[str, Any]) -> _Val:
        ins = [t for t in node.inputs]
        if any(t not in self.env for t in ins):
            raise self.unsupported(
                node, "concatenating a constant would need it repeated over the batch"
            )
        vals = [self.env[t] for t in ins]
        perm = vals[0].perm
        vals = [self.to_layout(x, perm, node) for x in vals]
        axis = vals[0].phys_axis(a["axis"])
        if axis == 0:
            raise self.unsupported(node, "concatenation along the batch axis")
        out_shape = self.shape(node.outputs[0], node)
        if len(vals) == 1:
            return vals[0]
        name = self.emit(
            "concat",
            [x.name for x in vals],
            node,
            tuple(out_shape[p] for p in perm),
            {"axis": axis},
        )
        return _Val(name, perm, out_shape)

    @OPS.register("Pad")
    def lower_Pad(self, node: Node, a: dict[str, Any]) -> _Val:
        v = self.dyn(node)
        mode = _s(a.get("mode", "constant"))
        if mode != "constant":
            raise self.unsupported(node, f"mode={mode}; only constant padding is supported")
        pads = self.opt_const(node, 1)
        if pads is None:
            raise self.unsupported(node, "pads are missing")
        value = self.opt_const(node, 2)
        axes_c = self.opt_const(node, 3)
        r = v.rank
        axes = [int(x) % r for x in axes_c.reshape(-1)] if axes_c is not None else list(range(r))
        p = [int(x) for x in pads.reshape(-1)]
        full = [[0, 0] for _ in range(r)]
        for i, ax in enumerate(axes):
            full[ax] = [p[i], p[i + len(axes)]]
        if full[0] != [0, 0]:
            raise self.unsupported(node, "padding the batch axis")
        if any(x < 0 for pair in full for x in pair):
            raise self.unsupported(node, "negative pads (cropping)")
        phys = [full[v.perm[i]] for i in range(1, r)]
        out_shape = self.shape(node.outputs[0], node)
        val = float(value.reshape(-1)[0]) if value is not None and value.size else 0.0
        name = self.emit(
            "pad", [v.name], node, tuple(out_shape[q] for q in v.perm), {"pads": phys, "value": val}
        )
        return _Val(name, v.perm, out_shape)

    def reduce(self, node: Node, kind: str, a: dict[str, Any], v: _Val | None = None) -> _Val:
        """`v`: the operand if not the node's input (ReduceL2 reduces its square)."""
        v = v or self.dyn(node)
        # ReduceSum (opset 13+) and all reductions (opset 18+) take axes as an input.
        axes = self._axes(node, a, v.rank)
        if axes is None or not axes:
            if a.get("noop_with_empty_axes", 0):
                return v
            raise self.unsupported(node, "reducing over all axes includes the batch")
        if 0 in axes:
            raise self.unsupported(node, "reducing over the batch axis")
        keep = bool(a.get("keepdims", 1))
        phys = sorted(v.phys_axis(x) for x in axes)
        out_shape = self.shape(node.outputs[0], node)
        if keep:
            perm = v.perm
        else:
            left = [p for p in v.perm if p not in axes]  # logical axes in physical order
            perm = tuple(sorted(left).index(p) for p in left)
        name = self.emit(
            "reduce",
            [v.name],
            node,
            tuple(out_shape[p] for p in perm),
            {"kind": kind, "axes": phys, "keepdims": keep},
        )
        return _Val(name, perm, out_shape)

    # -- resampling, transposed conv, slicing --------------------------------------
    def _resize(
        self, node: Node, a: dict[str, Any], scales: np.ndarray | None, sizes: np.ndarray | None
    ) -> _Val:
        v = self.dyn(node)
        if v.rank not in (3, 4):
            raise self.unsupported(
                node, "only 1-D and 2-D resizes [N, C, spatial...] are supported"
            )
        mode = _s(a.get("mode", "nearest"))
        if mode not in ("nearest", "linear"):
            raise self.unsupported(node, f"mode={mode}; only nearest and linear are supported")
        coord = _s(a.get("coordinate_transformation_mode", "half_pixel"))
        known = ("asymmetric", "half_pixel", "pytorch_half_pixel", "align_corners")
        if coord not in (*known, "tf_half_pixel_for_nn"):
            raise self.unsupported(
                node,
                f"coordinate_transformation_mode={coord}; supported: {', '.join(known)}, "
                "tf_half_pixel_for_nn",
            )
        if _s(a.get("keep_aspect_ratio_policy", "stretch")) != "stretch":
            raise self.unsupported(node, "keep_aspect_ratio_policy other than stretch")
        r = v.rank
        axes = [int(x) % r for x in a.get("axes", range(r))]
        in_dims = [1, *[int(d) for d in v.shape[1:]]]  # the batch (scale 1) counts as 1
        full_scales: list[float] | None = None
        if sizes is not None and sizes.size:
            out = list(in_dims)
            for ax, s in zip(axes, sizes.reshape(-1), strict=True):
                out[ax] = int(s)
        elif scales is not None and scales.size:
            full_scales = [1.0] * r
            for ax, s in zip(axes, scales.reshape(-1), strict=True):
                full_scales[ax] = float(s)
            # In float32, as ONNX Runtime computes it (10 · 0.7f is 7, not 6.99…).
            out = [
                int(np.floor(np.float32(d) * np.float32(s)))
                for d, s in zip(in_dims, full_scales, strict=True)
            ]
        else:
            raise self.unsupported(node, "neither constant scales nor sizes are given")
        scale_of = full_scales or [o / d for o, d in zip(out, in_dims, strict=True)]
        if scale_of[0] != 1.0:
            raise self.unsupported(node, "it resizes the batch axis")
        if min(out) < 1:
            raise self.unsupported(node, "its output would be empty")
        if (
            a.get("antialias", 0)
            and mode == "linear"
            and any(o < i for o, i in zip(out, in_dims, strict=True))
        ):
            raise self.unsupported(node, "antialiased downsampling")
        # One non-batch axis that keeps its size is the channel axis (axis 1 for NCHW,
        # else the last, e.g. NHWC); the others are the spatial axes of the program op
        # (ONNX maps every axis, so an axis of scale 1 maps exactly as it does there).
        kept = [i for i in range(1, r) if out[i] == in_dims[i] and scale_of[i] == 1.0]
        if not kept:
            raise self.unsupported(node, "it resizes every non-batch axis (no channel axis)")
        ch = 1 if 1 in kept else kept[-1]
        spatial = [i for i in range(1, r) if i != ch]
        attrs: dict[str, Any] = {
            "mode": mode,
            "sizes": [out[i] for i in spatial],
            "coordinate_transformation_mode": coord,
        }
        if full_scales is not None:
            attrs["scales"] = [full_scales[i] for i in spatial]
        if mode == "nearest":
            attrs["nearest_mode"] = _s(a.get("nearest_mode", "round_prefer_floor"))
            if attrs["nearest_mode"] not in (
                "round_prefer_floor",
                "round_prefer_ceil",
                "floor",
                "ceil",
            ):
                raise self.unsupported(node, f"nearest_mode={attrs['nearest_mode']}")
        out_shape = (None, *out[1:])
        if len(kept) == r - 1 and coord != "tf_half_pixel_for_nn":
            return v  # every axis keeps its size at scale 1: the identity
        perm = (0, *spatial, ch)
        v = self.to_layout(v, perm, node)
        name = self.emit("resize", [v.name], node, tuple(out_shape[p] for p in perm), attrs)
        return _Val(name, perm, out_shape)

    @OPS.register("Resize")
    def lower_Resize(self, node: Node, a: dict[str, Any]) -> _Val:
        if self.a.opset < 11:  # opset 10: Resize(X, scales), asymmetric, rounding down
            a = {**a, "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
            return self._resize(node, a, self.opt_const(node, 1), None)
        return self._resize(node, a, self.opt_const(node, 2), self._sizes(node, 3))

    def _sizes(self, node: Node, i: int) -> np.ndarray | None:
        """A constant `sizes` input whose first entry may be the batch size (exporters
        build it as Concat(Shape(x)[:2], [h, w])): that entry is returned as 1."""
        n = node.handle
        if i >= len(n.input) or not n.input[i]:
            return None
        if n.input[i] not in self.g.constant_tensors:
            raise self.unsupported(node, f"input {i} must be a constant")
        vals = [c.get(n.input[i]) for c in self.a._constants().values()]
        if any(v is None for v in vals):
            return self.opt_const(node, i)  # raises, naming what could not be evaluated
        flat = [np.asarray(v).reshape(-1).astype(np.int64) for v in vals]
        if "axes" not in _attrs(n) and all(len(f) > 1 for f in flat):
            flat = [np.concatenate([[1], f[1:]]) for f in flat]
        if any(not np.array_equal(f, flat[0]) for f in flat[1:]):
            raise self.unsupported(node, "its sizes depend on the batch size")
        return flat[0]

    @OPS.register("Upsample")
    def lower_Upsample(self, node: Node, a: dict[str, Any]) -> _Val:
        # Deprecated (opset 7-9): asymmetric coordinates, nearest rounds down.
        scales = self.opt_const(node, 1)
        if scales is None:
            scales = np.asarray(a.get("scales", []), dtype=np.float32)
        a = {**a, "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
        return self._resize(node, a, scales, None)

    @OPS.register("ConvTranspose")
    def lower_ConvTranspose(self, node: Node, a: dict[str, Any]) -> _Val:
        v = self.dyn(node)
        if v.rank not in (3, 4):
            raise self.unsupported(node, "only 1-D and 2-D transposed convolutions are supported")
        w = self.opt_const(node, 1)
        assert w is not None
        bias = self.opt_const(node, 2)
        nd = v.rank - 2
        window = [int(k) for k in w.shape[2:]]
        in_sp = [int(d) for d in v.shape[2:]]
        strides = [int(s) for s in a.get("strides", [1] * nd)]
        dil = [int(d) for d in a.get("dilations", [1] * nd)]
        extra = [int(p) for p in a.get("output_padding", [0] * nd)]
        # Full output (before cropping), without output_padding.
        base = [(in_sp[i] - 1) * strides[i] + dil[i] * (window[i] - 1) + 1 for i in range(nd)]
        auto = _s(a.get("auto_pad", "NOTSET"))
        want = a.get("output_shape")
        if want is not None:
            want = [int(d) for d in list(want)[-nd:]]
        elif auto in ("SAME_UPPER", "SAME_LOWER"):
            want = [in_sp[i] * strides[i] for i in range(nd)]
        if want is not None:
            # As the spec says: total = full - output_shape; SAME_UPPER crops the odd
            # position at the end, otherwise at the start (C-style halving).
            begins = []
            for i in range(nd):
                total = base[i] + extra[i] - want[i]
                half = int(total / 2)
                begins.append(half if auto == "SAME_UPPER" else total - half)
        elif auto in ("NOTSET", "VALID"):
            p = (
                [int(x) for x in a.get("pads", [0] * (2 * nd))]
                if auto == "NOTSET"
                else [0] * 2 * nd
            )
            begins = p[:nd]
            want = [base[i] + extra[i] - p[i] - p[i + nd] for i in range(nd)]
        else:
            raise self.unsupported(node, f"auto_pad={auto}")
        if any(b < 0 for b in begins) or any(o < 1 for o in want):
            raise self.unsupported(node, "its padding would extend the output at the start")
        # Output index o is full index o + begin; full positions past `base` are zeros.
        pads = [[begins[i], max(base[i] - begins[i] - want[i], 0)] for i in range(nd)]
        more = [max(want[i] + begins[i] - base[i], 0) for i in range(nd)]
        cin, groups = int(w.shape[0]), int(a.get("group", 1))
        if cin != v.shape[1] or cin % groups:
            raise self.unsupported(
                node, f"its kernel of shape {list(w.shape)} does not fit the input"
            )
        attrs = {
            "strides": strides,
            "dilations": dil,
            "pads": pads,
            "output_padding": more,
            "groups": groups,
        }
        weights = {"kernel": np.transpose(w, (0, *range(2, w.ndim), 1))}  # [Cin, k..., Cout/g]
        if bias is not None:
            weights["bias"] = bias
        v = self.to_layout(v, _channels_last(v.rank), node)
        out_shape = (None, int(w.shape[1]) * groups, *want)
        perm = _channels_last(v.rank)
        name = self.emit(
            "conv_transpose", [v.name], node, tuple(out_shape[p] for p in perm), attrs, weights
        )
        return _Val(name, perm, out_shape)

    def _slice(self, node: Node, v: _Val, spec: dict[int, tuple[int, int, int]]) -> _Val:
        """Slice logical axes {axis: (start, step, size)} of `v`, in its layout."""
        starts, steps, sizes = [], [], []
        for p in v.perm[1:]:
            d = int(v.shape[p])  # type: ignore[arg-type]
            start, step, size = spec.get(p, (0, 1, d))
            starts.append(start)
            steps.append(step)
            sizes.append(size)
        out_shape = tuple(spec[i][2] if i in spec else d for i, d in enumerate(v.shape))
        if out_shape == v.shape and all(s == 1 for s in steps):
            return v
        name = self.emit(
            "slice",
            [v.name],
            node,
            tuple(out_shape[p] for p in v.perm),
            {"starts": starts, "sizes": sizes, "steps": steps},
        )
        return _Val(name, v.perm, out_shape)

    @OPS.register("Slice")
    def lower_Slice(self, node: Node, a: dict[str, Any]) -> _Val:
        v = self.dyn(node)
        if len(node.handle.input) > 1:  # opset 10+: starts, ends, axes, steps as inputs
            starts, ends = self.opt_const(node, 1), self.opt_const(node, 2)
            axes, steps = self.opt_const(node, 3), self.opt_const(node, 4)
        else:
            starts, ends = np.asarray(a.get("starts", [])), np.asarray(a.get("ends", []))
            axes = np.asarray(a["axes"]) if "axes" in a else None
            steps = None
        if starts is None or ends is None:
            raise self.unsupported(node, "starts and ends must be constants")
        st = [int(x) for x in starts.reshape(-1)]
        en = [int(x) for x in ends.reshape(-1)]
        ax = (
            [int(x) % v.rank for x in axes.reshape(-1)]
            if axes is not None
            else list(range(len(st)))
        )
        sp = [int(x) for x in steps.reshape(-1)] if steps is not None else [1] * len(st)
        spec: dict[int, tuple[int, int, int]] = {}
        for axis, start, end, step in zip(ax, st, en, sp, strict=True):
            if step == 0:
                raise self.unsupported(node, "a step of 0")
            if axis == 0:
                if start == 0 and step == 1 and end >= 2**31 - 1:
                    continue  # the whole batch axis: nothing to do
                raise self.unsupported(node, "slicing the batch axis")
            d = int(v.shape[axis])  # type: ignore[arg-type]
            start = start + d if start < 0 else start
            end = end + d if end < 0 else end
            if step > 0:
                start, end = min(max(start, 0), d), min(max(end, 0), d)
            else:
                start, end = min(max(start, 0), d - 1), min(max(end, -1), d - 1)
            size = max(0, -(-(end - start) // step))
            if size == 0:
                raise self.unsupported(node, f"axis {axis} would be empty")
            spec[axis] = (start, step, size)
        return self._slice(node, v, spec)

    @OPS.register("Split")
    def lower_Split(self, node: Node, a: dict[str, Any]) -> list[_Val | None]:
        v = self.dyn(node)
        axis = int(a.get("axis", 0)) % v.rank
        if axis == 0:
            raise self.unsupported(node, "splitting the batch axis")
        d = int(v.shape[axis])  # type: ignore[arg-type]
        outs = list(node.handle.output)
        split = self.opt_const(node, 1) if len(node.handle.input) > 1 else None
        if split is None and "split" in a:
            split = np.asarray(a["split"])
        if split is not None and split.size:
            sizes = [int(x) for x in split.reshape(-1)]
        elif a.get("num_outputs"):  # opset 18: equal parts, the last one smaller
            part = -(-d // int(a["num_outputs"]))
            sizes = [min(part, d - i * part) for i in range(int(a["num_outputs"]))]
        else:
            if d % len(outs):
                raise self.unsupported(node, f"{d} does not split into {len(outs)} equal parts")
            sizes = [d // len(outs)] * len(outs)
        if len(sizes) != len(outs) or sum(sizes) != d or min(sizes) < 1:
            raise self.unsupported(
                node, f"split sizes {sizes} do not fit axis {axis} of length {d}"
            )
        vals: list[_Val | None] = []
        start = 0
        for t, size in zip(outs, sizes, strict=True):
            # Only the outputs something reads become slices.
            vals.append(self._slice(node, v, {axis: (start, 1, size)}) if t in self.used else None)
            start += size
        return vals

    @OPS.register("Tile")
    def lower_Tile(self, node: Node, a: dict[str, Any]) -> _Val:
        # Tiling an axis r times is concatenating r copies along it (tf2onnx writes
        # Keras's nearest UpSampling as Unsqueeze -> Tile -> Reshape).
        v = self.dyn(node)
        reps = self.opt_const(node, 1)
        if reps is None:
            raise self.unsupported(node, "its repeats must be a constant")
        r = [int(x) for x in reps.reshape(-1)]
        if len(r) != v.rank or min(r) < 1:
            raise self.unsupported(node, f"repeats {r} do not fit rank {v.rank}")
        if r[0] != 1:
            raise self.unsupported(node, "tiling the batch axis")
        for ax, k in enumerate(r):
            if k == 1:
                continue
            shape = tuple(d * k if i == ax else d for i, d in enumerate(v.shape))  # type: ignore[operator]
            name = self.emit(
                "concat",
                [v.name] * k,
                node,
                tuple(shape[p] for p in v.perm),
                {"axis": v.phys_axis(ax)},
            )
            v = _Val(name, v.perm, shape)
        return v

    @OPS.register("Erfc")
    def lower_Erfc(self, node: Node, a: dict[str, Any]) -> _Val:
        return self.act(node, self.dyn(node), activation("erfc"))


SUPPORTED_OPS = sorted(OPS.types())
