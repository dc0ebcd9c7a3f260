"""Metered budgets (issue #14): a key's `query_budget` is its total over every release,
worker and restart. A real key server on loopback (SQLite and PostgreSQL), the real
worker: each release hands out a slice, each worker reports its usage at shutdown, a
slice that never reports back stays spent, and a report counts once."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")
pytest.importorskip("httpx")

import ennclave
from ennclave.errors import QueryBudgetExhausted
from ennclave.keyserver import cache
from ennclave.keyserver.client import KeyReleaseRefused, KeyServerClient
from ennclave.keyserver.licence import UsageReport, usage_mac
from ennclave.keystore import Keystore
from ennclave.seal import canonical_manifest
from support.enclave_bundle import IN, needs_worker, reference, write_bundle
from support.keyserver_util import post

pytestmark = needs_worker


@pytest.fixture
def server(keyserver):
    """A key server process on SQLite or PostgreSQL (conftest `keyserver`)."""
    return keyserver


def _register(server, tmp_path, **policy):
    b = write_bundle(tmp_path / "b", tmp_path / "ks.json")
    key = Keystore(b.keystore).get(b.key_id)
    digest = hashlib.sha256(
        canonical_manifest(json.loads((b.path / "manifest.json").read_text()))
    ).hexdigest()
    with KeyServerClient(server.url, server.token) as c:
        c.register(b.key_id, key, digest, {"allow_software": True, **policy})
    b.keystore.unlink()  # the host holds no key
    b.data_key = key  # for the test's own minted reports only
    return b


def _left(server, key_id: str) -> int:
    with KeyServerClient(server.url, server.token) as c:
        return c.get(key_id)["budget_left"]


def _serve(m, x: np.ndarray, weights, stop_at: int | None = None) -> int:
    """Answer samples of `x` one at a time until the budget refuses (or `stop_at`);
    every answer is checked against the numpy reference. Returns how many."""
    n = 0
    while stop_at is None or n < stop_at:
        xi = x[n % len(x)][None]
        try:
            y = m.predict(xi)
        except QueryBudgetExhausted:
            break
        np.testing.assert_allclose(y, reference(weights, xi), rtol=1e-5, atol=1e-5)
        n += 1
    return n


def test_budget_of_100_across_restarts_a_crash_and_two_concurrent_workers(server, tmp_path):
    b = _register(server, tmp_path, query_budget=100, budget_slice=10)
    x = np.random.default_rng(0).standard_normal((16, IN)).astype(np.float32)
    served = 0
    # 5 worker starts, each answering 8 of its slice of 10 and reporting at close:
    # the 2 it did not use go back to the key.
    for _ in range(5):
        with ennclave.load(b.path, keyserver=server.url) as m:
            assert m.licence.query_budget == 10
            served += _serve(m, x, b.weights, stop_at=8)
    assert served == 40 and _left(server, b.key_id) == 60
    # A batch larger than a slice: the model replaces its worker in order mid-batch.
    with ennclave.load(b.path, keyserver=server.url) as m:
        y = m.predict(x[:14])
        np.testing.assert_allclose(y, reference(b.weights, x[:14]), rtol=1e-5, atol=1e-5)
        assert m.worker.restarts == 1
        served += 14
    assert _left(server, b.key_id) == 46  # 10 spent, then 4 of the next 10 (6 back)
    # A crash: SIGKILL after the worker used its whole slice (nothing to refund anyway).
    m = ennclave.load(b.path, keyserver=server.url)
    served += _serve(m, x, b.weights, stop_at=10)
    os.kill(m.worker_pid, signal.SIGKILL)
    m.worker._proc.wait(timeout=10)
    m.close()
    assert served == 64 and _left(server, b.key_id) == 36
    # Two concurrent workers take slices until nothing is left.
    counts: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with ennclave.load(b.path, keyserver=server.url) as mm:
                counts.append(_serve(mm, x, b.weights))
        except KeyReleaseRefused as e:  # the other worker took the last slice first
            assert e.code == "budget_spent", e
            counts.append(0)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    served += sum(counts)
    assert served == 100, (served, counts)
    assert _left(server, b.key_id) == 0
    with pytest.raises(KeyReleaseRefused, match="query budget of 100 samples is spent") as e:
        ennclave.load(b.path, keyserver=server.url)
    assert e.value.code == "budget_spent"
    with KeyServerClient(server.url, server.token) as c:
        reasons = [r["reason"] for r in c.audit(b.key_id, limit=1000)]
    assert "budget_spent" in reasons and reasons.count("credited") >= 6


def test_crash_keeps_the_slice_reports_count_once_and_wait_when_unreachable(server, tmp_path):
    b = _register(server, tmp_path, query_budget=30, budget_slice=10)
    x = np.random.default_rng(1).standard_normal((4, IN)).astype(np.float32)
    # A crashed worker's unreported remainder is not refunded: 3 answered, 10 spent.
    m = ennclave.load(b.path, keyserver=server.url)
    assert _serve(m, x, b.weights, stop_at=3) == 3
    os.kill(m.worker_pid, signal.SIGKILL)
    m.worker._proc.wait(timeout=10)
    m.close()
    assert _left(server, b.key_id) == 20

    # An orderly close reports 4 used: 6 come back. Keep the report to replay it.
    sent: list[tuple[bytes, bytes]] = []
    with ennclave.load(b.path, keyserver=server.url) as m:
        lic = m.licence
        inner = m._relay.report_usage
        m._relay.report_usage = lambda r, mac: (sent.append((r, mac)), inner(r, mac))
        _serve(m, x, b.weights, stop_at=4)
    report, mac = sent[0]
    assert json.loads(report) == {
        "final": True,
        "key_id": b.key_id,
        "licence_id": lic.licence_id,
        "used": 4,
        "v": 1,
    }
    assert mac == usage_mac(b.data_key, b.key_id, report)  # the worker's MAC, as documented
    assert _left(server, b.key_id) == 16

    def usage(raw: bytes, tag: bytes) -> tuple[int, str]:
        b64 = lambda v: base64.b64encode(v).decode()
        status, body = post(
            server.url, "/v1/usage", {"key_id": b.key_id, "report": b64(raw), "mac": b64(tag)}
        )
        return status, body.get("error", "ok")

    assert usage(report, mac) == (409, "replayed")  # a report counts once
    forged = report.replace(b'"used":4', b'"used":0')
    assert usage(forged, mac) == (403, "usage_invalid")  # the MAC binds `used`
    # Even with the data key (the owner's power): never more than the slice, nor for a
    # licence that was never issued.
    over = UsageReport(b.key_id, lic.licence_id, 11).to_bytes()
    unknown = UsageReport(b.key_id, "00" * 8, 0).to_bytes()
    for raw, want in ((over, (422, "exceeds_slice")), (unknown, (404, "unknown_licence"))):
        assert usage(raw, usage_mac(b.data_key, b.key_id, raw)) == want
    assert _left(server, b.key_id) == 16

    # The server is down at close: the report waits in the cache dir and goes with the
    # next release.
    m = ennclave.load(b.path, keyserver=server.url)
    _serve(m, x, b.weights, stop_at=1)
    server.stop()
    m.close()
    pending = cache.usage_path(b.key_id)
    assert pending is not None and pending.is_file()
    assert cache.load_usage(b.key_id)[0][0].endswith(b'"used":1,"v":1}')
    assert (pending.stat().st_mode & 0o777) == 0o600
    server.start()
    with ennclave.load(b.path, keyserver=server.url):
        assert not pending.exists()
        assert _left(server, b.key_id) == 16 - 1 - 10  # 1 used by the last worker; a new slice


def test_over_slice_report_is_refused_before_anything_is_credited(server, tmp_path):
    """A report for more than its slice credits nothing (checked on a fresh slice)."""
    b = _register(server, tmp_path, query_budget=5)
    with ennclave.load(b.path, keyserver=server.url) as m:
        lic = m.licence
        m._relay.report_usage = lambda r, mac: None  # the host drops the report
    assert lic.query_budget == 5 and _left(server, b.key_id) == 0  # dropped: stays spent
    raw = UsageReport(b.key_id, lic.licence_id, 6).to_bytes()
    b64 = lambda v: base64.b64encode(v).decode()
    status, body = post(
        server.url,
        "/v1/usage",
        {"key_id": b.key_id, "report": b64(raw), "mac": b64(usage_mac(b.data_key, b.key_id, raw))},
    )
    assert (status, body["error"]) == (422, "exceeds_slice")
    assert _left(server, b.key_id) == 0
