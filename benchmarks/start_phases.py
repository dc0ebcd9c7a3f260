"""Where a worker's start goes: start a bundle's worker repeatedly with the start-up
trace on (`ENNCLAVE_TRACE=1`, phase times on the worker's stderr, no secrets) and print
the median time of each phase and of the whole start as the host sees it.

    python benchmarks/start_phases.py BUNDLE_DIR KEYSTORE [--reps 5] [--worker BIN ...]

With several `--worker` binaries the starts alternate between them (one start each in
turn), so that all see the same machine state. The bundle is any split bundle (for
example `bench_head.py --save-bundles DIR`, then `DIR/head DIR/keystore.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from ennclave.keystore import Keystore
from ennclave.runtime.worker import WorkerClient, local_key_release

_LINE = re.compile(r"trace:\s+([\d.]+) ms  (.*)")


@dataclass
class Phases:
    """Per-phase durations (ms) of several starts of one worker binary."""

    totals: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)

    def add(self, total_ms: float, trace: str) -> None:
        self.totals.append(total_ms)
        prev = 0.0
        for m in _LINE.finditer(trace):
            at = float(m.group(1))
            self.phases.setdefault(m.group(2), []).append(at - prev)
            prev = at


def start_once(bundle: Path, keystore: Path, binary: str | None) -> tuple[float, str]:
    """One start → READY (ms, host view) and the worker's trace."""
    manifest = (bundle / "manifest.json").read_bytes()
    key_id = json.loads(manifest)["private"]["key_id"]
    release = local_key_release(Keystore(keystore), key_id)
    t = time.perf_counter()
    w = WorkerClient(manifest, bundle / "private.sealed", release, binary=binary, threads=2)
    total = 1e3 * (time.perf_counter() - t)
    w._stderr.seek(0)  # the whole trace (the error tail keeps only its end)
    trace = w._stderr.read().decode("utf-8", "replace")
    w.close()
    return total, trace


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("keystore", type=Path)
    ap.add_argument("--reps", type=int, default=5, help="starts per worker binary")
    ap.add_argument("--worker", action="append", help="worker binary (repeat to compare)")
    args = ap.parse_args()
    os.environ["ENNCLAVE_TRACE"] = "1"
    binaries: list[str | None] = list(args.worker) if args.worker else [None]
    results = {b: Phases() for b in binaries}
    for _ in range(args.reps):
        for b in binaries:
            results[b].add(*start_once(args.bundle, args.keystore, b))
    for b, r in results.items():
        print(f"{b or 'default worker'}: start → READY median {statistics.median(r.totals):.1f} ms")
        print(f"  all starts: {', '.join(f'{t:.0f}' for t in r.totals)} ms")
        for name, v in r.phases.items():
            print(f"  {statistics.median(v):8.1f} ms  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
