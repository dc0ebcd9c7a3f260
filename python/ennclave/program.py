"""The enclave program: the private part as a tiny op graph plus its weights.

The format is specified in docs/enclave-program.md. `ProgramBuilder` is what lowering
uses to write one; `Program` is the in-memory form the reference executor runs and
the container (`to_container` / `from_container`) is what gets sealed. Weights are
float32, except that `Program.quantised` stores dense and conv kernels as bf16 or int8
(`--weights`): the in-memory form then keeps their dequantised float32 values (what
the reference executor multiplies with) and the quantised data in `Program.quant`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load

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

WEIGHT_DTYPES = ("fp32", "bf16", "int8")
# Quantised kernels are packed in panels of 32 columns whose rows come in groups of G
# consecutive input rows, interleaved (docs/enclave-program.md): the shape the
# AVX512_BF16 (G = 2) and VNNI (G = 4) dot-product instructions read.
QUANT_LAYOUT = {"bf16": ("panels32x2", 2), "int8": ("panels32x4", 4)}
LAYOUT_DTYPE = {layout: dtype for dtype, (layout, _) in QUANT_LAYOUT.items()}


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


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (uint16), rounded to nearest, ties to even; NaN
    stays a (quiet) NaN."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    bits = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(a, dtype=np.float32))
    bits[nan] = ((u[nan] >> 16) | np.uint32(0x40)).astype(np.uint16)
    return bits


def bf16_value(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns → their (exact) float32 values."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def bf16_round(a: np.ndarray) -> np.ndarray:
    """`a` rounded to the nearest bfloat16, as float32."""
    return bf16_value(bf16_bits(a))


def quantise_int8(kernel2d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: for each column j, scale[j] = max|w[:, j]| / 127
    and q = round-half-even(w / scale[j]) in −127 … 127 (a zero column: scale 0, q 0)."""
    w = np.asarray(kernel2d, dtype=np.float32)
    scale = (np.abs(w).max(axis=0) / np.float32(127)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.rint(w / safe), -127, 127).astype(np.int8)
    return q, scale


def quantise_rows_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic symmetric int8 quantisation of each row (last axis) of `x`, exactly as
    the worker's int8 kernels do it, in float32: `amax = max|x|`, `inv = 127 / amax`,
    `q = round-half-even(x · inv)` clipped to ±127 and the row's scale `amax / 127`
    (a row of zeros: scale 0; a row with a NaN or an infinity: scale NaN)."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        amax = (
            np.abs(x).max(axis=-1, keepdims=True)
            if x.shape[-1]
            else np.zeros((*x.shape[:-1], 1), np.float32)
        )
        ok = np.isfinite(amax) & (amax > 0)
        inv = np.float32(127) / np.where(ok, amax, np.float32(1))
        q = np.where(ok, np.clip(np.rint(x * inv), -127, 127), 0).astype(np.int8)
        scale = np.where(ok, amax / np.float32(127), np.where(amax == 0, 0, np.nan))
    return q, scale.astype(np.float32)


def int8_rows_dequantised(x: np.ndarray) -> np.ndarray:
    """`x` with each row replaced by its dynamic int8 quantisation (`q · scale`, float64,
    exact): what an int8 kernel multiplies the weights with."""
    q, scale = quantise_rows_int8(x)
    return q.astype(np.float64) * scale.astype(np.float64)


def pack_groups(kernel2d: np.ndarray, group: int) -> np.ndarray:
    """`[in, out]` → `[ceil(out/32), ceil(in/G), 32, G]`: element `[i, 32p + j]` at
    `[p, i // G, j, i % G]`, zero-padded (the quantised layouts `panels32x2/x4`)."""
    k, n = kernel2d.shape
    kg, panels = -(-k // group), -(-n // PANEL)
    padded = np.zeros((kg * group, panels * PANEL), dtype=kernel2d.dtype)
    padded[:k, :n] = kernel2d
    return np.ascontiguousarray(padded.reshape(kg, group, panels, PANEL).transpose(2, 0, 3, 1))


def unpack_groups(packed: np.ndarray, k: int, n: int, group: int) -> np.ndarray:
    """The inverse of `pack_groups`."""
    want = (-(-n // PANEL), -(-k // group), PANEL, group)
    if packed.shape != want:
        raise ProgramError(
            f"A quantised kernel of shape {list(packed.shape)} does not fit a {k}×{n} "
            f"kernel (expected {list(want)})."
        )
    p, kg = want[0], want[1]
    return np.ascontiguousarray(packed.transpose(1, 3, 0, 2).reshape(kg * group, p * PANEL)[:k, :n])


@dataclass
class QuantWeight:
    """A kernel stored quantised: `data` is `[in, out]` (the kernel as a matrix: a conv
    kernel `[k..., Cin, Cout]` flattened to `[k·Cin, Cout]`), uint16 bf16 bit patterns or
    int8 values; `scale` `[out]` for int8. `shape` is the kernel's own shape."""

    dtype: str
    data: np.ndarray
    scale: np.ndarray | None
    shape: tuple[int, ...]

    def dequantised(self) -> np.ndarray:
        if self.dtype == "bf16":
            w = bf16_value(self.data)
        else:
            assert self.scale is not None
            w = self.data.astype(np.float32) * self.scale
        return np.ascontiguousarray(w.reshape(self.shape), dtype=np.float32)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + (self.scale.nbytes if self.scale is not None else 0))


def quantisable(node: ProgramNode) -> bool:
    """The nodes whose kernel `--weights bf16|int8` stores quantised: dense, and conv
    with one group (grouped and depthwise kernels are small and stay float32)."""
    if "kernel" not in node.weights:
        return False
    return node.op == "dense" or (node.op == "conv" and node.attrs.get("groups", 1) == 1)


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
    # Kernels stored quantised (weight key → data); their float32 form in `weights`
    # holds the dequantised values.
    quant: dict[str, QuantWeight] = field(default_factory=dict)

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
        # Our own writer for float32 programs too, for its layout: tensors of whole
        # 64-byte multiples first, so every kernel starts on a cache line in the worker
        # (the safetensors library orders by name, which left the MIT67 head's last
        # kernel at 12 mod 64).
        return _save_mixed(self.weights)

    def quantised(self, dtype: str) -> Program:
        """This program with every dense and single-group conv kernel stored as `dtype`
        (`bf16`: rounded to nearest even; `int8`: `quantise_int8`); biases, norms and
        every other weight stay float32. `fp32` returns the program itself."""
        if dtype == "fp32":
            return self
        if dtype not in QUANT_LAYOUT:
            raise ProgramError(f"Unknown weight type {dtype!r}; use one of {WEIGHT_DTYPES}.")
        weights, quant = dict(self.weights), dict(self.quant)
        for node in self.nodes:
            key = node.weights.get("kernel")
            if not quantisable(node) or key in quant or key is None:
                continue
            kernel = np.asarray(self.weights[key], dtype=np.float32)
            mat = kernel.reshape(-1, kernel.shape[-1])
            if dtype == "bf16":
                q = QuantWeight("bf16", bf16_bits(mat), None, kernel.shape)
            else:
                data, scale = quantise_int8(mat)
                q = QuantWeight("int8", data, scale, kernel.shape)
            quant[key] = q
            weights[key] = q.dequantised()
        return Program(self.inputs, self.outputs, self.nodes, weights, quant)

    @property
    def weights_dtype(self) -> str:
        """`fp32`, or the type of the quantised kernels (one type per program)."""
        kinds = {q.dtype for q in self.quant.values()}
        return kinds.pop() if len(kinds) == 1 else "fp32" if not kinds else "mixed"

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights as shipped (quantised kernels at their stored size)."""
        total = 0
        for key, w in self.weights.items():
            q = self.quant.get(key)
            total += q.nbytes if q is not None else w.size * 4
        return int(total)

    def shipped(self) -> Program:
        """The form that is sealed: every dense kernel packed into 32-column panels
        (`kernel_layout: panels32`), so the worker streams it contiguously without
        re-packing at load. The in-memory form (`self`) keeps `[in, out]` kernels."""
        nodes, weights = [], dict(self.weights)
        for node in self.nodes:
            key = node.weights.get("kernel")
            if key is not None and key in self.quant:
                node = _ship_quantised(node, self.quant[key], weights)
            elif node.op == "dense" and key is not None and "kernel_layout" not in node.attrs:
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
        nodes, weights, quant = [], dict(self.weights), {}
        for node in self.nodes:
            if node.attrs.get("kernel_layout") in LAYOUT_DTYPE:
                node = _unship_quantised(node, weights, quant)
            elif node.op == "dense" and node.attrs.get("kernel_layout") == "panels32":
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
        return Program(self.inputs, self.outputs, nodes, weights, quant)

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
            w = _load_mixed(weights) if _has_quantised(weights) else st_load(weights)
        except ProgramError:
            raise
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


def _ship_quantised(node: ProgramNode, q: QuantWeight, weights: dict) -> ProgramNode:
    """The shipped form of a node with a quantised kernel: the kernel packed as
    `panels32x2` (bf16) or `panels32x4` (int8, with its `kernel_scale`)."""
    layout, group = QUANT_LAYOUT[q.dtype]
    key = node.weights["kernel"]
    weights[key] = pack_groups(q.data, group)
    refs = dict(node.weights)
    attrs = {**node.attrs, "kernel_layout": layout, "kernel_shape": [int(d) for d in q.shape]}
    if q.scale is not None:
        skey = f"{key}.scale"
        while skey in weights:
            skey += "_"
        weights[skey] = q.scale
        refs["kernel_scale"] = skey
    return ProgramNode(node.name, node.op, node.inputs, node.outputs, attrs, refs)


def _unship_quantised(node: ProgramNode, weights: dict, quant: dict) -> ProgramNode:
    """The inverse of `_ship_quantised`: `quant` gets the kernel's data, `weights` its
    dequantised float32 form."""
    layout = node.attrs["kernel_layout"]
    dtype = LAYOUT_DTYPE[layout]
    group = QUANT_LAYOUT[dtype][1]
    attrs = dict(node.attrs)
    del attrs["kernel_layout"]
    key = node.weights.get("kernel")
    ks = attrs.pop("kernel_shape", None)
    ok = isinstance(ks, list) and len(ks) >= 2 and all(isinstance(d, int) and d > 0 for d in ks)
    shape = tuple(ks) if ok else None
    want = np.uint16 if dtype == "bf16" else np.int8
    if node.op not in ("dense", "conv") or shape is None or key not in weights:
        raise ProgramError(
            f"Node {node.name!r} has a {layout} kernel without its shape attribute or "
            "kernel; the program is malformed."
        )
    if weights[key].dtype != want:
        raise ProgramError(
            f"Node {node.name!r}: a {layout} kernel must be stored as {dtype}, not "
            f"{weights[key].dtype}; the program is malformed."
        )
    refs = dict(node.weights)
    k = int(np.prod(shape[:-1]))
    data = unpack_groups(weights[key], k, shape[-1], group)
    scale = None
    if dtype == "int8":
        skey = refs.pop("kernel_scale", None)
        if skey is None or skey not in weights or weights[skey].shape != (shape[-1],):
            raise ProgramError(
                f"Node {node.name!r}: an int8 kernel needs a float32 kernel_scale of "
                f"shape [{shape[-1]}]; the program is malformed."
            )
        scale = np.asarray(weights.pop(skey), dtype=np.float32)
    q = QuantWeight(dtype, data, scale, tuple(int(d) for d in shape))
    quant[key] = q
    weights[key] = q.dequantised()
    return ProgramNode(node.name, node.op, node.inputs, node.outputs, attrs, refs)


_ST_DTYPES = {"F32": np.dtype("<f4"), "BF16": np.dtype("<u2"), "I8": np.dtype("i1")}
_ST_NAMES = {np.dtype("<f4"): "F32", np.dtype("<u2"): "BF16", np.dtype("i1"): "I8"}


def _has_quantised(data: bytes) -> bool:
    if len(data) < 8:
        return False
    (n,) = struct.unpack("<Q", data[:8])
    head = data[8 : 8 + min(n, len(data))]
    return b'"BF16"' in head or b'"I8"' in head


def _save_mixed(weights: dict[str, np.ndarray]) -> bytes:
    """safetensors bytes of float32, bf16 (held as uint16 bit patterns) and int8
    tensors. (The safetensors package's numpy API has no bfloat16.) Tensors whose size
    is a multiple of 64 bytes come first (every quantised kernel: whole 128-byte panel
    rows), so they start 64-byte aligned where the data does (`to_container`): the
    worker's AMX tile loads of misaligned panels took several times as long. Then the
    rest, widest first, as the safetensors library lays them out, so each stays aligned
    to its element size."""
    arrays = {k: np.ascontiguousarray(v) for k, v in weights.items()}
    for k, v in arrays.items():
        if v.dtype not in _ST_NAMES:
            arrays[k] = np.ascontiguousarray(v, dtype=np.float32)
    order = sorted(arrays, key=lambda k: (arrays[k].nbytes % 64 != 0, -arrays[k].dtype.itemsize, k))
    header: dict[str, Any] = {"__metadata__": {"format": FORMAT}}
    at = 0
    for k in order:
        v = arrays[k]
        header[k] = {
            "dtype": _ST_NAMES[v.dtype],
            "shape": list(v.shape),
            "data_offsets": [at, at + v.nbytes],
        }
        at += v.nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(arrays[k].tobytes() for k in order)


def _load_mixed(data: bytes) -> dict[str, np.ndarray]:
    """The inverse of `_save_mixed` (bf16 as uint16 bit patterns), with the checks of a
    safetensors reader: known dtypes, sizes that match the shapes, data in bounds."""
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise ProgramError("weights.safetensors is unreadable (header runs past the end).")
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise ProgramError(f"weights.safetensors is unreadable ({e}).") from None
    body = memoryview(data)[8 + n :]
    out: dict[str, np.ndarray] = {}
    for k, t in header.items():
        if k == "__metadata__":
            continue
        dt = _ST_DTYPES.get(t.get("dtype"))
        shape = tuple(t.get("shape", ()))
        b, e = t.get("data_offsets", (0, -1))
        if dt is None or not 0 <= b <= e <= len(body) or e - b != int(np.prod(shape)) * dt.itemsize:
            raise ProgramError(f"weights.safetensors is unreadable (tensor {k!r} is malformed).")
        out[k] = np.frombuffer(body[b:e], dtype=dt).reshape(shape).copy()
    return out


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
