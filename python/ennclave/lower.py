"""Framework-independent clean-up of a lowered program.

Adapters translate layer by layer; this pass then folds inference-time batch
normalisation (`scale_shift` on the channel axis) into the dense or conv before it,
so the enclave does one op instead of two and holds fewer weights.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from .program import Program, ProgramNode


def _consumers(program: Program) -> Counter[str]:
    uses: Counter[str] = Counter(t for n in program.nodes for t in n.inputs)
    uses.update(t.name for t in program.outputs)
    return uses


def fold_scale_shift(program: Program) -> Program:
    """Fold `scale_shift(axis=-1)` into a preceding activation-free dense/conv."""
    uses = _consumers(program)
    producer: dict[str, ProgramNode] = {}  # tensor -> the (copied) node kept for it
    weights = dict(program.weights)
    kept: list[ProgramNode] = []
    renamed: dict[str, str] = {}
    for node in program.nodes:
        node = ProgramNode(
            node.name,
            node.op,
            [renamed.get(t, t) for t in node.inputs],
            node.outputs,
            node.attrs,
            node.weights,
        )
        prev = producer.get(node.inputs[0]) if node.inputs else None
        foldable = (
            node.op == "scale_shift"
            and node.attrs.get("axis", -1) == -1
            and prev is not None
            and prev.op in ("dense", "conv")
            and not prev.attrs.get("activation")
            and uses[prev.outputs[0]] == 1
        )
        if not foldable:
            kept.append(node)
            producer[node.outputs[0]] = node
            continue
        assert prev is not None
        scale = weights[node.weights["scale"]]
        shift = weights[node.weights["shift"]]
        kernel = weights[prev.weights["kernel"]]
        bias = weights[prev.weights["bias"]] if "bias" in prev.weights else np.zeros_like(shift)
        # y = (x·K + b)·s + t = x·(K·s) + (b·s + t); K's last axis is the output channel.
        weights[prev.weights["kernel"]] = (kernel.astype(np.float64) * scale).astype(np.float32)
        bias_key = prev.weights.get("bias", f"{prev.name}.bias")
        weights[bias_key] = (bias.astype(np.float64) * scale + shift).astype(np.float32)
        prev.weights = {**prev.weights, "bias": bias_key}
        del weights[node.weights["scale"]], weights[node.weights["shift"]]
        # The folded node now produces what the scale_shift produced.
        renamed[node.outputs[0]] = prev.outputs[0]
    outputs = [type(t)(renamed.get(t.name, t.name), t.shape, t.dtype) for t in program.outputs]
    return Program(program.inputs, outputs, kept, weights)


def optimize(program: Program) -> Program:
    return fold_scale_shift(program)
