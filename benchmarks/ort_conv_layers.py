"""ONNX Runtime's time for each 3×3 convolution of the image model's CNN alone.

The yardstick for the worker's per-layer conv times, which come from
`cargo run --release --example conv_layers -- BATCH THREADS` in `enclave/` (the same
three "same" convolutions, 1→32 on 28×28, 32→64 on 14×14, 64→64 on 7×7, with ReLU):

    python benchmarks/ort_conv_layers.py [--batch 64] [--threads 1] [--seconds 0.6]

Each layer is a one-node Conv + Relu ONNX model in NCHW, so ONNX Runtime's time
includes its reorders to and from its blocked NCHWc layout, which it skips between
the layers of a whole graph. Prints the median and the fastest call in µs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
from _common import ort_run
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

# (name, input channels, height = width, output channels), as in bench_matrix's CNN.
LAYERS = (("conv1", 1, 28, 32), ("conv2", 32, 14, 64), ("conv3", 64, 7, 64))


def conv_model(cin: int, cout: int, rng: np.random.Generator) -> bytes:
    """A serialised Conv(3×3, pads 1) + Relu model with random weights."""
    w = ((rng.random((cout, cin, 3, 3)) - 0.5) * 0.1).astype(np.float32)
    b = np.full(cout, 0.1, np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, cin, None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, cout, None, None])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=0.6, help="timed seconds per layer")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    table = Table(
        title=f"ONNX Runtime Conv + Relu alone, batch {args.batch}, {args.threads} thread(s)"
    )
    for col in ("layer", "median µs", "fastest µs"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for name, cin, hw, cout in LAYERS:
        run = ort_run(conv_model(cin, cout, rng), args.threads)
        x = rng.random((args.batch, cin, hw, hw), dtype=np.float32)
        for _ in range(5):
            run(x)
        times = []
        end = time.perf_counter() + args.seconds
        while time.perf_counter() < end or len(times) < 10:
            t = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t)
        table.add_row(name, f"{np.median(times) * 1e6:.0f}", f"{min(times) * 1e6:.0f}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
