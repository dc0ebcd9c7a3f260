"""Keras 3 (TensorFlow backend) adapter: load, flatten, cut, lower.

Nested models (a pretrained backbone used as a layer) are flattened: the graph view
lists their inner layers, named `outer/inner`, so a cut can fall inside them. The
public part is rebuilt by re-applying the original layer objects (sharing their
weights) from a fresh Input up to the cut tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._deps import require
from ..errors import ModelLoadError, UnsupportedOpError
from ..graph import CutPoint, GraphView, Node, TensorInfo, input_ancestors
from ..program import Program, ProgramBuilder, activation
from .base import ModelAdapter, Translators

# Layers that only matter in training: identity at inference.
IDENTITY_LAYERS = {
    "Dropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "SpatialDropout3D",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "ActivityRegularization",
    "Identity",
}
ACTIVATION_NAMES = {
    "linear",
    "relu",
    "relu6",
    "leaky_relu",
    "elu",
    "selu",
    "gelu",
    "sigmoid",
    "hard_sigmoid",
    "hard_silu",
    "hard_swish",
    "tanh",
    "softmax",
    "swish",
    "silu",
}
MERGE_LAYERS = {
    "Add",
    "Subtract",
    "Multiply",
    "Average",
    "Maximum",
    "Minimum",
    "Concatenate",
    "TrueDivide",  # keras.ops.divide in a functional model
    "Divide",
    "Where",  # keras.ops.where(cond, x, y)
}
LAYERS = Translators()  # layer type -> translator; filled by @LAYERS.register below


@dataclass
class _Record:
    """What we keep per flattened layer call, to rebuild or lower it later."""

    layer: Any
    arguments: Any  # keras SymbolicArguments of this call
    input_ids: list[int]  # id() of the KerasTensors this call reads
    output_ids: list[int]


def _to_numpy(v: Any) -> np.ndarray:
    return np.asarray(v.numpy() if hasattr(v, "numpy") else v, dtype=np.float32)


def _is_model(op: Any) -> bool:
    return hasattr(op, "_nodes_by_depth") or getattr(op, "_functional", None) is not None


def _functional(model: Any) -> Any:
    """The Functional graph behind a Model (Sequential keeps one in `_functional`)."""
    f = getattr(model, "_functional", None)
    return f if f is not None else model


# Arguments that Keras 2 / tf.keras wrote into layer configs and Keras 3 refuses, by
# layer class: each is dropped only when it has its Keras 2 default (anything else
# would change the layer, so it still fails and says why).
LEGACY_ARGUMENTS: dict[str, dict[str, Any]] = {
    "DepthwiseConv2D": {"groups": 1},
    "DepthwiseConv1D": {"groups": 1},
    "Conv2DTranspose": {"groups": 1},
    "Conv1DTranspose": {"groups": 1},
    "Conv3DTranspose": {"groups": 1},
}


def _legacy_layers(keras: Any) -> dict[str, Any]:
    """For `custom_objects` when reading a Keras 2 era .h5 file: stand-ins for the layers
    in LEGACY_ARGUMENTS whose `from_config` drops those arguments and builds the plain
    Keras 3 layer, so the model (and any public part saved from it) holds only
    standard layers."""
    patched: dict[str, Any] = {}
    for name, defaults in LEGACY_ARGUMENTS.items():
        base = getattr(keras.layers, name, None)
        if base is None:
            continue

        def from_config(
            cls: Any, config: dict[str, Any], _base: Any = base, _d: dict[str, Any] = defaults
        ) -> Any:
            config = {k: v for k, v in config.items() if not (k in _d and v == _d[k])}
            return _base.from_config(config)

        patched[name] = type(name, (base,), {"from_config": classmethod(from_config)})
    return patched


def _load_keras_file(path: Path) -> Any:
    """Read a .keras or legacy .h5 file. Keras 2 era .h5 files go through tf_keras when
    it is installed (it reads them natively); otherwise Keras 3 reads them with the
    known renamed/removed arguments dropped. A file that still fails shows the
    framework's own reason in full."""
    keras = require("keras")
    legacy = path.suffix.lower() in (".h5", ".hdf5")
    errors: list[str] = []
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as e:  # Keras raises many unrelated types here
        errors.append(f"{type(e).__name__}: {str(e).strip()}")
    if legacy:
        try:
            return keras.saving.load_model(
                path, compile=False, custom_objects=_legacy_layers(keras)
            )
        except Exception as e:
            errors.append(f"with Keras 2 arguments dropped: {type(e).__name__}: {str(e).strip()}")
        try:
            import tf_keras  # Keras 2, if the user has it
        except ImportError:
            pass
        else:
            try:
                model = tf_keras.models.load_model(path, compile=False)
            except Exception as e:
                errors.append(f"tf_keras: {type(e).__name__}: {str(e).strip()}")
            else:
                del model
                raise ModelLoadError(
                    f"{path.name} is a Keras 2 model (tf_keras reads it) that Keras 3 cannot "
                    "read; re-save it as a Keras 3 .keras file (rebuild the architecture in "
                    "Keras 3 and load the weights with `load_weights`), then split that. "
                    "Keras 3 said: " + " | ".join(errors)
                )
    raise ModelLoadError(
        f"Keras cannot read {path.name}; check that it is a Keras 3 .keras or legacy .h5 "
        f"model and that custom layers are registered. The framework said: " + " | ".join(errors)
    )


# Weightless ops a padding mask is made with from model inputs; where their inputs
# pass through a cut, the private side computes them again (GraphView.passthrough).
MASK_OPS = {"NotEqual", "Equal", "Cast", "ExpandDims", "Reshape", "Squeeze"}


def _keep_output(model: Any, file: str, output: str | None) -> Any:
    """The model ending in its output `output` (named as `model.output_names` lists
    them): the enclave program has one output, so a model of several needs the
    choice."""
    outs = list(getattr(model, "outputs", None) or [])
    names = [str(n) for n in (getattr(model, "output_names", None) or [])]
    if len(names) != len(outs):
        names = [getattr(t, "name", f"output_{i}") for i, t in enumerate(outs)]
    if output is None:
        if len(outs) > 1:
            raise ModelLoadError(
                f"{file} has {len(outs)} outputs ({', '.join(names)}) and a split model ends "
                f"in one: choose it with --model-output NAME (Python: output=NAME), e.g. "
                f"--model-output {names[0]}."
            )
        return model
    if output not in names:
        raise ModelLoadError(
            f"--model-output {output!r} is not an output of {file}; its outputs are {', '.join(names)}."
        )
    if len(outs) == 1:
        return model
    keras = require("keras")
    return keras.Model(model.inputs, outs[names.index(output)], name=model.name)


class KerasAdapter(ModelAdapter):
    framework = "keras"
    public_suffix = ".keras"

    def __init__(
        self,
        path: Path,
        input_shapes: dict[str, tuple[int, ...]] | None = None,
        output: str | None = None,
    ) -> None:
        super().__init__(path)
        model = _keep_output(_load_keras_file(path), path.name, output)
        self._init_from_model(model, input_shapes)

    @classmethod
    def from_model(
        cls,
        model: Any,
        path: Path | None = None,
        input_shapes: dict[str, tuple[int, ...]] | None = None,
        output: str | None = None,
    ) -> KerasAdapter:
        """Wrap an in-memory model (used by the Python API and tests). `input_shapes`
        fixes dynamic dimensions of named inputs (the first, the batch, stays free),
        e.g. a keras-hub backbone's sequence length; `output` names the output the
        split model ends in (required for a model of several)."""
        self = cls.__new__(cls)
        self.path = path or Path("<memory>")
        self._init_from_model(_keep_output(model, self.path.name, output), input_shapes)
        return self

    def _init_from_model(
        self, model: Any, input_shapes: dict[str, tuple[int, ...]] | None = None
    ) -> None:
        if not _is_model(model) or not getattr(model, "inputs", None):
            raise ModelLoadError(
                "Only built Functional or Sequential Keras models can be split (subclassed "
                "models have no graph to cut); rebuild it with the Functional API."
            )
        self.model = model
        self._names: dict[int, str] = {}  # id(KerasTensor) -> tensor name
        self._records: dict[str, _Record] = {}  # node name -> call record
        self._tensor_info: dict[str, TensorInfo] = {}
        self._nodes: list[Node] = []
        self._used_names: set[str] = set()
        f = _functional(model)
        inputs = [self._name_tensor(t, self._input_name(t)) for t in f.inputs]
        self._flatten(f, prefix="")
        outputs = [self._names[id(t)] for t in f.outputs]
        self._fix_input_shapes(inputs, input_shapes or {})
        if self._static_shapes(inputs):
            for node in self._nodes:
                node.flops = self._flops(node.handle, node.inputs, node.outputs)
        self._graph = GraphView(
            framework="keras",
            inputs=[self._tensor_info[n] for n in inputs],
            outputs=[self._tensor_info[n] for n in outputs],
            nodes=self._nodes,
            tensors=self._tensor_info,
            passthrough=self._passthrough(inputs),
        )

    def _fix_input_shapes(self, inputs: list[str], shapes: dict[str, tuple[int, ...]]) -> None:
        """Apply `input_shapes` (NAME → full shape, batch first) to the model inputs."""
        unknown = sorted(set(shapes) - set(inputs))
        if unknown:
            raise ModelLoadError(
                f"--input-shape names {unknown}, which are not inputs of this model "
                f"(its inputs: {inputs})."
            )
        for name, shape in shapes.items():
            info = self._tensor_info[name]
            if len(shape) != len(info.shape) or any(
                d is not None and d != s for d, s in zip(info.shape[1:], shape[1:], strict=True)
            ):
                raise ModelLoadError(
                    f"--input-shape {name}={'x'.join(map(str, shape))} does not fit the "
                    f"input's shape {list(info.shape)} (batch first)."
                )
            self._tensor_info[name] = TensorInfo(name, (None, *shape[1:]), info.dtype)

    def _static_shapes(self, inputs: list[str]) -> bool:
        """Where layers were built for a dynamic axis (a keras-hub backbone inside a
        model with a fixed sequence length, or `input_shapes`), work every tensor's
        shape out again from the static model inputs, symbolically (no new nodes)."""
        info = self._tensor_info
        dynamic = any(None in t.shape[1:] for t in info.values())
        if not dynamic or any(None in info[n].shape[1:] for n in inputs):
            return False
        keras = require("keras")
        values = {n: keras.KerasTensor(info[n].shape, dtype=info[n].dtype) for n in inputs}
        for node in self._nodes:
            rec = self._records[node.name]
            try:
                by_id = {i: values[self._names[i]] for i in rec.input_ids}
                args, kwargs = rec.arguments.fill_in(by_id)
                out = rec.layer.compute_output_spec(*args, **kwargs)
            except Exception:  # leave the recorded shapes; lowering names what it lacks
                return True
            flat = keras.tree.flatten(out)
            if len(flat) != len(node.outputs):
                return True
            for name, v in zip(node.outputs, flat, strict=True):
                values[name] = v
                shape = tuple(None if d is None else int(d) for d in v.shape)
                info[name] = TensorInfo(name, shape, info[name].dtype)
        return True

    def _passthrough(self, inputs: list[str]) -> set[str]:
        """Tensors that may cross a cut beside the cut tensor (GraphView.passthrough):
        the model inputs of a model of several inputs and integer or bool inputs (token
        ids, padding masks: transformer blocks read them again after the embeddings),
        and what weightless mask ops (cast, expand_dims, not_equal, …) compute from
        them alone, which the private side computes again. A single float input is not
        passed through: its cut points stay as they were. Nor is a mask that reaches a
        layer as a Keras mask (`Embedding(mask_zero=True)` into a pooling: a second
        tensor into a one-input layer), nor the inputs it comes from."""
        info = self._tensor_info
        through = {
            n for n in inputs if len(inputs) > 1 or any(k in info[n].dtype for k in ("int", "bool"))
        }
        derive = [
            n
            for n in self._nodes
            if n.op_type in MASK_OPS and n.params == 0 and n.inputs and n.outputs
        ]
        for node in derive:  # topological order: chains of mask ops
            if all(t in through for t in node.inputs):
                through.update(node.outputs)
        readers: dict[str, list[Node]] = {}
        for node in self._nodes:
            for t in node.inputs:
                readers.setdefault(t, []).append(node)
        multi = MERGE_LAYERS | {"MultiHeadAttention", "TransformerEncoder"}
        changed = True
        while changed:
            changed = False
            for node in derive:
                outs = set(node.outputs)
                if outs <= through and any(
                    r.op_type not in multi and len(r.inputs) != 1
                    for t in outs
                    for r in readers.get(t, [])
                ):
                    through -= outs  # a Keras mask: it stays where it is computed
                    changed = True
                if not outs <= through and any(t in through for t in node.inputs):
                    through.difference_update(node.inputs)  # it would cross with them
                    changed = True
        return through

    # -- flattening -----------------------------------------------------------------
    @staticmethod
    def _input_name(t: Any) -> str:
        hist = getattr(t, "_keras_history", None)
        return hist.operation.name if hist is not None else (t.name or "input")

    def _name_tensor(self, t: Any, hint: str) -> str:
        if id(t) in self._names:
            return self._names[id(t)]
        name, i = hint, 1
        while name in self._used_names:
            i += 1
            name = f"{hint}_{i}"
        self._used_names.add(name)
        self._names[id(t)] = name
        shape = tuple(None if d is None else int(d) for d in t.shape)
        self._tensor_info[name] = TensorInfo(name, shape, str(t.dtype))
        return name

    def _flatten(self, f: Any, prefix: str) -> None:
        keras = require("keras")
        for depth in sorted(f._nodes_by_depth, reverse=True):
            for node in f._nodes_by_depth[depth]:
                op = node.operation
                if op is None or node.is_input:
                    continue
                if _is_model(op):
                    inner = _functional(op)
                    for outer_t, inner_t in zip(node.input_tensors, inner.inputs, strict=True):
                        self._names[id(inner_t)] = self._names[id(outer_t)]
                    self._flatten(inner, prefix=f"{prefix}{op.name}/")
                    for outer_t, inner_t in zip(node.outputs, inner.outputs, strict=True):
                        self._names[id(outer_t)] = self._names[id(inner_t)]
                    continue
                name = f"{prefix}{op.name}"
                if name in self._records:  # a layer applied twice: name the calls apart
                    name = f"{name}#{sum(1 for n in self._records if n.startswith(name))}"
                outs = [
                    self._name_tensor(t, name if len(node.outputs) == 1 else f"{name}:{i}")
                    for i, t in enumerate(node.outputs)
                ]
                ins = [self._names[id(t)] for t in node.input_tensors]
                is_layer = isinstance(op, keras.layers.Layer)
                weights = op.weights if is_layer else []
                trainable = None
                if weights:
                    trainable = bool(op.trainable and op.trainable_weights)
                self._records[name] = _Record(
                    op,
                    node.arguments,
                    [id(t) for t in node.input_tensors],
                    [id(t) for t in node.outputs],
                )
                self._nodes.append(
                    Node(
                        name=name,
                        op_type=type(op).__name__,
                        inputs=ins,
                        outputs=outs,
                        params=int(sum(math.prod(w.shape) for w in weights)),
                        flops=self._flops(op, ins, outs),
                        trainable=trainable,
                        handle=op,
                    )
                )

    def _flops(self, layer: Any, ins: list[str], outs: list[str]) -> int:
        """Multiply-adds x2 per sample for the heavy layers, output size otherwise."""
        kind = type(layer).__name__
        out = self._tensor_info[outs[0]] if outs else None
        out_elems = out.elements_per_sample if out else 0
        if kind == "Dense":
            return 2 * out_elems * int(layer.kernel.shape[0])
        if kind in ("Conv1D", "Conv2D", "DepthwiseConv1D", "DepthwiseConv2D"):
            k = layer.kernel.shape
            return 2 * out_elems * math.prod(k[:-2]) * int(k[-2])
        if kind in ("SeparableConv1D", "SeparableConv2D"):
            dk = layer.depthwise_kernel.shape
            inp = self._tensor_info[ins[0]]
            spatial = out_elems // int(out.shape[-1]) if out else 0
            cin = int(inp.shape[-1])
            return 2 * spatial * cin * int(dk[-1]) * (math.prod(dk[:-2]) + int(out.shape[-1]))
        if kind in ("EinsumDense", "MultiHeadAttention", "TransformerEncoder") and out:
            # Their weights act on each token: params multiply-adds per token, plus for
            # self-attention the scores and the weighted values (2 × seq² × hidden each).
            # (An unknown sequence length counts as 1, as in elements_per_sample.)
            dims = [int(d or 1) for d in out.shape[1:]]
            tokens = out_elems // max(dims[-1], 1) if dims else 1
            flops = 2 * tokens * int(layer.count_params())
            if kind != "EinsumDense" and len(dims) == 2:
                flops += 4 * dims[0] ** 2 * dims[1]
            return flops
        return out_elems

    # -- ModelAdapter -------------------------------------------------------------
    @property
    def graph(self) -> GraphView:
        return self._graph

    def node_weights(self) -> dict[str, list[np.ndarray]]:
        return {
            n.name: [_to_numpy(w) for w in n.handle.weights]
            for n in self._nodes
            if getattr(n.handle, "weights", None)
        }

    def predict(self, x: np.ndarray | list[np.ndarray]) -> np.ndarray:
        if isinstance(x, (list, tuple)) and len(x) == 1:
            x = x[0]
        elif isinstance(x, (list, tuple)):
            # In model-input order; a model built on a dict of inputs gets the dict.
            keras = require("keras")
            struct = getattr(_functional(self.model), "_inputs_struct", None)
            if isinstance(struct, dict):
                x = keras.tree.pack_sequence_as(struct, list(x))
        return np.asarray(self.model(x, training=False), dtype=np.float32)

    def _vocabulary(self, tensor: str) -> int:
        """The smallest table an integer input indexes (2 if no embedding reads it)."""
        sizes = []
        for node in self._nodes:
            if tensor in node.inputs:
                layer = node.handle
                for attr in ("input_dim", "vocabulary_size"):
                    if isinstance(getattr(layer, attr, None), int):
                        sizes.append(int(getattr(layer, attr)))
                        break
        return min(sizes, default=2)

    def _random_input(self, inp: TensorInfo, n: int, rng: np.random.Generator) -> np.ndarray:
        shape = (n, *[int(d or 1) for d in inp.shape[1:]])
        if "bool" in inp.dtype or ("int" in inp.dtype and "mask" in inp.name.lower()):
            # A padding mask: each sample keeps a random-length prefix (at least one).
            keep = rng.integers(1, shape[-1] + 1, size=(n, *shape[1:-1], 1))
            return (np.arange(shape[-1]) < keep).astype(inp.dtype)
        if "int" in inp.dtype:
            vocab = self._vocabulary(inp.name)
            if len(self._graph.inputs) == 1:  # as before: the smallest table of all
                vocab = min(
                    (int(m.handle.input_dim) for m in self._nodes if m.op_type == "Embedding"),
                    default=vocab,
                )
            return rng.integers(0, vocab, size=shape).astype(inp.dtype)
        return rng.random(shape, dtype=np.float32)  # see ModelAdapter.random_inputs

    def random_inputs(self, n: int, rng: np.random.Generator) -> Any:
        """One array, or a list in model-input order for a model of several inputs;
        integer inputs get ids inside the tables that read them, and padding masks
        (integer or bool inputs named `*mask*`) a prefix of ones."""
        xs = [self._random_input(inp, n, rng) for inp in self._graph.inputs]
        return xs[0] if len(xs) == 1 else xs

    def build_public(self, cut: CutPoint) -> Any:
        """A Keras model from the model inputs the cut tensor depends on (in model-input
        order) to the cut tensor."""
        keras = require("keras")
        needed = {t.name for t in input_ancestors(self._graph, {cut.tensor.name})}
        new_inputs, values = [], {}
        for inp_info, orig_input in zip(
            self._graph.inputs, _functional(self.model).inputs, strict=True
        ):
            if inp_info.name in needed:
                new_input = keras.Input(
                    shape=tuple(orig_input.shape[1:]), dtype=orig_input.dtype, name=inp_info.name
                )
                new_inputs.append(new_input)
                values[inp_info.name] = new_input
        for node in self._nodes[: cut.position]:
            rec = self._records[node.name]
            by_id = {i: values[self._names[i]] for i in rec.input_ids}
            args, kwargs = rec.arguments.fill_in(by_id)
            result = rec.layer(*args, **kwargs)
            flat = result if isinstance(result, list | tuple) else [result]
            for name, value in zip(node.outputs, flat, strict=True):
                values[name] = value
        inputs = new_inputs[0] if len(new_inputs) == 1 else new_inputs
        return keras.Model(inputs, values[cut.tensor.name], name="public")

    def save_public(self, cut: CutPoint, path: Path) -> None:
        self.build_public(cut).save(path)

    def lower_private(self, cut: CutPoint) -> Program:
        lowerer = _Lowerer(self._tensor_info, self._records)
        model_inputs = {t.name for t in self._graph.inputs}
        lowerer.model_inputs = {t.name for t in cut.private_inputs if t.name in model_inputs}
        # Masks computed from model inputs on the public side that the private side
        # reads too (GraphView.passthrough): computed again in the enclave.
        through = self._graph.passthrough
        needed = {t for n in self._nodes[cut.position :] for t in n.inputs}
        redo: list[Node] = []
        for node in reversed(self._nodes[: cut.position]):
            if any(t in needed for t in node.outputs) and all(t in through for t in node.outputs):
                redo.append(node)
                needed.update(node.inputs)
        for node in [*reversed(redo), *self._nodes[cut.position :]]:
            lowerer.lower(node)
        (out,) = self._graph.outputs
        if cut.tensor.dtype not in ("float32", "int32", "int64"):
            raise UnsupportedOpError(
                f"The cut tensor {cut.tensor.name!r} is {cut.tensor.dtype}; the enclave takes "
                "float32 (or int32/int64 ids for an Embedding) only, so cut after the layer "
                "that turns it into float32."
            )
        prog_out = TensorInfo(lowerer.env[out.name], out.shape, "float32")
        return lowerer.builder.build([_program_input(t) for t in cut.private_inputs], [prog_out])


def _program_input(t: TensorInfo) -> TensorInfo:
    """A program input: integer ids and masks (token ids into an enclaved Embedding, a
    padding mask) travel as float32, exact below 2^24, declared int32/int64 (bool as
    int32); the worker's gather checks each id is an integer inside its table."""
    if t.dtype in ("int32", "int64"):
        return t
    if "int" in t.dtype or "bool" in t.dtype:
        return TensorInfo(t.name, t.shape, "int32")
    return TensorInfo(t.name, t.shape, "float32")


def _pair(v: Any, n: int) -> list[int]:
    return [int(v)] * n if isinstance(v, int) else [int(x) for x in v]


def _same_pads(size: int, k: int, s: int, d: int) -> list[int]:
    """TensorFlow's "same" padding: output = ceil(size / s), extra pad at the end."""
    eff = (k - 1) * d + 1
    out = -(-size // s)
    total = max((out - 1) * s + eff - size, 0)
    return [total // 2, total - total // 2]


def _activation_of(fn: Any, where: str) -> dict[str, Any] | None:
    keras = require("keras")
    name = keras.activations.serialize(fn) if fn is not None else "linear"
    if isinstance(name, dict):  # a configured activation object, or a registered function
        cfg = name.get("config", {})
        name = cfg.split(">")[-1] if isinstance(cfg, str) else cfg.get("name", str(name))
    if name == "gelu_approximate":  # keras-hub's BERT feed-forward: gelu, tanh form
        return activation("gelu", approximate=True)
    name = {"silu": "swish", "hard_silu": "hard_swish"}.get(name, name)
    if name not in ACTIVATION_NAMES:
        raise UnsupportedOpError(
            f"Layer {where!r} uses activation {name!r}, which the enclave does not support; "
            f"supported: {', '.join(sorted(ACTIVATION_NAMES))}."
        )
    return None if name == "linear" else activation(name)


class _Lowerer:
    """Translates Keras layers on the private side into program ops."""

    def __init__(
        self, tensors: dict[str, TensorInfo], records: dict[str, _Record] | None = None
    ) -> None:
        self.tensors = tensors
        self.records = records or {}  # the call arguments: constants of keras.ops calls
        self.builder = ProgramBuilder()
        self.env: dict[str, str] = {}  # graph tensor -> program tensor
        self.id_masks: set[str] = set()  # 0/1 masks computed from the token ids
        self.model_inputs: set[str] = set()  # model inputs the program takes beside the cut

    def _in(self, node: Node, i: int = 0) -> str:
        t = node.inputs[i]
        return self.env.get(t, t)

    def _shape(self, node: Node, i: int = 0) -> tuple[int | None, ...]:
        return self.tensors[node.inputs[i]].shape

    def lower(self, node: Node) -> None:
        layer = node.handle
        kind = node.op_type
        method = LAYERS.get(kind)
        if kind in IDENTITY_LAYERS:
            self.env[node.outputs[0]] = self._in(node)
            return
        if method is None:
            raise UnsupportedOpError(
                f"Layer {node.name!r} of type {kind} cannot run in the enclave; supported "
                f"layer types: {', '.join(SUPPORTED_LAYERS)}. Cut after it, or replace it."
            )
        multi = MERGE_LAYERS | {"MultiHeadAttention", "TransformerEncoder"}
        if kind not in multi and len(node.inputs) != 1:
            # e.g. a Keras mask (Embedding(mask_zero=True)) travelling with the tensor.
            raise UnsupportedOpError(
                f"Layer {node.name!r} ({kind}) receives {len(node.inputs)} tensors (a Keras "
                "mask?); masks cannot cross into the enclave, so cut after this layer."
            )
        if getattr(layer, "data_format", "channels_last") == "channels_first":
            raise UnsupportedOpError(
                f"Layer {node.name!r} uses data_format='channels_first'; the enclave runs "
                "channels-last layers only."
            )
        out = method(self, node, layer)
        self.env[node.outputs[0]] = out

    def _act(self, layer: Any, node: Node) -> dict[str, Any] | None:
        return _activation_of(getattr(layer, "activation", None), node.name)

    # -- dense and convolutions ---------------------------------------------------
    @LAYERS.register("Dense")
    def lower_Dense(self, node: Node, layer: Any) -> str:
        w = {"kernel": _to_numpy(layer.kernel)}
        if layer.use_bias:
            w["bias"] = _to_numpy(layer.bias)
        attrs = {}
        act = self._act(layer, node)
        if act:
            attrs["activation"] = act
        return self.builder.add("dense", [self._in(node)], node.name, attrs, w)

    def _conv_attrs(self, node: Node, layer: Any, window: list[int]) -> dict[str, Any]:
        in_shape = self._shape(node)
        nsp = len(window)
        strides = _pair(layer.strides, nsp)
        dil = _pair(layer.dilation_rate, nsp)
        padding = layer.padding
        if padding == "valid":
            pads = [[0, 0]] * nsp
        elif padding == "same":
            pads = [
                _same_pads(int(in_shape[1 + i]), window[i], strides[i], dil[i]) for i in range(nsp)
            ]
        elif padding == "causal":
            pads = [[(window[0] - 1) * dil[0], 0]]
        else:
            raise UnsupportedOpError(f"Layer {node.name!r} has unknown padding {padding!r}.")
        return {"strides": strides, "dilations": dil, "pads": pads, "groups": 1}

    def _conv(
        self,
        node: Node,
        x: str,
        kernel: np.ndarray,
        bias: np.ndarray | None,
        attrs: dict[str, Any],
        act: dict[str, Any] | None,
        name: str,
    ) -> str:
        w = {"kernel": kernel}
        if bias is not None:
            w["bias"] = bias
        if act:
            attrs = {**attrs, "activation": act}
        return self.builder.add("conv", [x], name, attrs, w)

    @LAYERS.register("Conv1D", "Conv2D")
    def lower_Conv1D(self, node: Node, layer: Any) -> str:
        kernel = _to_numpy(layer.kernel)
        attrs = self._conv_attrs(node, layer, list(kernel.shape[:-2]))
        attrs["groups"] = int(getattr(layer, "groups", 1))
        bias = _to_numpy(layer.bias) if layer.use_bias else None
        return self._conv(
            node, self._in(node), kernel, bias, attrs, self._act(layer, node), node.name
        )

    def _depthwise(
        self,
        node: Node,
        layer: Any,
        x: str,
        dk: np.ndarray,
        name: str,
        bias: np.ndarray | None,
        act: dict[str, Any] | None,
    ) -> str:
        window = list(dk.shape[:-2])
        cin, mult = int(dk.shape[-2]), int(dk.shape[-1])
        attrs = self._conv_attrs(node, layer, window)
        attrs["groups"] = cin
        # [k..., Cin, mult] -> [k..., 1, Cin*mult]: output channel c*mult+m, as Keras orders it.
        kernel = dk.reshape(*window, 1, cin * mult)
        return self._conv(node, x, kernel, bias, attrs, act, name)

    @LAYERS.register("DepthwiseConv2D", "DepthwiseConv1D")
    def lower_DepthwiseConv2D(self, node: Node, layer: Any) -> str:
        bias = _to_numpy(layer.bias) if layer.use_bias else None
        return self._depthwise(
            node,
            layer,
            self._in(node),
            _to_numpy(layer.kernel),
            node.name,
            bias,
            self._act(layer, node),
        )

    @LAYERS.register("SeparableConv2D", "SeparableConv1D")
    def lower_SeparableConv2D(self, node: Node, layer: Any) -> str:
        dw = self._depthwise(
            node,
            layer,
            self._in(node),
            _to_numpy(layer.depthwise_kernel),
            f"{node.name}/depthwise",
            None,
            None,
        )
        pk = _to_numpy(layer.pointwise_kernel)
        nsp = pk.ndim - 2
        attrs = {"strides": [1] * nsp, "dilations": [1] * nsp, "pads": [[0, 0]] * nsp, "groups": 1}
        bias = _to_numpy(layer.bias) if layer.use_bias else None
        return self._conv(
            node, dw, pk, bias, attrs, self._act(layer, node), f"{node.name}/pointwise"
        )

    @LAYERS.register("Conv2DTranspose", "Conv1DTranspose")
    def lower_Conv2DTranspose(self, node: Node, layer: Any) -> str:
        kernel = _to_numpy(layer.kernel)  # [k..., Cout, Cin]
        nsp = kernel.ndim - 2
        window = [int(k) for k in kernel.shape[:nsp]]
        strides = _pair(layer.strides, nsp)
        dil = _pair(layer.dilation_rate, nsp)
        in_sp = [int(d) for d in self._shape(node)[1:-1]]
        out_sp = [int(d) for d in self.tensors[node.outputs[0]].shape[1:-1]]
        if layer.padding not in ("valid", "same"):
            raise UnsupportedOpError(f"Layer {node.name!r} has unknown padding {layer.padding!r}.")
        pads, extra = [], []
        for i in range(nsp):
            # TensorFlow's transposed conv with the output size Keras chose: the
            # gradient of a conv from that size, so "same" crops as that conv pads.
            full = (in_sp[i] - 1) * strides[i] + dil[i] * (window[i] - 1) + 1
            begin = 0
            if layer.padding == "same":
                begin = max(full - out_sp[i], 0) // 2
            end = full - begin - out_sp[i]
            pads.append([begin, max(end, 0)])
            extra.append(max(-end, 0))
        attrs = {
            "strides": strides,
            "dilations": dil,
            "pads": pads,
            "output_padding": extra,
            "groups": 1,
        }
        act = self._act(layer, node)
        if act:
            attrs["activation"] = act
        w = {"kernel": np.transpose(kernel, (nsp + 1, *range(nsp), nsp))}  # [Cin, k..., Cout]
        if layer.use_bias:
            w["bias"] = _to_numpy(layer.bias)
        return self.builder.add("conv_transpose", [self._in(node)], node.name, attrs, w)

    # -- pooling and shape ----------------------------------------------------------
    def _pool(self, node: Node, layer: Any, kind: str) -> str:
        nsp = len(self._shape(node)) - 2
        window = _pair(layer.pool_size, nsp)
        strides = _pair(layer.strides if layer.strides is not None else layer.pool_size, nsp)
        in_shape = self._shape(node)
        if layer.padding == "same":
            pads = [_same_pads(int(in_shape[1 + i]), window[i], strides[i], 1) for i in range(nsp)]
        else:
            pads = [[0, 0]] * nsp
        attrs = {
            "kind": kind,
            "window": window,
            "strides": strides,
            "pads": pads,
            "count_include_pad": False,
        }
        return self.builder.add("pool", [self._in(node)], node.name, attrs)

    @LAYERS.register("MaxPooling2D", "MaxPooling1D")
    def lower_MaxPooling2D(self, node: Node, layer: Any) -> str:
        return self._pool(node, layer, "max")

    @LAYERS.register("AveragePooling2D", "AveragePooling1D")
    def lower_AveragePooling2D(self, node: Node, layer: Any) -> str:
        return self._pool(node, layer, "avg")

    def _global(self, node: Node, layer: Any, kind: str) -> str:
        attrs = {"kind": kind, "keepdims": bool(getattr(layer, "keepdims", False))}
        return self.builder.add("global_pool", [self._in(node)], node.name, attrs)

    @LAYERS.register("GlobalAveragePooling2D", "GlobalAveragePooling1D")
    def lower_GlobalAveragePooling2D(self, node: Node, layer: Any) -> str:
        return self._global(node, layer, "avg")

    @LAYERS.register("GlobalMaxPooling2D", "GlobalMaxPooling1D")
    def lower_GlobalMaxPooling2D(self, node: Node, layer: Any) -> str:
        return self._global(node, layer, "max")

    @LAYERS.register("ZeroPadding2D", "ZeroPadding1D")
    def lower_ZeroPadding2D(self, node: Node, layer: Any) -> str:
        pads = [[int(a), int(b)] for a, b in np.reshape(layer.padding, (-1, 2))]
        return self.builder.add(
            "pad", [self._in(node)], node.name, {"pads": [*pads, [0, 0]], "value": 0.0}
        )

    @LAYERS.register("Cropping2D", "Cropping1D")
    def lower_Cropping2D(self, node: Node, layer: Any) -> str:
        dims = [int(d) for d in self._shape(node)[1:]]
        crops = [[int(a), int(b)] for a, b in np.reshape(layer.cropping, (-1, 2))]
        starts = [c[0] for c in crops] + [0]
        sizes = [d - a - b for d, (a, b) in zip(dims, crops, strict=False)] + [dims[-1]]
        return self.builder.add(
            "slice", [self._in(node)], node.name, {"starts": starts, "sizes": sizes}
        )

    @LAYERS.register("UpSampling2D", "UpSampling1D")
    def lower_UpSampling2D(self, node: Node, layer: Any) -> str:
        in_shape = self._shape(node)
        factors = _pair(layer.size, len(in_shape) - 2)
        interpolation = getattr(layer, "interpolation", "nearest")
        if interpolation == "nearest":  # Keras repeats every row / column
            attrs = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric"}
            attrs["nearest_mode"] = "floor"
        elif interpolation == "bilinear":  # tf.image.resize: half-pixel centres
            attrs = {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}
        else:
            raise UnsupportedOpError(
                f"Layer {node.name!r} uses interpolation={interpolation!r}; the enclave "
                "supports nearest and bilinear."
            )
        attrs["sizes"] = [int(d) * f for d, f in zip(in_shape[1:-1], factors, strict=True)]
        attrs["scales"] = [float(f) for f in factors]
        return self.builder.add("resize", [self._in(node)], node.name, attrs)

    @LAYERS.register("Sum", "Mean", "Max", "Min")
    def lower_reduction(self, node: Node, layer: Any) -> str:
        # keras.ops.sum / mean / max / min over constant non-batch axes (the masked mean
        # pooling of a sentence encoder: sum(h · mask) / sum(mask) over the sequence).
        rank = len(self._shape(node))
        axis = getattr(layer, "axis", None)
        axes = list(range(1, rank)) if axis is None else list(np.atleast_1d(axis))
        axes = sorted({int(a) + rank if int(a) < 0 else int(a) for a in axes})
        if not axes or 0 in axes or any(not 0 < a < rank for a in axes):
            raise UnsupportedOpError(
                f"Layer {node.name!r} ({node.op_type}) reduces over the batch axis; the "
                "enclave reduces over other axes only."
            )
        attrs = {
            "kind": node.op_type.lower(),
            "axes": axes,
            "keepdims": bool(getattr(layer, "keepdims", False)),
        }
        return self.builder.add("reduce", [self._in(node)], node.name, attrs)

    @LAYERS.register("Flatten", "Reshape", "Squeeze", "ExpandDims")
    def reshape_to_output(self, node: Node, layer: Any) -> str:
        # Squeeze / ExpandDims: keras.ops.squeeze / expand_dims in a functional model.
        out_shape = self.tensors[node.outputs[0]].shape
        if not out_shape or out_shape[0] is not None or any(d is None for d in out_shape[1:]):
            raise UnsupportedOpError(
                f"Layer {node.name!r} ({node.op_type}) gives shape {out_shape}: the batch "
                "axis must stay first and every other dim be static."
            )
        target = [int(d) for d in out_shape[1:]]
        return self.builder.add("reshape", [self._in(node)], node.name, {"shape": target})

    # -- normalisation ---------------------------------------------------------------
    def _affine(self, node: Node, scale: Any, shift: Any) -> str:
        """x · scale + shift, both broadcasting against the input (batch axis
        included, as Keras broadcasts them): one `scale_shift` when they vary along
        at most one axis, else a `mul` and an `add` by constants."""
        shape = self._shape(node)
        rank = len(shape)
        arrs = []
        for v in (scale, shift):
            a = np.asarray(_to_numpy(v), dtype=np.float64)
            if a.ndim > rank:
                raise UnsupportedOpError(f"Layer {node.name!r}: its weights outrank its input.")
            a = a.reshape((1,) * (rank - a.ndim) + a.shape)
            if a.shape[0] != 1:
                raise UnsupportedOpError(
                    f"Layer {node.name!r}: its weights would broadcast over the batch axis."
                )
            arrs.append(a)
        varying = sorted({i for a in arrs for i, d in enumerate(a.shape) if i and d != 1})
        x = self._in(node)
        if len(varying) <= 1:
            axis = varying[0] if varying else rank - 1
            c = int(shape[axis])
            vecs = [np.broadcast_to(a.reshape(-1), (c,)) for a in arrs]
            return self.builder.add(
                "scale_shift",
                [x],
                node.name,
                {"axis": axis - rank},
                {"scale": vecs[0], "shift": vecs[1]},
            )
        scale_c = self.builder.constant(f"{node.name}/scale", arrs[0][0])
        y = self.builder.add("mul", [x, scale_c], f"{node.name}/mul")
        shift_c = self.builder.constant(f"{node.name}/shift", arrs[1][0])
        return self.builder.add("add", [y, shift_c], node.name)

    @LAYERS.register("Rescaling")
    def lower_Rescaling(self, node: Node, layer: Any) -> str:
        return self._affine(node, layer.scale, layer.offset)

    @LAYERS.register("Normalization")
    def lower_Normalization(self, node: Node, layer: Any) -> str:
        if layer.mean is None or layer.variance is None:
            raise UnsupportedOpError(
                f"Layer {node.name!r} (Normalization) has no mean and variance yet; adapt it."
            )
        mean = _to_numpy(layer.mean).astype(np.float64)
        std = np.maximum(np.sqrt(_to_numpy(layer.variance).astype(np.float64)), 1e-7)
        if getattr(layer, "invert", False):
            return self._affine(node, std, mean)
        return self._affine(node, 1 / std, -mean / std)

    @LAYERS.register("LayerScale")
    def lower_LayerScale(self, node: Node, layer: Any) -> str:
        # keras.applications ConvNeXt: x * gamma, gamma one value per channel.
        gamma = _to_numpy(layer.gamma)
        return self._affine(node, gamma, np.zeros_like(gamma))

    @LAYERS.register("BatchNormalization")
    def lower_BatchNormalization(self, node: Node, layer: Any) -> str:
        var = _to_numpy(layer.moving_variance)
        mean = _to_numpy(layer.moving_mean)
        gamma = _to_numpy(layer.gamma) if layer.scale else np.ones_like(var)
        beta = _to_numpy(layer.beta) if layer.center else np.zeros_like(var)
        scale = gamma / np.sqrt(var + layer.epsilon)
        shift = beta - mean * scale
        axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
        rank = len(self._shape(node))
        return self.builder.add(
            "scale_shift",
            [self._in(node)],
            node.name,
            {"axis": axis - rank if axis >= 0 else axis},
            {"scale": scale, "shift": shift},
        )

    @LAYERS.register("LayerNormalization")
    def lower_LayerNormalization(self, node: Node, layer: Any) -> str:
        if getattr(layer, "rms_scaling", False):
            raise UnsupportedOpError(f"Layer {node.name!r} uses rms_scaling, not supported.")
        rank = len(self._shape(node))
        axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
        axes = sorted(a - rank if a >= 0 else a for a in axes)
        if axes != list(range(-len(axes), 0)):
            raise UnsupportedOpError(
                f"Layer {node.name!r} normalises over axes {axes}; "
                "only trailing axes are supported."
            )
        w = {}
        if layer.scale:
            w["gamma"] = _to_numpy(layer.gamma)
        if layer.center:
            w["beta"] = _to_numpy(layer.beta)
        return self.builder.add(
            "layer_norm",
            [self._in(node)],
            node.name,
            {"axes": axes, "epsilon": float(layer.epsilon)},
            w,
        )

    # -- attention -------------------------------------------------------------------
    def _einsum_dense(
        self,
        x: str,
        in_shape: tuple[int | None, ...],
        equation: str,
        kernel: np.ndarray,
        bias: np.ndarray | None,
        act: dict[str, Any] | None,
        name: str,
    ) -> tuple[str, tuple[int | None, ...]]:
        """An EinsumDense equation `in,kernel->out` (batch first, kernel axes either
        contracted with the input or new in the output) as transpose → reshape →
        dense → reshape → transpose; returns the output and its shape."""
        fail = UnsupportedOpError(
            f"Layer {name!r}: einsum {equation!r} is not a dense-like pattern the enclave "
            "lowers (batch axis first; each kernel axis contracted with the input or new "
            "in the output; no axis shared by input, kernel and output)."
        )
        try:
            lhs, out = equation.replace(" ", "").split("->")
            ins, ks = lhs.split(",")
        except ValueError:
            raise fail from None
        if "..." in ins or "..." in out:
            free = sorted(set("abcdefghijklmnopqrstuvwxyz") - set(ins + ks + out))
            n_ell = len(in_shape) - len(ins.replace("...", ""))
            if n_ell < 0 or "..." in ks:
                raise fail
            ell = "".join(free[:n_ell])
            ins, out = ins.replace("...", ell), out.replace("...", ell)
        if len(ins) != len(in_shape) or len(ks) != kernel.ndim or ins[0] != out[0]:
            raise fail
        batch = ins[0]
        free = [c for c in ins[1:] if c in out and c not in ks]
        contracted = [c for c in ins[1:] if c in ks and c not in out]
        new = [c for c in out if c in ks and c not in ins]
        if batch in ks or len(free) + len(contracted) != len(ins) - 1:
            raise fail
        if set(ks) != set(contracted) | set(new) or sorted(out) != sorted([batch, *free, *new]):
            raise fail
        dims = dict(zip(ins, in_shape, strict=True))
        dims.update(zip(ks, kernel.shape, strict=True))
        cur = x
        perm = [0] + [ins.index(c) for c in free] + [ins.index(c) for c in contracted]
        if perm != list(range(len(ins))):
            cur = self.builder.add("transpose", [cur], f"{name}/in_t", {"perm": perm})
        kc = math.prod(int(dims[c]) for c in contracted)
        free_dims = [int(dims[c]) for c in free]
        if len(contracted) != 1 or perm != list(range(len(ins))):
            cur = self.builder.add("reshape", [cur], f"{name}/in_r", {"shape": [*free_dims, kc]})
        kt = np.transpose(kernel, [ks.index(c) for c in contracted] + [ks.index(c) for c in new])
        kn = math.prod(int(dims[c]) for c in new)
        w: dict[str, np.ndarray] = {"kernel": kt.reshape(kc, kn)}
        new_dims = [int(dims[c]) for c in new]
        order = [batch, *free, *new]  # the dense result's axes
        extra_bias = None
        if bias is not None:
            out_dims = [int(dims[c]) for c in out[1:]]
            full = np.broadcast_to(bias, out_dims)  # Keras aligns the bias to the last axes
            full = np.transpose(full, [out[1:].index(c) for c in order[1:]])
            per_new = full.reshape(-1, kn)
            if np.all(per_new == per_new[:1]):
                w["bias"] = per_new[0]
            else:
                extra_bias = np.ascontiguousarray(full)
        attrs = {"activation": act} if act and extra_bias is None else {}
        cur = self.builder.add("dense", [cur], name, attrs, w)
        if len(new) != 1:
            cur = self.builder.add(
                "reshape", [cur], f"{name}/out_r", {"shape": free_dims + new_dims}
            )
        if extra_bias is not None:
            cur = self.builder.add(
                "add", [cur, self.builder.constant(f"{name}/bias", extra_bias)], f"{name}/bias_add"
            )
            if act:
                cur = self.builder.add("activation", [cur], f"{name}/act", {"activation": act})
        out_perm = [order.index(c) for c in out]
        if out_perm != list(range(len(out))):
            cur = self.builder.add("transpose", [cur], f"{name}/out_t", {"perm": out_perm})
        return cur, (None, *[int(dims[c]) for c in out[1:]])

    def _einsum_layer(
        self, x: str, shape: tuple[int | None, ...], layer: Any, name: str, scale: float = 1.0
    ) -> tuple[str, tuple[int | None, ...]]:
        kernel = _to_numpy(layer.kernel) * np.float32(scale)
        bias = _to_numpy(layer.bias) * np.float32(scale) if layer.bias is not None else None
        act = _activation_of(getattr(layer, "activation", None), name)
        return self._einsum_dense(x, shape, layer.equation, kernel, bias, act, name)

    @LAYERS.register("Embedding", "ReversibleEmbedding")
    def lower_Embedding(self, node: Node, layer: Any) -> str:
        if getattr(layer, "mask_zero", False):
            raise UnsupportedOpError(
                f"Layer {node.name!r} (Embedding) uses mask_zero; its mask cannot cross the "
                "enclave, so cut after the layers that use it."
            )
        table = _to_numpy(layer.embeddings)
        return self.builder.add("gather", [self._in(node)], node.name, weights={"table": table})

    @LAYERS.register("EinsumDense")
    def lower_EinsumDense(self, node: Node, layer: Any) -> str:
        out, _ = self._einsum_layer(self._in(node), self._shape(node), layer, node.name)
        return out

    @LAYERS.register("MultiHeadAttention")
    def lower_MultiHeadAttention(self, node: Node, layer: Any) -> str:
        rec = self.records.get(node.name)
        if rec is None:
            raise UnsupportedOpError(f"Layer {node.name!r}: no call record.")
        args, kwargs = list(rec.arguments.args), dict(rec.arguments.kwargs)
        names = ["query", "value", "key"]
        call = dict(zip(names, args, strict=False))
        for k in names:
            if k in kwargs:
                call[k] = kwargs.pop(k)
        causal = bool(kwargs.pop("use_causal_mask", False))
        kwargs.pop("training", None)
        attention_mask = kwargs.pop("attention_mask", None)
        if kwargs.pop("return_attention_scores", False):
            raise UnsupportedOpError(
                f"Layer {node.name!r} returns its attention scores; the enclave returns one "
                "tensor, so cut after it."
            )
        if (
            any(v is not None for v in kwargs.values())
            or "query" not in call
            or "value" not in call
        ):
            raise UnsupportedOpError(
                f"Layer {node.name!r} (MultiHeadAttention) is called with "
                f"{sorted(k for k, v in kwargs.items() if v is not None)}; the enclave lowers "
                "query, value, key, attention_mask and use_causal_mask only."
            )
        call.setdefault("key", call["value"])
        if attention_mask is not None:
            call["attention_mask"] = attention_mask

        def tensor(k: str) -> tuple[str, tuple[int | None, ...]]:
            t = call[k]
            for i, tid in enumerate(rec.input_ids):
                if tid == id(t):
                    return self._in(node, i), self._shape(node, i)
            raise UnsupportedOpError(f"Layer {node.name!r}: its {k} is not a graph tensor.")

        (q, qs), (k, ks), (v, vs) = tensor("query"), tensor("key"), tensor("value")
        key_mask = None
        if attention_mask is not None:
            m, ms = tensor("attention_mask")
            key_mask = self._additive_mask(m, ms, (qs[1], ks[1]), node.name)
        return self._attention(
            layer, (q, qs), (k, ks), (v, vs), node.name, causal, key_mask=key_mask
        )

    def _additive_mask(
        self, m: str, shape: tuple[int | None, ...], qk: tuple[Any, Any], n: str
    ) -> str:
        """An attention_mask [N, T, S] (or [N, 1, S]; bool or integer 0/1, True = attend)
        as the additive [N, 1, T, S] mask of the scores: (min(|m|, 1) − 1)·1e9, so any
        non-zero value attends, as Keras's cast to bool does."""
        t, s = int(qk[0]), int(qk[1])
        if len(shape) != 3 or int(shape[2]) != s or int(shape[1]) not in (1, t):
            raise UnsupportedOpError(
                f"Layer {n!r}: its attention_mask has shape {list(shape)}; the enclave takes "
                f"[N, {t}, {s}] or [N, 1, {s}]."
            )
        if m not in self.id_masks:
            d = self.builder.add(
                "activation", [m], f"{n}/mask_abs", {"activation": activation("abs")}
            )
            clip = activation("clip", min=0.0, max=1.0)
            m = self.builder.add("activation", [d], f"{n}/mask_01", {"activation": clip})
        off = self.builder.add(
            "sub", [m, self.builder.constant(f"{n}/one", np.float32(1.0))], f"{n}/mask_off"
        )
        big = self.builder.constant(f"{n}/big", np.float32(1e9))
        add = self.builder.add("mul", [off, big], f"{n}/mask_add")
        dims = [1, int(shape[1]), s]
        return self.builder.add("reshape", [add], f"{n}/mask_heads", {"shape": dims})

    def _attention(
        self,
        layer: Any,
        query: tuple[str, tuple[int | None, ...]],
        key: tuple[str, tuple[int | None, ...]],
        value: tuple[str, tuple[int | None, ...]],
        n: str,
        causal: bool = False,
        key_mask: str | None = None,
    ) -> str:
        """A Keras MultiHeadAttention on program tensors: projections, scaled scores,
        softmax (with a causal mask), the weighted values, the output projection."""
        (q, qs), (k, ks), (v, vs) = query, key, value
        if getattr(layer, "_use_gate", False) or getattr(layer, "_sliding_window", None):
            raise UnsupportedOpError(f"Layer {n!r}: gated or sliding-window attention.")
        if len(qs) != 3 or len(ks) != 3 or tuple(layer._attention_axes) != (1,):
            raise UnsupportedOpError(
                f"Layer {n!r}: MultiHeadAttention is lowered for [batch, seq, features] "
                "inputs attending over the sequence axis only."
            )
        scale = float(layer._inverse_sqrt_key_dim)
        q, q4 = self._einsum_layer(q, qs, layer._query_dense, f"{n}/query", scale)
        k, _ = self._einsum_layer(k, ks, layer._key_dense, f"{n}/key")
        v, _ = self._einsum_layer(v, vs, layer._value_dense, f"{n}/value")
        heads_first = {"perm": [0, 2, 1, 3]}
        q = self.builder.add("transpose", [q], f"{n}/q_heads", heads_first)
        k = self.builder.add("transpose", [k], f"{n}/k_heads", heads_first)
        v = self.builder.add("transpose", [v], f"{n}/v_heads", heads_first)
        scores = self.builder.add("matmul", [q, k], f"{n}/scores", {"transpose_b": True})
        sm_in = [scores]
        if causal:
            t, s = int(qs[1]), int(vs[1])
            mask = np.where(np.tril(np.ones((t, s), bool)), 0.0, -1e9).astype(np.float32)
            sm_in.append(self.builder.constant(f"{n}/causal_mask", mask))
        if key_mask is not None:  # additive [N, 1, 1, S]: 0 where attended, -1e9 where not
            if len(sm_in) == 2:
                sm_in = [scores, self.builder.add("add", [key_mask, sm_in[1]], f"{n}/mask")]
            else:
                sm_in.append(key_mask)
        probs = self.builder.add("softmax", sm_in, f"{n}/softmax", {"axis": -1})
        ctx = self.builder.add("matmul", [probs, v], f"{n}/context")
        ctx = self.builder.add("transpose", [ctx], f"{n}/context_t", heads_first)
        heads, dv = int(q4[2]), int(_to_numpy(layer._value_dense.kernel).shape[-1])
        out, _ = self._einsum_layer(
            ctx, (None, int(qs[1]), heads, dv), layer._output_dense, f"{n}/output"
        )
        return out

    def _layer_norm(self, x: str, rank: int, layer: Any, name: str) -> str:
        if getattr(layer, "rms_scaling", False):
            raise UnsupportedOpError(f"Layer {name!r} uses rms_scaling, not supported.")
        axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
        axes = sorted(a - rank if a >= 0 else a for a in axes)
        if axes != list(range(-len(axes), 0)):
            raise UnsupportedOpError(
                f"Layer {name!r} normalises over axes {axes}; only trailing axes are supported."
            )
        w = {}
        if layer.scale:
            w["gamma"] = _to_numpy(layer.gamma)
        if layer.center:
            w["beta"] = _to_numpy(layer.beta)
        attrs = {"axes": axes, "epsilon": float(layer.epsilon)}
        return self.builder.add("layer_norm", [x], name, attrs, w)

    def _dense_layer(self, x: str, layer: Any, name: str) -> str:
        w = {"kernel": _to_numpy(layer.kernel)}
        if layer.use_bias:
            w["bias"] = _to_numpy(layer.bias)
        act = _activation_of(getattr(layer, "activation", None), name)
        return self.builder.add("dense", [x], name, {"activation": act} if act else {}, w)

    @LAYERS.register("TransformerEncoder")
    def lower_TransformerEncoder(self, node: Node, layer: Any) -> str:
        # keras-hub's encoder block, from its sublayers (dropouts are identities here).
        rec = self.records.get(node.name)
        if rec is None:
            raise UnsupportedOpError(f"Layer {node.name!r}: no call record.")
        args, kwargs = list(rec.arguments.args), dict(rec.arguments.kwargs)
        inputs = args[0] if args else kwargs.get("inputs")
        padding = args[1] if len(args) > 1 else kwargs.get("padding_mask")
        if kwargs.get("attention_mask") is not None or kwargs.get("return_attention_scores"):
            raise UnsupportedOpError(
                f"Layer {node.name!r} (TransformerEncoder) is called with an attention_mask "
                "or return_attention_scores; the enclave lowers a padding_mask only."
            )

        def index(t: Any) -> int:
            for i, tid in enumerate(rec.input_ids):
                if tid == id(t):
                    return i
            raise UnsupportedOpError(f"Layer {node.name!r}: an argument is not a graph tensor.")

        n, i = node.name, index(inputs)
        x, xs = self._in(node, i), self._shape(node, i)
        key_mask = None
        if padding is not None:
            # The mask must come from the token ids inside the enclave (a NotEqual of the
            # ids, 0/1): a mask from the public side is a second tensor crossing the cut,
            # which a one-input program cannot take.
            j = index(padding)
            m = self._in(node, j)
            if m not in self.id_masks and node.inputs[j] in self.model_inputs:
                m = self._model_mask(node.inputs[j])
            if m not in self.id_masks:
                raise UnsupportedOpError(
                    f"Layer {node.name!r} (TransformerEncoder) takes a padding_mask the "
                    "enclave cannot compute: it lowers a padding mask that is a model input "
                    "or one computed from the token ids (keras.ops.not_equal(ids, pad_id)), "
                    "not a mask the public side computes with other layers."
                )
            seq = int(self._shape(node, j)[1])
            off = self.builder.add(
                "sub", [m, self.builder.constant(f"{n}/one", np.float32(1.0))], f"{n}/mask_off"
            )
            big = self.builder.constant(f"{n}/big", np.float32(1e9))
            add = self.builder.add("mul", [off, big], f"{n}/mask_add")
            key_mask = self.builder.add("reshape", [add], f"{n}/mask_keys", {"shape": [1, 1, seq]})
        rank, first = len(xs), bool(layer.normalize_first)
        attn_ln, ff_ln = layer._self_attention_layer_norm, layer._feedforward_layer_norm
        h = self._layer_norm(x, rank, attn_ln, f"{n}/attention_ln") if first else x
        a = self._attention(
            layer._self_attention_layer,
            (h, xs),
            (h, xs),
            (h, xs),
            f"{n}/attention",
            key_mask=key_mask,
        )
        x = self.builder.add("add", [a, x], f"{n}/attention_residual")
        if not first:
            x = self._layer_norm(x, rank, attn_ln, f"{n}/attention_ln")
        h = self._layer_norm(x, rank, ff_ln, f"{n}/ffn_ln") if first else x
        h = self._dense_layer(h, layer._feedforward_intermediate_dense, f"{n}/ffn_in")
        h = self._dense_layer(h, layer._feedforward_output_dense, f"{n}/ffn_out")
        x = self.builder.add("add", [h, x], f"{n}/ffn_residual")
        if not first:
            x = self._layer_norm(x, rank, ff_ln, f"{n}/ffn_ln")
        return x

    def _model_mask(self, tensor: str) -> str:
        """A padding mask that is a model input (int or bool), as exact 0/1 floats:
        min(|m|, 1), so any non-zero value keeps the position as Keras's bool cast
        does. Computed once per mask and shared by every block."""
        key = f"mask01:{tensor}"
        if key not in self.env:
            d = self.builder.add(
                "activation", [tensor], f"{tensor}/abs", {"activation": activation("abs")}
            )
            clip = activation("clip", min=0.0, max=1.0)
            m = self.builder.add("activation", [d], f"{tensor}/01", {"activation": clip})
            self.id_masks.add(m)
            self.env[key] = m
        return self.env[key]

    @LAYERS.register("NotEqual", "Equal")
    def lower_NotEqual(self, node: Node, layer: Any) -> str:
        # keras.ops.not_equal(ids, pad) on integer token ids: min(|ids - pad|, 1) is
        # exactly 1 where they differ and 0 where equal (ids are integers; gather checks).
        rec = self.records.get(node.name)
        args = list(rec.arguments.args) if rec is not None and not rec.arguments.kwargs else []
        consts = [a for a in args if not hasattr(a, "_keras_history")]
        dtype = self.tensors[node.inputs[0]].dtype if len(node.inputs) == 1 else ""
        if len(args) != 2 or len(consts) != 1 or np.asarray(consts[0]).size != 1:
            dtype = ""
        if "int" not in dtype:
            raise UnsupportedOpError(
                f"Layer {node.name!r} ({node.op_type}): the enclave compares integer token "
                "ids with one constant only (a padding mask)."
            )
        pad = float(np.asarray(consts[0]).reshape(()))
        x = self._in(node)
        if pad != 0.0:
            x = self.builder.add(
                "sub", [x, self.builder.constant(f"{node.name}/pad", np.float32(pad))], node.name
            )
        d = self.builder.add("activation", [x], node.name, {"activation": activation("abs")})
        clip = activation("clip", min=0.0, max=1.0)
        m = self.builder.add("activation", [d], node.name, {"activation": clip})
        if node.op_type == "Equal":
            one = self.builder.constant(f"{node.name}/one", np.float32(1.0))
            m = self.builder.add("sub", [one, m], node.name)
        self.id_masks.add(m)
        return m

    @LAYERS.register("PositionEmbedding")
    def lower_PositionEmbedding(self, node: Node, layer: Any) -> str:
        # keras-hub: rows start_index … start_index + seq of the position table, the
        # same for every sample (a constant the following add broadcasts).
        rec = self.records.get(node.name)
        args = list(rec.arguments.args) if rec is not None else []
        kwargs = dict(rec.arguments.kwargs) if rec is not None else {}
        start = args[1] if len(args) > 1 else kwargs.get("start_index", 0)
        if not isinstance(start, (int, np.integer)):
            raise UnsupportedOpError(
                f"Layer {node.name!r} (PositionEmbedding) has a computed start_index; the "
                "enclave takes a constant one only."
            )
        shape = self._shape(node)
        seq = int(shape[-2])
        table = _to_numpy(layer.position_embeddings)
        if int(start) < 0 or int(start) + seq > table.shape[0]:
            raise UnsupportedOpError(
                f"Layer {node.name!r} (PositionEmbedding): positions {int(start)}…"
                f"{int(start) + seq - 1} are outside its table of {table.shape[0]}."
            )
        return self.builder.constant(node.name, table[int(start) : int(start) + seq])

    @LAYERS.register("GetItem")
    def lower_GetItem(self, node: Node, layer: Any) -> str:
        # x[:, 0, :] (BERT's [CLS] token) and other constant int/slice indexing on the
        # non-batch axes → slice, then a reshape that drops the integer-indexed axes.
        rec = self.records.get(node.name)
        args = list(rec.arguments.args) if rec is not None else []
        shape = self._shape(node)
        key = args[1] if len(args) > 1 else None
        key = key if isinstance(key, tuple) else (key,)
        bad = UnsupportedOpError(
            f"Layer {node.name!r} (GetItem): the enclave indexes with constant integers and "
            "slices on the non-batch axes only (e.g. x[:, 0, :])."
        )
        if sum(k is Ellipsis for k in key) > 1 or len(args) != 2:
            raise bad
        if Ellipsis in key:
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1 :]
        key = key + (slice(None),) * (len(shape) - len(key))
        if len(key) != len(shape) or key[0] != slice(None):
            raise bad
        starts, sizes, steps, kept = [], [], [], []
        for d, k in zip(shape[1:], key[1:], strict=True):
            if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
                i = int(k) + int(d) if int(k) < 0 else int(k)
                if not 0 <= i < int(d):
                    raise bad
                starts.append(i), sizes.append(1), steps.append(1)
            elif isinstance(k, slice) and all(
                v is None or isinstance(v, (int, np.integer)) for v in (k.start, k.stop, k.step)
            ):
                r = range(int(d))[k]
                if len(r) == 0:
                    raise bad
                starts.append(r.start), sizes.append(len(r)), steps.append(r.step)
                kept.append(len(r))
            else:
                raise bad
        y = self._in(node)
        if sizes != [int(d) for d in shape[1:]] or any(s != 1 for s in steps):
            y = self.builder.add(
                "slice", [y], node.name, {"starts": starts, "sizes": sizes, "steps": steps}
            )
        if len(kept) != len(sizes):
            y = self.builder.add("reshape", [y], node.name, {"shape": kept})
        return y

    @LAYERS.register("TokenAndPositionEmbedding")
    def lower_TokenAndPositionEmbedding(self, node: Node, layer: Any) -> str:
        # keras-hub: token embedding + the first `seq` rows of the position table.
        if getattr(layer.token_embedding, "mask_zero", False):
            raise UnsupportedOpError(
                f"Layer {node.name!r} uses mask_zero; its mask cannot cross the enclave."
            )
        seq = int(self._shape(node)[1])
        tok = self.builder.add(
            "gather",
            [self._in(node)],
            f"{node.name}/token",
            weights={"table": _to_numpy(layer.token_embedding.embeddings)},
        )
        pos = _to_numpy(layer.position_embedding.position_embeddings)[:seq]
        return self.builder.add(
            "add", [tok, self.builder.constant(f"{node.name}/position", pos)], node.name
        )

    # -- merging ---------------------------------------------------------------------
    def _operands(self, node: Node) -> list[str]:
        """The operands of a merge layer, or of a keras.ops call on one tensor and
        constants (`x + 3.0`, `3.0 - x`, in the order written)."""
        if len(node.inputs) != 1:
            return [self._in(node, i) for i in range(len(node.inputs))]
        rec = self.records.get(node.name)
        args = list(rec.arguments.args) if rec is not None and not rec.arguments.kwargs else []
        tensors = [a for a in args if hasattr(a, "shape") and hasattr(a, "_keras_history")]
        consts = [a for a in args if not any(a is t for t in tensors)]
        ok = len(args) >= 2 and len(tensors) == 1
        ok = ok and all(np.asarray(c).dtype.kind in "fiub" for c in consts)
        if not ok:
            raise UnsupportedOpError(
                f"Layer {node.name!r} ({node.op_type}) combines one tensor with something "
                "other than numeric constants; cut after it."
            )
        return [
            self._in(node)
            if any(a is t for t in tensors)
            else self.builder.constant(f"{node.name}/const", np.asarray(a, np.float32))
            for a in args
        ]

    def _merge(self, node: Node, op: str) -> str:
        ins = self._operands(node)
        if op in ("sub", "div") and len(ins) != 2:
            raise UnsupportedOpError(f"Layer {node.name!r} ({node.op_type}) needs two operands.")
        return self.builder.add(op, ins, node.name)

    @LAYERS.register("TrueDivide", "Divide")
    def lower_TrueDivide(self, node: Node, layer: Any) -> str:
        # keras.ops.divide / x / c in a functional model
        return self._merge(node, "div")

    @LAYERS.register("Add")
    def lower_Add(self, node: Node, layer: Any) -> str:
        return self._merge(node, "add")

    @LAYERS.register("Subtract")
    def lower_Subtract(self, node: Node, layer: Any) -> str:
        return self._merge(node, "sub")

    @LAYERS.register("Multiply")
    def lower_Multiply(self, node: Node, layer: Any) -> str:
        return self._merge(node, "mul")

    @LAYERS.register("Maximum")
    def lower_Maximum(self, node: Node, layer: Any) -> str:
        return self._merge(node, "max")

    @LAYERS.register("Minimum")
    def lower_Minimum(self, node: Node, layer: Any) -> str:
        return self._merge(node, "min")

    @LAYERS.register("Average")
    def lower_Average(self, node: Node, layer: Any) -> str:
        total = self._merge(node, "add")
        k = self.builder.constant(f"{node.name}/n", np.array(len(node.inputs), np.float32))
        return self.builder.add("div", [total, k], f"{node.name}/mean")

    @LAYERS.register("Concatenate")
    def lower_Concatenate(self, node: Node, layer: Any) -> str:
        rank = len(self._shape(node))
        axis = layer.axis if layer.axis < 0 else layer.axis - rank
        ins = [self._in(node, i) for i in range(len(node.inputs))]
        return self.builder.add("concat", ins, node.name, {"axis": axis})

    # -- activation layers -----------------------------------------------------------
    def _unary(self, node: Node, act: dict[str, Any]) -> str:
        return self.builder.add("activation", [self._in(node)], node.name, {"activation": act})

    @LAYERS.register("Activation")
    def lower_Activation(self, node: Node, layer: Any) -> str:
        act = self._act(layer, node) or activation("linear")
        return self._unary(node, act)

    @LAYERS.register("ReLU")
    def lower_ReLU(self, node: Node, layer: Any) -> str:
        max_value = layer.max_value
        slope = float(layer.negative_slope)
        if float(layer.threshold) != 0.0:
            raise UnsupportedOpError(f"Layer {node.name!r}: ReLU threshold is not supported.")
        if slope == 0.0 and max_value is None:
            return self._unary(node, activation("relu"))
        if slope == 0.0 and float(max_value) == 6.0:
            return self._unary(node, activation("relu6"))
        if max_value is None:
            return self._unary(node, activation("leaky_relu", alpha=slope))
        if slope == 0.0:
            return self._unary(node, activation("clip", min=0.0, max=float(max_value)))
        raise UnsupportedOpError(
            f"Layer {node.name!r}: ReLU with both negative_slope and max_value is not supported."
        )

    @LAYERS.register("LeakyReLU")
    def lower_LeakyReLU(self, node: Node, layer: Any) -> str:
        return self._unary(node, activation("leaky_relu", alpha=float(layer.negative_slope)))

    @LAYERS.register("ELU")
    def lower_ELU(self, node: Node, layer: Any) -> str:
        return self._unary(node, activation("elu", alpha=float(layer.alpha)))

    @LAYERS.register("Erf", "Erfc")
    def lower_Erf(self, node: Node, layer: Any) -> str:
        # keras.ops.erf / keras.ops.erfc in a functional model
        return self._unary(node, activation(node.op_type.lower()))

    @LAYERS.register("Cast")
    def lower_Cast(self, node: Node, layer: Any) -> str:
        # keras.ops.cast: every tensor travels as float32, so a cast to float32 (or of
        # integers to another integer type) changes no value.
        keras = require("keras")
        to = keras.backend.standardize_dtype(layer.dtype)
        src = self.tensors[node.inputs[0]].dtype if node.inputs else ""
        x = self._in(node)
        if to == "float32" or (to in ("int32", "int64") and "int" in src):
            return x
        if to not in ("bool", "int32", "int64"):
            raise UnsupportedOpError(
                f"Layer {node.name!r} casts to {to}; the enclave casts to float32, bool, "
                "int32 and int64 only."
            )
        return self.builder.add("cast", [x], node.name, {"to": to})

    @LAYERS.register("Where")
    def lower_Where(self, node: Node, layer: Any) -> str:
        # keras.ops.where(cond, x, y): tensors or numeric constants.
        rec = self.records.get(node.name)
        args = list(rec.arguments.args) if rec is not None and not rec.arguments.kwargs else []
        if len(args) != 3:
            raise UnsupportedOpError(
                f"Layer {node.name!r} (Where) needs cond, x and y as positional arguments."
            )
        ins, k = [], 0
        for a in args:
            if hasattr(a, "_keras_history"):
                ins.append(self._in(node, k))
                k += 1
            elif np.asarray(a).dtype.kind in "fiub":
                ins.append(self.builder.constant(f"{node.name}/const", np.asarray(a, np.float32)))
            else:
                raise UnsupportedOpError(
                    f"Layer {node.name!r} (Where) takes tensors and numeric constants only."
                )
        return self.builder.add("where", ins, node.name)

    @LAYERS.register("Softmax")
    def lower_Softmax(self, node: Node, layer: Any) -> str:
        axis = layer.axis if isinstance(layer.axis, int) else layer.axis[-1]
        return self._unary(node, activation("softmax", axis=int(axis)))


# Every layer type the private side can hold: the registered ones and the identities.
SUPPORTED_LAYERS = sorted(LAYERS.types() | IDENTITY_LAYERS)
