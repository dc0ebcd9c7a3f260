"""Split inference time at every valid cut point (the paper's time-vs-layers-in-enclave).

For the image model of `accuracy_images.py` (conv backbone) and the text model of
`accuracy_text.py` (GloVe + pooling + dense head), at every valid cut point, in one
run on the same machine, batch 1 and batch 64:

* `public_ms`: the bundle's public part in Keras;
* `enclave_ms`: the private part in the enclave worker (`worker.infer`, including the
  host↔worker transfer);
* `transfer_ms`: round trip of the cut tensor through the worker on an identity program
  (framing and shared-memory copies only);
* `split_ms`: end to end, `ennclave.load(bundle).predict(x, batch_size=B)`;
* `unsplit_ms`: the original model in Keras (`model.predict_on_batch(x)`, the compiled
  predict function the runtime also uses for the public part), measured
  again next to every row;
* `worker_start_ms`: spawn → ready (handshake, key unwrap, unseal, parse), median of 3.

Times are medians; weights are random (time does not depend on them).

    python experiments/speed.py [--model image,text] [--seconds 1.0] [--smoke]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from common import RESULTS, progress, record, timeit_interleaved, write_json

BATCHES = (1, 64)
TEXT_VOCAB, TEXT_LEN = 20000, 48


def build_model(kind: str) -> Any:
    if kind == "image":
        from accuracy_images import build

        return build(0)
    from accuracy_text import build as build_text

    return build_text(0, TEXT_VOCAB, TEXT_LEN)


def inputs(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "image":
        return rng.random((n, 28, 28, 1), dtype=np.float32)
    return rng.integers(2, TEXT_VOCAB, size=(n, TEXT_LEN)).astype(np.int32)


def identity_bundle(shape: list[Any], work: Path, ks: Path) -> Path:
    """A bundle whose private part is the identity on the cut tensor's shape."""
    import keras

    from ennclave.split import split_model

    name = "identity-" + "x".join(str(d) for d in shape[1:])
    out = work / name
    if not out.exists():
        inp = keras.Input(tuple(shape[1:]))
        keras.Model(inp, keras.layers.Activation("linear")(inp)).save(work / f"{name}.keras")
        split_model(work / f"{name}.keras", 0, out, keystore=ks)
    return out


def worker_start_ms(bundle: Path, ks: Path, reps: int) -> float:
    from ennclave.keystore import Keystore
    from ennclave.runtime.worker import WorkerClient, local_key_release

    raw = (bundle / "manifest.json").read_bytes()
    man = json.loads(raw)
    per = lambda s: int(np.prod(s[1:]))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        w = WorkerClient(
            raw,
            bundle / "private.sealed",
            local_key_release(Keystore(ks), man["private"]["key_id"]),
            in_len=per(man["private"]["inputs"][0]["shape"]),
            out_len=per(man["private"]["outputs"][0]["shape"]),
        )
        w.start()
        times.append(time.perf_counter() - t)
        w.close()
    return 1e3 * statistics.median(times)


def measure(kind: str, seconds: float, work: Path, smoke: bool = False) -> list[dict[str, Any]]:
    import keras

    import ennclave
    from ennclave.adapters import load_model
    from ennclave.errors import EnnclaveError
    from ennclave.plan import make_plan
    from ennclave.split import split_model

    model = build_model(kind)
    path = work / f"{kind}.keras"
    model.save(path)
    adapter = load_model(path)
    plan = make_plan(adapter)
    n_nodes = len(adapter.graph.nodes)
    ks = work / "keystore.json"
    rng = np.random.default_rng(0)
    xs = {b: inputs(kind, b, rng) for b in BATCHES}
    unsplit_fn = {b: (lambda b=b: np.asarray(model.predict_on_batch(xs[b]))) for b in BATCHES}
    rows: list[dict[str, Any]] = []
    cut_points = plan.cut_points
    if smoke:  # the input, the first layer and the last cut are enough to exercise the code
        cut_points = [cut_points[0], cut_points[1], cut_points[-1]]
    for rep in progress(cut_points, f"{kind}: split and time each cut"):
        pos = next(c.position for c in _cuts(adapter) if c.index == rep.index)
        base = {
            "model": kind,
            "cut_index": rep.index,
            "cut_name": rep.name,
            "cut_shape": "x".join(str(d) for d in rep.tensor_shape[1:]),
            "layers_in_enclave": n_nodes - pos,
            "enclave_params": rep.enclave_params,
        }
        bundle = work / f"{kind}-cut{rep.index}"
        try:
            split_model(adapter, rep.index, bundle, samples=xs[64], keystore=ks)
        except EnnclaveError as e:
            rows.append({**base, "error": str(e).split(";")[0]})
            print(f"{kind} cut {rep.index} {rep.name}: not splittable ({type(e).__name__})")
            continue
        start = worker_start_ms(bundle, ks, 1 if smoke else 3)
        pub_path = bundle / "public.keras"
        public = keras.saving.load_model(pub_path, compile=False) if pub_path.exists() else None
        ident = identity_bundle(rep.tensor_shape, work, ks)
        with ennclave.load(bundle, keystore=ks) as m, ennclave.load(ident, keystore=ks) as idm:
            for b in BATCHES:
                x = xs[b]
                run_pub = lambda x=x, f=public: np.asarray(f.predict_on_batch(x), dtype=np.float32)
                h = run_pub() if public is not None else x.astype(np.float32)
                ref = np.asarray(model(x, training=False))
                got = np.asarray(m.predict(x, batch_size=b))
                assert np.abs(got - ref).max() < 1e-3, "split output differs"
                fns = {
                    "public_ms": run_pub,
                    "enclave_ms": lambda h=h: m.worker.infer(h),
                    "transfer_ms": lambda h=h: idm.worker.infer(h),
                    "split_ms": lambda x=x, b=b: m.predict(x, batch_size=b),
                    # Re-measured next to each row, interleaved: the machine's load drifts.
                    "unsplit_ms": unsplit_fn[b],
                }
                if public is None:
                    del fns["public_ms"]
                t = timeit_interleaved(fns, seconds, warmup=10)
                row = {
                    **base,
                    "batch": b,
                    **{k: 1e3 * t.get(k, 0.0) for k in ("public_ms", *fns)},
                    "worker_start_ms": start,
                }
                row["split_over_unsplit"] = row["split_ms"] / row["unsplit_ms"]
                rows.append(row)
                print(
                    f"{kind} cut {rep.index:2d} {rep.name:10s} b{b:<3d} public "
                    f"{row['public_ms']:7.3f} enclave {row['enclave_ms']:7.3f} transfer "
                    f"{row['transfer_ms']:6.3f} split {row['split_ms']:7.3f} unsplit "
                    f"{row['unsplit_ms']:7.3f} ms",
                    flush=True,
                )
    return rows


def _cuts(adapter: Any) -> list[Any]:
    from ennclave.graph import find_cut_points

    return find_cut_points(adapter.graph)


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(
        len(kinds), len(BATCHES), figsize=(11, 3.6 * len(kinds)), squeeze=False
    )
    for i, kind in enumerate(kinds):
        for j, b in enumerate(BATCHES):
            ax = axes[i][j]
            rs = sorted(
                (r for r in rows if r["model"] == kind and r.get("batch") == b),
                key=lambda r: r["layers_in_enclave"],
            )
            if not rs:
                continue
            xs = [r["layers_in_enclave"] for r in rs]
            per = lambda key, rs=rs, b=b: [r[key] / b for r in rs]
            ax.plot(xs, per("split_ms"), "o-", label="split, end to end")
            ax.plot(xs, per("enclave_ms"), "s--", label="enclave (incl. transfer)")
            ax.plot(xs, per("public_ms"), "^--", label="public (Keras)")
            ax.plot(xs, per("transfer_ms"), "x:", label="transfer")
            ax.plot(xs, per("unsplit_ms"), "k-", lw=1, label="unsplit Keras (same run)")
            ax.set_title(f"{kind} model, batch {b}")
            ax.set_xlabel("layers in the enclave")
            ax.set_ylabel("ms per sample")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="image,text", help="comma list of image, text")
    ap.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    ap.add_argument("--smoke", action="store_true", help="tiny config for tests")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.seconds = 0.01
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="ennclave-speed-"))
    rows: list[dict[str, Any]] = []
    for kind in args.model.split(","):
        rows += measure(kind.strip(), args.seconds, work, args.smoke)
    args.out.mkdir(parents=True, exist_ok=True)
    cols = [
        "model",
        "cut_index",
        "cut_name",
        "cut_shape",
        "layers_in_enclave",
        "enclave_params",
        "batch",
        "public_ms",
        "enclave_ms",
        "transfer_ms",
        "split_ms",
        "unsplit_ms",
        "split_over_unsplit",
        "worker_start_ms",
        "error",
    ]
    rec = record(
        {"rows": rows},
        experiment="speed",
        smoke=args.smoke,
        setup={
            "seconds_per_measure": args.seconds,
            "batches": list(BATCHES),
            "statistic": "median",
            "text_vocab": TEXT_VOCAB,
            "text_seq_len": TEXT_LEN,
        },
        seconds=round(time.perf_counter() - t0, 1),
    )
    write_json(args.out / "speed.json", rec)
    with open(args.out / "speed.csv", "w", newline="") as f:
        f.write(f"# command: {rec['command']}\n# machine: {rec['machine']}\n")
        f.write("# versions: " + json.dumps(rec["versions"]) + "\n")
        w = csv.DictWriter(f, cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    plot(rows, args.out / "speed.png")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
