"""Reference executor for enclave programs, in numpy.

This is the ground truth that `split` verifies against and that the Rust worker is
tested against. It favours being obviously correct over being fast: every op follows
the text of docs/enclave-program.md and computes in float64, rounding to float32
after each op (the precision the format promises).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import InputError, ProgramError
from .program import Program, ProgramNode, bf16_round, int8_rows_dequantised

_SELU_ALPHA = 1.6732632423543772
_SELU_SCALE = 1.0507009873554805


# erf in float64, vectorised (math.erf per element made gelu the slowest op of a
# MiniLM-sized program): the Maclaurin series (Horner in x², 30 terms) for |x| ≤ 2 and
# the continued fraction of erfc (depth 40) beyond; tests/test_reference_erf.py checks
# both against math.erf/erfc: erf within 2e-15, erfc within 1e-12 relative.
_ERF_SPLIT = 2.0
_ERF_SERIES = [
    2 / math.sqrt(math.pi) * (-1) ** n / (math.factorial(n) * (2 * n + 1)) for n in range(30)
]
_ERFC_DEPTH = 40


def _erf_small(a: np.ndarray) -> np.ndarray:
    x2 = a * a
    acc = np.full_like(a, _ERF_SERIES[-1])
    for c in reversed(_ERF_SERIES[:-1]):
        acc *= x2
        acc += c
    return acc * a


def _erfc_large(a: np.ndarray) -> np.ndarray:
    """erfc(a) for a > 0: e^(−a²)/√π · 1/(a + (1/2)/(a + 1/(a + (3/2)/(a + …))))."""
    f = a.copy()
    for k in range(_ERFC_DEPTH, 0, -1):
        f = a + (k / 2) / f
    return np.exp(-a * a) / (math.sqrt(math.pi) * f)


def _erfc_abs(x: np.ndarray) -> np.ndarray:
    """erfc(|x|); NaN stays NaN."""
    a = np.abs(x)
    small = ~(a > _ERF_SPLIT)  # NaN goes to the series, which keeps it NaN
    out = np.empty_like(a)
    out[small] = 1.0 - _erf_small(a[small])
    out[~small] = _erfc_large(a[~small])
    return out


def _erf(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    a = np.abs(x)
    small = ~(a > _ERF_SPLIT)
    out = np.empty_like(a)
    out[small] = _erf_small(a[small])
    out[~small] = 1.0 - _erfc_large(a[~small])
    return np.copysign(out, x)


def _erfc(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    pos = _erfc_abs(x)
    return np.where(x < 0, 2.0 - pos, pos)


def apply_activation(x: np.ndarray, act: dict[str, Any] | None) -> np.ndarray:
    if not act:
        return x
    fn = act["fn"]
    if fn == "linear":
        return x
    if fn == "relu":
        return np.maximum(x, 0)
    if fn == "relu6":
        return np.clip(x, 0, 6)
    if fn == "leaky_relu":
        return np.where(x >= 0, x, act.get("alpha", 0.2) * x)
    if fn == "elu":
        return np.where(x > 0, x, act.get("alpha", 1.0) * np.expm1(np.minimum(x, 0)))
    if fn == "selu":
        return _SELU_SCALE * np.where(x > 0, x, _SELU_ALPHA * np.expm1(np.minimum(x, 0)))
    if fn == "gelu":
        if act.get("approximate", False):
            c = math.sqrt(2 / math.pi)
            return 0.5 * x * (1 + np.tanh(c * (x + 0.044715 * x**3)))
        return 0.5 * x * (1 + _erf(x / math.sqrt(2)))
    if fn == "sigmoid":
        return 1 / (1 + np.exp(-x))
    if fn == "hard_sigmoid":
        return np.clip(act.get("alpha", 1 / 6) * x + act.get("beta", 0.5), 0, 1)
    if fn == "hard_swish":
        return x * np.clip(x / 6 + 0.5, 0, 1)
    if fn == "tanh":
        return np.tanh(x)
    if fn == "swish":
        return x / (1 + np.exp(-x))
    if fn == "softmax":
        axis = act.get("axis", -1)
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)
    if fn == "clip":
        return np.clip(x, act["min"], act["max"])
    if fn == "exp":
        return np.exp(x)
    if fn == "log":
        return np.log(x)
    if fn == "sqrt":
        return np.sqrt(x)
    if fn == "abs":
        return np.abs(x)
    if fn == "neg":
        return -x
    if fn == "reciprocal":
        return 1 / x
    if fn == "erf":
        return _erf(x)
    if fn == "erfc":
        return _erfc(x)
    raise ProgramError(f"Unknown activation {fn!r}.")


def _as_2d(x: np.ndarray, kernel_window: list[int], attrs: dict[str, Any]):
    """Treat 1-D spatial ops as 2-D with height 1."""
    if x.ndim == 3:
        x = x[:, None]
        window = [1, *kernel_window]
        strides = [1, *attrs["strides"]]
        dil = [1, *attrs.get("dilations", [1])]
        pads = [[0, 0], *attrs["pads"]]
        return x, window, strides, dil, pads, True
    return x, kernel_window, attrs["strides"], attrs.get("dilations", [1, 1]), attrs["pads"], False


def _patches(xp: np.ndarray, window, strides, dil) -> tuple[np.ndarray, int, int]:
    """[N, Hp, Wp, C] -> [N, Ho, Wo, kh, kw, C] windows."""
    n, hp, wp, c = xp.shape
    kh, kw = window
    ho = (hp - (dil[0] * (kh - 1) + 1)) // strides[0] + 1
    wo = (wp - (dil[1] * (kw - 1) + 1)) // strides[1] + 1
    if ho <= 0 or wo <= 0:
        raise ProgramError("Window larger than its padded input.")
    cols = np.empty((n, ho, wo, kh, kw, c), dtype=xp.dtype)
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dil[0], j * dil[1]
            cols[:, :, :, i, j, :] = xp[
                :,
                r0 : r0 + strides[0] * (ho - 1) + 1 : strides[0],
                c0 : c0 + strides[1] * (wo - 1) + 1 : strides[1],
                :,
            ]
    return cols, ho, wo


def conv(
    x: np.ndarray,
    kernel: np.ndarray,
    bias: np.ndarray | None,
    attrs: dict,
    *,
    int8_rows: bool = False,
) -> np.ndarray:
    """`int8_rows`: quantise each im2col row (one output position's window) as an int8
    kernel does (`int8_rows_dequantised`)."""
    kernel_window = list(kernel.shape[:-2])
    x, window, strides, dil, pads, squeeze = _as_2d(x, kernel_window, attrs)
    k = kernel.reshape(*window, *kernel.shape[-2:])
    groups = attrs.get("groups", 1)
    xp = np.pad(x, [(0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)])
    cols, ho, wo = _patches(xp, window, strides, dil)
    n, cin, cout = x.shape[0], x.shape[-1], k.shape[-1]
    cig, cog = cin // groups, cout // groups
    out = np.empty((n, ho, wo, cout), dtype=np.float64)
    for g in range(groups):
        a = cols[..., g * cig : (g + 1) * cig].reshape(n * ho * wo, -1)
        if int8_rows:
            a = int8_rows_dequantised(a)
        b = k[..., g * cog : (g + 1) * cog].reshape(-1, cog)
        out[..., g * cog : (g + 1) * cog] = (a @ b).reshape(n, ho, wo, cog)
    if bias is not None:
        out = out + bias
    return out[:, 0] if squeeze else out


def conv_transpose(
    x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None, attrs: dict
) -> np.ndarray:
    """Every input position adds kernel·x into the full output at i·stride + k·dilation;
    `pads` then crop the full output, `output_padding` extends it at the end."""
    squeeze = x.ndim == 3
    if squeeze:
        x, kernel = x[:, None], kernel[:, None]
        strides, dil = [1, *attrs["strides"]], [1, *attrs.get("dilations", [1])]
        pads, extra = [[0, 0], *attrs["pads"]], [0, *attrs.get("output_padding", [0])]
    else:
        strides, dil = attrs["strides"], attrs.get("dilations", [1, 1])
        pads, extra = attrs["pads"], attrs.get("output_padding", [0, 0])
    groups = attrs.get("groups", 1)
    n, h, w, cin = x.shape
    _, kh, kw, cog = kernel.shape
    cig = cin // groups
    fh = (h - 1) * strides[0] + dil[0] * (kh - 1) + 1 + extra[0]
    fw = (w - 1) * strides[1] + dil[1] * (kw - 1) + 1 + extra[1]
    full = np.zeros((n, fh, fw, cog * groups), dtype=np.float64)
    for g in range(groups):
        xg = x[..., g * cig : (g + 1) * cig]
        for a in range(kh):
            for e in range(kw):
                r0, c0 = a * dil[0], e * dil[1]
                full[
                    :,
                    r0 : r0 + strides[0] * (h - 1) + 1 : strides[0],
                    c0 : c0 + strides[1] * (w - 1) + 1 : strides[1],
                    g * cog : (g + 1) * cog,
                ] += xg @ kernel[g * cig : (g + 1) * cig, a, e, :]
    out = full[:, pads[0][0] : fh - pads[0][1], pads[1][0] : fw - pads[1][1]]
    if bias is not None:
        out = out + bias
    return out[:, 0] if squeeze else out


_ROUNDING = {
    "round_prefer_floor": lambda x: np.where(x - np.floor(x) == 0.5, np.floor(x), np.round(x)),
    "round_prefer_ceil": lambda x: np.where(x - np.floor(x) == 0.5, np.ceil(x), np.round(x)),
    "floor": np.floor,
    "ceil": np.ceil,
}


def _source_coords(n_in: int, n_out: int, scale: float, mode: str) -> np.ndarray:
    o = np.arange(n_out, dtype=np.float64)
    if mode == "asymmetric":
        return o / scale
    if mode == "half_pixel":
        return (o + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (o + 0.5) / scale - 0.5 if n_out > 1 else np.zeros(1)
    if mode == "align_corners":
        return o * (n_in - 1) / (n_out - 1) if n_out > 1 else np.zeros(1)
    if mode == "tf_half_pixel_for_nn":
        return (o + 0.5) / scale
    raise ProgramError(f"Unknown coordinate_transformation_mode {mode!r}.")


def resize(x: np.ndarray, attrs: dict) -> np.ndarray:
    """Nearest or linear resize of the spatial axes (1..-1), one axis after the other."""
    sizes = attrs["sizes"]
    scales = attrs.get("scales") or [o / i for o, i in zip(sizes, x.shape[1:-1], strict=True)]
    mode = attrs.get("coordinate_transformation_mode", "half_pixel")
    for ax, (n_out, scale) in enumerate(zip(sizes, scales, strict=True), start=1):
        n_in = x.shape[ax]
        src = _source_coords(n_in, n_out, float(scale), mode)
        if attrs["mode"] == "nearest":
            rounding = _ROUNDING[attrs.get("nearest_mode", "round_prefer_floor")]
            idx = np.clip(rounding(src), 0, n_in - 1).astype(np.int64)
            x = np.take(x, idx, axis=ax)
            continue
        src = np.clip(src, 0, n_in - 1)
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        f = (src - i0).reshape([-1 if a == ax else 1 for a in range(x.ndim)])
        x = np.take(x, i0, axis=ax) * (1 - f) + np.take(x, i1, axis=ax) * f
    return x


def slice_(x: np.ndarray, attrs: dict) -> np.ndarray:
    steps = attrs.get("steps") or [1] * (x.ndim - 1)
    for ax, (start, step, size) in enumerate(
        zip(attrs["starts"], steps, attrs["sizes"], strict=True), start=1
    ):
        x = np.take(x, start + step * np.arange(size), axis=ax)
    return x


def pool(x: np.ndarray, attrs: dict) -> np.ndarray:
    x, window, strides, dil, pads, squeeze = _as_2d(x, attrs["window"], attrs)
    padw = [(0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)]
    if attrs["kind"] == "max":
        xp = np.pad(x, padw, constant_values=-np.inf)
        cols, _, _ = _patches(xp, window, strides, dil)
        out = cols.max(axis=(3, 4))
    else:
        xp = np.pad(x, padw)
        cols, _, _ = _patches(xp, window, strides, dil)
        total = cols.sum(axis=(3, 4))
        if attrs.get("count_include_pad", False):
            out = total / (window[0] * window[1])
        else:
            ones = np.pad(np.ones((1, *x.shape[1:3], 1)), padw)
            counts, _, _ = _patches(ones, window, strides, dil)
            out = total / counts.sum(axis=(3, 4))
    return out[:, 0] if squeeze else out


def _binary(op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return {
        "add": np.add,
        "sub": np.subtract,
        "mul": np.multiply,
        "div": np.divide,
        "max": np.maximum,
        "min": np.minimum,
        "pow": np.power,
        "equal": lambda x, y: (x == y).astype(np.float64),
    }[op](a, b)


def cast(x: np.ndarray, to: str) -> np.ndarray:
    """`cast`: values stay float; bool is x ≠ 0 (NaN too), integers truncate toward
    zero, clamped to the type's range, NaN → 0."""
    if to == "float32":
        return x
    if to == "bool":
        return (x != 0).astype(np.float64)
    if to in ("int32", "int64"):
        info = np.iinfo(to)
        # The range as float32 sees it (the worker clamps in float32).
        lo, hi = float(np.float32(info.min)), float(np.float32(info.max))
        return np.nan_to_num(np.clip(np.trunc(x), lo, hi), nan=0.0)
    raise ProgramError(f"Unknown cast target {to!r}.")


def run_node(
    node: ProgramNode,
    args: list[np.ndarray],
    w: dict[str, np.ndarray],
    *,
    int8_rows: bool = False,
) -> np.ndarray:
    """`int8_rows` (dense and conv with an int8 kernel): the rows of the input are
    quantised dynamically first, as the worker's int8 kernels do."""
    a = node.attrs
    weight = {role: w[key].astype(np.float64) for role, key in node.weights.items()}
    op = node.op
    x = args[0] if args else None
    if op == "dense":
        y = (int8_rows_dequantised(x) if int8_rows else x) @ weight["kernel"]
        if "bias" in weight:
            y = y + weight["bias"]
        return apply_activation(y, a.get("activation"))
    if op == "conv":
        return apply_activation(
            conv(x, weight["kernel"], weight.get("bias"), a, int8_rows=int8_rows),
            a.get("activation"),
        )
    if op == "conv_transpose":
        return apply_activation(
            conv_transpose(x, weight["kernel"], weight.get("bias"), a), a.get("activation")
        )
    if op == "resize":
        return resize(x, a)
    if op == "slice":
        return slice_(x, a)
    if op == "pool":
        return pool(x, a)
    if op == "global_pool":
        axes = tuple(range(1, x.ndim - 1))
        f = np.max if a["kind"] == "max" else np.mean
        return f(x, axis=axes, keepdims=a.get("keepdims", False))
    if op == "reduce":
        axes = tuple(ax % x.ndim for ax in a["axes"])
        f = {"mean": np.mean, "sum": np.sum, "max": np.max, "min": np.min}[a["kind"]]
        return f(x, axis=axes, keepdims=a.get("keepdims", False))
    if op == "pad":
        return np.pad(
            x, [(0, 0), *[tuple(p) for p in a["pads"]]], constant_values=a.get("value", 0.0)
        )
    if op == "reshape":
        return x.reshape((x.shape[0], *a["shape"]))
    if op == "transpose":
        return np.transpose(x, a["perm"])
    if op == "scale_shift":
        shape = [1] * x.ndim
        shape[a.get("axis", -1)] = -1
        return x * weight["scale"].reshape(shape) + weight["shift"].reshape(shape)
    if op == "layer_norm":
        axes = tuple(ax % x.ndim for ax in a["axes"])
        mean = x.mean(axis=axes, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
        y = (x - mean) / np.sqrt(var + a["epsilon"])
        if "gamma" in weight:
            y = y * weight["gamma"]
        if "beta" in weight:
            y = y + weight["beta"]
        return y
    if op == "equal":
        return _binary(op, args[0], args[1])
    if op == "where":
        cond, xv, yv = args
        return np.where(cond != 0, xv, yv)
    if op == "cast":
        return cast(x, a["to"])
    if op == "expand":
        return np.broadcast_to(x, (x.shape[0], *a["shape"]))
    if op in ("add", "sub", "mul", "div", "max", "min", "pow"):
        y = args[0]
        for b in args[1:]:
            y = _binary(op, y, b)
        return y
    if op == "concat":
        return np.concatenate(args, axis=a["axis"])
    if op == "constant":
        return weight["value"]
    if op == "activation":
        return apply_activation(x, a["activation"])
    if op == "matmul":
        lhs, rhs = args
        if a.get("transpose_a", False):
            lhs = np.swapaxes(lhs, -1, -2)
        if a.get("transpose_b", False):
            rhs = np.swapaxes(rhs, -1, -2)
        return lhs @ rhs
    if op == "gather":
        table = weight["table"]
        ok = (x >= 0) & (x < table.shape[0]) & (x == np.floor(x))
        if not ok.all():
            bad = x[~ok].flat[0]
            raise ProgramError(
                f"Node {node.name!r}: id {bad} is not an integer in 0..{table.shape[0]} "
                "(the rows of its table)."
            )
        return table[x.astype(np.int64)]
    if op == "softmax":
        if len(args) == 2:
            x = x + args[1]
        return apply_activation(x, {"fn": "softmax", "axis": a.get("axis", -1)})
    raise ProgramError(f"Unknown op {op!r} in node {node.name!r}.")


def program_inputs(program: Program, x: Any) -> list[np.ndarray]:
    """`x` as one array per program input, in declaration order: an array (a
    single-input program), a list or tuple in that order, or a dict by input name.
    Each must have its declared shape (batch first) and the same batch."""
    names = [t.name for t in program.inputs]
    if isinstance(x, dict):
        missing = [n for n in names if n not in x]
        if missing:
            raise InputError(
                f"The private part takes inputs {names}; {missing} missing from the dict."
            )
        xs = [x[n] for n in names]
    elif isinstance(x, (list, tuple)):
        xs = list(x)
    else:
        xs = [x]
    if len(xs) != len(names):
        raise InputError(
            f"The private part takes {len(names)} input(s) {names}, got {len(xs)}; pass "
            "one array per input (a list in this order, or a dict by name)."
        )
    arrays = [np.asarray(a) for a in xs]
    n = arrays[0].shape[0] if arrays[0].ndim else 0
    out = []
    for spec, a in zip(program.inputs, arrays, strict=True):
        want = tuple(int(d) for d in spec.shape[1:])
        if a.ndim == 0 or a.shape[0] != n or a[:1].size != int(np.prod(want)):
            raise InputError(
                f"Private input {spec.name!r} has shape {a.shape}, expected "
                f"({n}, {', '.join(map(str, want))}) (batch first, the same batch for every input)."
            )
        out.append(a.reshape((n, *want)))
    return out


def execute(program: Program, x: Any, *, exact: bool = False) -> np.ndarray:
    """Run `program` on a batch `x` (batch first; several inputs as a list in the
    program's order or a dict by name, see `program_inputs`); returns float32,
    rounded to float32 after every op as the format promises. `exact=True` keeps
    float64 throughout and returns float64: the yardstick verification judges float32
    results against."""
    env: dict[str, np.ndarray] = {}
    for spec, a in zip(program.inputs, program_inputs(program, x), strict=True):
        # Integer inputs travel as float32 values (docs/enclave-program.md).
        env[spec.name] = np.asarray(a, dtype=np.float32).astype(np.float64)
    for node in program.nodes:
        args = [env[t] for t in node.inputs]
        q = program.quant.get(node.weights.get("kernel", ""))
        if q is not None and q.dtype == "bf16":
            # bf16 kernels multiply bf16 inputs (as AVX512_BF16's vdpbf16ps does; every
            # kernel path of the worker rounds x the same way), summing in float32.
            args[0] = bf16_round(args[0].astype(np.float32)).astype(np.float64)
        # int8 kernels quantise each row of their input dynamically (run_node).
        int8 = q is not None and q.dtype == "int8"
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            y = run_node(node, args, program.weights, int8_rows=int8)
        y = np.asarray(y, dtype=np.float64)
        env[node.outputs[0]] = y if exact else y.astype(np.float32).astype(np.float64)
    out = env[program.outputs[0].name]
    return out if exact else out.astype(np.float32)
