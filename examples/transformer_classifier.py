"""A keras-hub text classifier split after encoder block 4 of 6.

Builds a small classifier (token ids → keras-hub TokenAndPositionEmbedding → 6
TransformerEncoder blocks → mean pooling → dense head) with random weights (nothing is
downloaded; the embeddings and first 4 blocks are frozen, standing for a public
pretrained encoder, the rest is the owner's fine-tuning), saves it, plans it (the table
lists every block boundary as a cut point), splits it after the 4th block so the last 2
blocks, the pooling and the head are sealed for the enclave, then runs the bundle on
token ids and compares with Keras.

    python examples/transformer_classifier.py [--out DIR] [--hidden 64 --seq 32 --heads 4]

Sizes are small by default (a few seconds); `--hidden 384 --heads 12 --seq 128`
gives MiniLM's shape. Needs keras-hub (`pip install keras-hub`) and, to run the bundle,
the enclave worker.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
from rich.console import Console

BLOCKS, CUT_AFTER = 6, 4


@dataclass
class Result:
    """What the example computed: Keras's logits and the split model's, same ids."""

    ids: np.ndarray
    keras_logits: np.ndarray
    enclave_logits: np.ndarray
    cut: str
    bundle: Path


def build_classifier(vocab: int, seq: int, hidden: int, heads: int, classes: int) -> object:
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    ids = keras.Input((seq,), dtype="int32", name="token_ids")
    # The embeddings and first blocks stand for a public pretrained encoder (frozen);
    # the last blocks and the head for the owner's fine-tuning (trainable = private).
    embed = keras_hub.layers.TokenAndPositionEmbedding(vocab, seq, hidden, name="embeddings")
    embed.trainable = False
    x = embed(ids)
    for i in range(BLOCKS):
        block = keras_hub.layers.TransformerEncoder(
            4 * hidden, heads, activation="gelu", name=f"encoder_{i + 1}"
        )
        block.trainable = i >= CUT_AFTER
        x = block(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    logits = keras.layers.Dense(classes, name="classifier")(x)
    return keras.Model(ids, logits, name="text_classifier")


def run(
    out: Path,
    vocab: int = 500,
    seq: int = 32,
    hidden: int = 64,
    heads: int = 4,
    classes: int = 3,
    console: Console | None = None,
) -> Result:
    import keras_hub  # noqa: F401  (registers the layers, so the saved model loads)

    import ennclave
    from ennclave.report import print_plan

    # A wide table when the output is not a terminal (a log, CI).
    console = console or Console(width=None if sys.stdout.isatty() else 160)
    out.mkdir(parents=True, exist_ok=True)
    model = build_classifier(vocab, seq, hidden, heads, classes)
    path = out / "text_classifier.keras"
    model.save(path)
    console.rule(f"Plan of a {BLOCKS}-block keras-hub classifier (hidden {hidden}, seq {seq})")
    plan = ennclave.plan_model(str(path))
    print_plan(plan, console)

    cut = f"encoder_{CUT_AFTER}"
    if plan.recommended is not None:
        console.print(
            f"(the plan recommends the cut after "
            f"{plan.cut_points[plan.recommended].name}: the frozen layers stay public)"
        )
    console.rule(f"Split after {cut}: encoder_5, encoder_6, pool and classifier are private")
    bundle, keystore = out / "bundle", out / "keystore.json"
    ennclave.split_model(path, cut, bundle, keystore=keystore, overwrite=True)
    ids = np.random.default_rng(1).integers(0, vocab, (8, seq)).astype(np.int32)
    keras_logits = np.asarray(model(ids))
    with ennclave.load(bundle, keystore=keystore) as split:
        enclave_logits = np.asarray(split.predict(ids))
    diff = float(np.max(np.abs(enclave_logits - keras_logits)))
    same = int(np.sum(enclave_logits.argmax(1) == keras_logits.argmax(1)))
    console.print(
        f"8 sequences of {seq} token ids: largest |enclave − Keras| logit difference "
        f"{diff:.2e}; predicted class the same for {same}/8"
    )
    console.print(f"bundle: {bundle}")
    return Result(ids, keras_logits, enclave_logits, cut, bundle)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", type=Path, help="folder for the model and bundle (default: a temp dir)"
    )
    ap.add_argument("--seq", type=int, default=32, help="sequence length")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size (intermediate: 4×)")
    ap.add_argument("--heads", type=int, default=4, help="attention heads")
    args = ap.parse_args(argv)
    if args.hidden % args.heads:
        ap.error("--hidden must be a multiple of --heads")
    out = args.out or Path(tempfile.mkdtemp(prefix="ennclave-transformer-"))
    r = run(out, seq=args.seq, hidden=args.hidden, heads=args.heads)
    ok = np.allclose(r.enclave_logits, r.keras_logits, atol=1e-4, rtol=1e-4)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
