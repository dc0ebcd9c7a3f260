"""Attack: a modified host gets more answers than the key's query budget by restarting
the worker (each start used to fetch a licence with a fresh full budget: issue #14),
and by dropping, forging and replaying the workers' usage reports so that the key
server credits back samples that were used. Claim: the budget is the key's total on
the key server; whatever the host does, the workers answer at most that many samples
(docs/key-release.md "Metered budgets")."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from _common import step

import ennclave
from ennclave.errors import EnnclaveError, QueryBudgetExhausted
from ennclave.keystore import Keystore
from ennclave.seal import canonical_manifest
from support.enclave_bundle import IN, Bundle, write_bundle
from support.keyserver_util import KeyServerProc, post

BUDGET = 10
RESTARTS = 5


class Attack:
    def __init__(self, tmp: Path) -> None:
        os.environ["ENNCLAVE_CONFIG_DIR"] = str(tmp / "cfg")
        os.environ["ENNCLAVE_CACHE_DIR"] = str(tmp / "cache")
        self.server = KeyServerProc(str(tmp / "keys.db"), tmp / "cfg", extra=["--rate", "0"])
        self.server.start()
        self.b = self._register(tmp)
        self.answered = 0
        self.reports: list[tuple[bytes, bytes]] = []  # the usage reports the host saw

    def _register(self, tmp: Path) -> Bundle:
        from ennclave.keyserver.client import KeyServerClient

        b = write_bundle(tmp / "bundle", tmp / "ks.json")
        key = Keystore(b.keystore).get(b.key_id)
        m = json.loads((b.path / "manifest.json").read_text())
        digest = hashlib.sha256(canonical_manifest(m)).hexdigest()
        with KeyServerClient(self.server.url, self.server.token) as c:
            c.register(b.key_id, key, digest, {"allow_software": True, "query_budget": BUDGET})
        b.keystore.unlink()  # the attacking host has no key
        return b

    def load(self, keep_report: bool = True) -> Any:
        """A model whose host intercepts the worker's usage report: kept for later
        (and, with `keep_report`, also sent on as usual)."""
        m = ennclave.load(self.b.path, keyserver=self.server.url)
        relay = m._relay
        inner = getattr(relay, "report_usage", None)

        def intercept(report: bytes, mac: bytes) -> None:
            self.reports.append((report, mac))
            if keep_report and inner is not None:
                inner(report, mac)

        relay.report_usage = intercept
        relay.spend = lambda *a, **k: None  # no host-side check: only the worker counts
        return m

    def drain(self, m: Any, at_most: int | None = None) -> int:
        """Ask for one sample at a time until refused (or `at_most`)."""
        n = 0
        x = np.ones((1, IN), np.float32)
        while at_most is None or n < at_most:
            try:
                m.predict(x)
            except QueryBudgetExhausted:
                break
            n += 1
        self.answered += n
        return n

    def send(self, report: bytes, mac: bytes) -> str:
        b64 = lambda v: base64.b64encode(v).decode()
        body = {"key_id": self.b.key_id, "report": b64(report), "mac": b64(mac)}
        try:
            status, got = post(self.server.url, "/v1/usage", body)
        except ValueError:  # not JSON: a server without the route
            return "no such route"
        return "credited" if status == 200 else f"{status} {got.get('error', got)}"


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        a = Attack(Path(d))
        try:
            run(a)
        finally:
            a.server.stop()
    print("restart_budget: the attack failed, as it should")


def start(a: Attack, keep_report: bool = True) -> Any:
    try:
        return a.load(keep_report)
    except EnnclaveError as e:  # refused: the budget is spent
        step(f"  release refused: {e}")
        return None


def run(a: Attack) -> None:
    step(f"key registered with a query budget of {BUDGET} samples")

    step("a worker that answers nothing, stopped in order: its report says 0 used")
    m = start(a)
    if m is not None:
        m.close()
    zero = list(a.reports)
    for report, mac in zero * 3:
        step(f"  replaying that report (credit the slice again): {a.send(report, mac)}")

    step("a worker answers 4, its report is dropped (it would say 4 used)")
    m = start(a, keep_report=False)
    if m is not None:
        step(f"  answered {a.drain(m, at_most=4)}")
        m.close()
    dropped = a.reports[len(zero) :]
    for report, mac in dropped:
        forged = report.replace(b'"used":4', b'"used":0')
        step(f"  forged report claiming 0 used, same MAC: {a.send(forged, mac)}")
        step(f"  forged report with a MAC of zeros: {a.send(forged, bytes(32))}")
        over = report.replace(b'"used":4', b'"used":99')
        step(f"  report for more than the slice (MAC kept): {a.send(over, mac)}")
        negative = report.replace(b'"used":4', b'"used":-1000')
        step(f"  report with a negative count (MAC kept): {a.send(negative, mac)}")
        step(f"  the genuine report, late: {a.send(report, mac)}")
        step(f"  and replayed: {a.send(report, mac)}")

    step("asking the worker for its report early, then for more answers")
    m = start(a)
    if m is not None:
        early_report_then_infer(a, m)

    step(f"restarting the worker {RESTARTS} times, each asked until refused")
    for i in range(RESTARTS):
        m = start(a)
        if m is None:
            continue
        n = a.drain(m)
        m.close()
        step(f"  start {i + 1}: answered {n}")
        for report, mac in a.reports[-1:]:
            step(f"  replaying its report: {a.send(report, mac)}")

    step(f"answered {a.answered} samples in all, budget {BUDGET}")
    if a.answered > BUDGET:
        raise SystemExit(f"ATTACK SUCCEEDED: {a.answered} answers from a query budget of {BUDGET}")
    if not a.reports:
        raise SystemExit("ATTACK INCONCLUSIVE: no worker sent a usage report")


def early_report_then_infer(a: Attack, m: Any) -> None:
    """SHUTDOWN to get the usage report, then INFER frames on the same worker: a worker
    that answered after reporting would make the refund unsafe."""
    from ennclave.runtime import worker as w

    usage = getattr(w, "USAGE", 0x2D)
    wc = m.worker
    with wc._lock:
        wc._send(w._frame(w.SHUTDOWN))
        ty, p = wc._recv()
        got = "a usage report" if ty == usage else f"message 0x{ty:02x}"
        step(f"  SHUTDOWN answered with {got}")
        if ty == usage:
            r = w._Reader(p)
            report, mac = r.bytes_(), r.take(32)
            step(f"  that report relayed at once: {a.send(report, mac)}")
        answered = False
        try:
            wc._shm_in[:1] = 1.0
            wc._send(struct.pack("<IBII", 9, w.INFER, 1, 0))
            while True:
                ty, p = wc._recv()
                if ty == w.RESULT:
                    answered = True
                    break
                if ty == w.ERROR:
                    break
        except Exception as e:  # the worker is gone: what should happen
            step(f"  INFER after the report: no answer ({type(e).__name__})")
    if answered:
        a.answered += 1
        step("  INFER after the report was answered")
    wc._teardown(kill=True)
    m.close()


if __name__ == "__main__":
    main()
