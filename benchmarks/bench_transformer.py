"""Enclave worker vs ONNX Runtime on the last blocks of a MiniLM-shaped encoder.

The model: token ids → keras-hub TokenAndPositionEmbedding → 6 keras-hub
TransformerEncoder blocks (hidden 384, 12 heads, intermediate 1536, exact gelu, post
layer norm as in BERT/MiniLM) → mean pooling → a 2-class head; sequence length 128,
random weights (nothing downloaded). Split so the private part is the last 2 blocks
(cut after block 4 of 6), then the last 6 (cut after the embeddings), pooling and head
included. In one run, on the same machine and the same private part:

* batch-1 latency and batch-32 throughput of the worker (including the host↔worker
  transfer of the [N, 128, 384] hidden states through shared memory) and of ONNX
  Runtime running an ONNX graph of the same blocks built from the same weights (as
  exporters write a BERT layer: MatMul/Add, Reshape/Transpose, MatMul of computed
  tensors, Softmax, LayerNormalization, gelu through Erf; ONNX Runtime fuses what it
  can), timed in alternating blocks so both see the same machine state;
* with the same number of threads on both sides (`--threads 1,2` for both counts).

Outputs of worker and ONNX Runtime are checked against Keras first.

    python benchmarks/bench_transformer.py [--threads 1] [--json benchmarks/results/transformer.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
from _common import ort_run, record, timeit_pair
from rich.console import Console
from rich.table import Table

import ennclave

SEQ, HIDDEN, HEADS, FF, BLOCKS, VOCAB, CLASSES = 128, 384, 12, 1536, 6, 1000, 2
BIG_BATCH = 32


def build_encoder(
    seq: int = SEQ,
    hidden: int = HIDDEN,
    heads: int = HEADS,
    ff: int = FF,
    blocks: int = BLOCKS,
    vocab: int = VOCAB,
    classes: int = CLASSES,
) -> Any:
    """The MiniLM-shaped classifier, random weights; blocks are named block0, block1..."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    ids = keras.Input((seq,), dtype="int32", name="ids")
    x = keras_hub.layers.TokenAndPositionEmbedding(vocab, seq, hidden, name="embed")(ids)
    for i in range(blocks):
        x = keras_hub.layers.TransformerEncoder(
            ff, heads, activation="gelu", layer_norm_epsilon=1e-12, name=f"block{i}"
        )(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(ids, keras.layers.Dense(classes, name="head")(x))


def onnx_private(model: Any, private_blocks: int) -> Any:
    """An ONNX graph of the last `private_blocks` encoder blocks, pooling and head of
    `model` ([N, seq, hidden] hidden states in, logits out), from the layers' weights."""
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []
    inits: list[Any] = []

    def const(name: str, value: Any) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, ins: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, ins, [out], **attrs))
        return out

    def w(v: Any) -> np.ndarray:
        return np.asarray(v, dtype=np.float32)

    def dense(x: str, kernel: Any, bias: Any, name: str) -> str:
        """x · kernel + bias, the kernel as a 2-D matrix (EinsumDense's 3-D ones too)."""
        k = w(kernel)
        k = k.reshape(k.shape[0], -1) if name[-1] in "qkv" else k.reshape(-1, k.shape[-1])
        y = node("MatMul", [x, const(f"{name}_w", k)], f"{name}_mm")
        return node("Add", [y, const(f"{name}_b", w(bias).reshape(-1))], name)

    def layer_norm(x: str, ln: Any, name: str) -> str:
        g, b = const(f"{name}_g", w(ln.gamma)), const(f"{name}_b", w(ln.beta))
        return node("LayerNormalization", [x, g, b], name, axis=-1, epsilon=float(ln.epsilon))

    blocks = [layer for layer in model.layers if layer.name.startswith("block")]
    x = "hidden"
    seq, hidden = (int(d) for d in model.get_layer("embed").output.shape[1:])
    for i, blk in enumerate(blocks[len(blocks) - private_blocks :]):
        assert not blk.normalize_first, "post-norm blocks only (as BERT/MiniLM)"
        att, p = blk._self_attention_layer, f"b{i}"
        heads, dh = (int(d) for d in att._query_dense.kernel.shape[1:])
        split_heads = const(f"{p}_heads", np.array([0, 0, heads, dh], np.int64))
        qkv = {}
        for n, d in (("q", att._query_dense), ("k", att._key_dense), ("v", att._value_dense)):
            y = node("Reshape", [dense(x, d.kernel, d.bias, f"{p}_{n}"), split_heads], f"{p}_{n}r")
            perm = [0, 2, 3, 1] if n == "k" else [0, 2, 1, 3]  # keys: [N, heads, dh, seq]
            qkv[n] = node("Transpose", [y], f"{p}_{n}t", perm=perm)
        s = node("MatMul", [qkv["q"], qkv["k"]], f"{p}_scores")
        s = node("Div", [s, const(f"{p}_sqrt_dh", np.float32(np.sqrt(dh)))], f"{p}_scaled")
        probs = node("Softmax", [s], f"{p}_probs", axis=-1)
        c = node("MatMul", [probs, qkv["v"]], f"{p}_ctx")
        c = node("Transpose", [c], f"{p}_ctxt", perm=[0, 2, 1, 3])
        c = node("Reshape", [c, const(f"{p}_merge", np.array([0, 0, hidden], np.int64))], f"{p}_c")
        a = dense(c, att._output_dense.kernel, att._output_dense.bias, f"{p}_o")
        x = layer_norm(node("Add", [a, x], f"{p}_res1"), blk._self_attention_layer_norm, f"{p}_ln1")
        f1, f2 = blk._feedforward_intermediate_dense, blk._feedforward_output_dense
        h = dense(x, f1.kernel, f1.bias, f"{p}_ff1")
        e = node(
            "Erf", [node("Div", [h, const(f"{p}_r2", np.float32(np.sqrt(2)))], f"{p}_d")], f"{p}_e"
        )
        e = node("Add", [e, const(f"{p}_one", np.float32(1))], f"{p}_e1")
        h = node(
            "Mul",
            [node("Mul", [h, e], f"{p}_he"), const(f"{p}_half", np.float32(0.5))],
            f"{p}_gelu",
        )
        h = dense(h, f2.kernel, f2.bias, f"{p}_ff2")
        x = layer_norm(node("Add", [h, x], f"{p}_res2"), blk._feedforward_layer_norm, f"{p}_ln2")
    x = node("ReduceMean", [x], "pooled", axes=[1], keepdims=0)
    head = model.get_layer("head")
    dense(x, head.kernel, head.bias, "logits")
    classes = int(head.kernel.shape[-1])
    graph = helper.make_graph(
        nodes,
        "encoder_blocks",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["N", seq, hidden])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    # IR version 9 (opset 17): loadable by older ONNX Runtime releases too.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@dataclass
class Row:
    private_blocks: int
    threads: int
    worker_b1_ms: float
    ort_b1_ms: float
    worker_b32_ms: float
    ort_b32_ms: float

    @property
    def b1_latency_ratio(self) -> float:
        return self.worker_b1_ms / self.ort_b1_ms

    @property
    def b32_throughput_ratio(self) -> float:
        return self.ort_b32_ms / self.worker_b32_ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write results here")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (both sides)")
    ap.add_argument("--private", default="2,6", help="comma-separated private block counts")
    ap.add_argument("--seconds", type=float, default=2.0, help="batch-1 time per side")
    ap.add_argument("--rounds", type=int, default=3, help=f"timed batch-{BIG_BATCH} calls per side")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    privates = [int(k) for k in args.private.split(",")]
    if any(not 1 <= k <= BLOCKS for k in privates) or any(t < 1 for t in threads):
        ap.error(f"--private counts must be in 1..{BLOCKS} and --threads counts at least 1")
    from ennclave.adapters.keras import KerasAdapter
    from ennclave.graph import find_cut_points
    from ennclave.split import split_model

    console = Console(width=None if sys.stdout.isatty() else 140)
    tmp = Path(tempfile.mkdtemp(prefix="ennclave-bench-tx-"))
    model = build_encoder()
    adapter = KerasAdapter.from_model(model)
    cuts = {c.tensor.name: c for c in find_cut_points(adapter.graph)}
    ids = np.random.default_rng(0).integers(0, VOCAB, (BIG_BATCH, SEQ)).astype(np.int32)
    expected = np.asarray(model(ids))
    ks = tmp / "keystore.json"
    rows: list[Row] = []
    for k in privates:
        cut = cuts["embed" if k == BLOCKS else f"block{BLOCKS - k - 1}"]
        hidden = np.asarray(adapter.build_public(cut)(ids), dtype=np.float32)
        bundle = tmp / f"last{k}"
        split_model(adapter, cut.index, bundle, keystore=ks, n_random=2)
        ort_model = onnx_private(model, k)
        for t in threads:
            ort_fn = ort_run(ort_model.SerializeToString(), t)
            with ennclave.load(bundle, keystore=ks, threads=t, max_batch=BIG_BATCH) as m:
                worker = m.worker.infer
                for name, fn in (("worker", worker), ("ONNX Runtime", ort_fn)):
                    np.testing.assert_allclose(
                        fn(hidden), expected, atol=1e-3, rtol=1e-3, err_msg=name
                    )
                warm = 2 if t > 1 else 0  # ONNX Runtime's threads spin after a run
                w1, o1 = timeit_pair(worker, ort_fn, hidden[:1], args.seconds, warmup=warm)
                w32, o32 = timeit_pair(
                    worker,
                    ort_fn,
                    hidden,
                    0,
                    block_s=0,
                    warmup=min(warm, 1),
                    min_blocks=args.rounds,
                )
            rows.append(Row(k, t, 1e3 * w1, 1e3 * o1, 1e3 * w32, 1e3 * o32))
            r = rows[-1]
            console.print(
                f"last {k} blocks, {t} thread(s): batch 1 {r.b1_latency_ratio:.2f}× time, "
                f"batch {BIG_BATCH} {r.b32_throughput_ratio:.2f}× throughput"
            )

    table = Table(
        title=f"MiniLM-shaped encoder (seq {SEQ}, hidden {HIDDEN}, {HEADS} heads, "
        f"ff {FF}): private last blocks + pool + head, worker vs ONNX Runtime"
    )
    for col in (
        "private",
        "threads",
        "batch 1 worker",
        "batch 1 ORT",
        "latency ratio (goal ≤ 1.3×)",
        f"batch {BIG_BATCH} worker",
        f"batch {BIG_BATCH} ORT",
        "throughput ratio (goal ≥ 0.8×)",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            f"last {r.private_blocks}",
            str(r.threads),
            f"{r.worker_b1_ms:.2f} ms",
            f"{r.ort_b1_ms:.2f} ms",
            f"{r.b1_latency_ratio:.2f}× time",
            f"{BIG_BATCH * 1e3 / r.worker_b32_ms:.1f} /s",
            f"{BIG_BATCH * 1e3 / r.ort_b32_ms:.1f} /s",
            f"{r.b32_throughput_ratio:.2f}×",
        )
    console.print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        results = [
            {
                **{k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(r).items()},
                "b1_latency_ratio": round(r.b1_latency_ratio, 4),
                "b32_throughput_ratio": round(r.b32_throughput_ratio, 4),
            }
            for r in rows
        ]
        shape = {"seq": SEQ, "hidden": HIDDEN, "heads": HEADS, "ff": FF, "blocks": BLOCKS}
        rec = record("bench_transformer.py", results, model=shape, big_batch=BIG_BATCH)
        args.json.write_text(json.dumps(rec, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
