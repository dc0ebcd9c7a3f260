"""EnclavedModel / WorkerClient against the real worker binary and a hand-built bundle."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import struct
import threading
import time

import numpy as np
import pytest

import ennclave
from ennclave.errors import (
    AuthenticationError,
    BundleError,
    EnnclaveError,
    InputError,
    KeyNotFound,
    QueryBudgetExhausted,
    WorkerCrashed,
    WorkerError,
    WorkerNotFound,
)
from ennclave.keystore import Keystore
from ennclave.runtime import worker as wmod
from ennclave.seal import new_data_key
from support import kernels as kernel_families
from support.enclave_bundle import IN, OUT, needs_worker, reference


def _x(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, IN)).astype(np.float32)


def _rehash(bundle_dir) -> None:
    m = json.loads((bundle_dir / "manifest.json").read_text())
    sealed = (bundle_dir / "private.sealed").read_bytes()
    m["integrity"]["files"]["private.sealed"] = hashlib.sha256(sealed).hexdigest()
    (bundle_dir / "manifest.json").write_text(json.dumps(m))


# Requests go through the shared region's doorbell where the platform allows it, and as
# INFER frames otherwise: both paths are run wherever they can be.
PATHS = [
    pytest.param(
        True, id="doorbell", marks=pytest.mark.skipif(not wmod.DOORBELL_OK, reason="x86-64 only")
    ),
    pytest.param(False, id="frames"),
]


@needs_worker
@pytest.mark.parametrize("doorbell", PATHS)
def test_predict_matches_numpy(enclave_bundle, doorbell):
    with ennclave.load(enclave_bundle.path, keystore=enclave_bundle.keystore) as m:
        m.worker._use_doorbell = doorbell
        assert m.worker_pid and m.input_shape == (None, IN) and m.output_shape == (None, OUT)
        for n, bs in [(1, 32), (7, 3), (1000, 1000), (600, 600)]:  # 1000 > region: streamed
            x = _x(n, seed=n)
            y = m.predict(x, batch_size=bs)
            assert y.shape == (n, OUT) and y.dtype == np.float32
            np.testing.assert_allclose(
                y, reference(enclave_bundle.weights, x), atol=1e-5, rtol=1e-5
            )
        assert m.worker.ready.max_batch < 1000
        # float64 / int inputs are converted
        np.testing.assert_allclose(
            m.predict(_x(3).astype(np.float64)), reference(enclave_bundle.weights, _x(3)), atol=1e-5
        )
        assert m.ping()["queries_used"] >= 1000
        pid = m.worker_pid
    # closed: the worker is gone
    time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read()


@needs_worker
@pytest.mark.parametrize("kernels", [*kernel_families.KERNELS, "no-avx512"])
def test_every_kernel_family_matches_numpy(enclave_bundle, monkeypatch, kernels):
    """ENNCLAVE_KERNEL=avx512|avx2|portable, and the older ENNCLAVE_NO_AVX512=1: the
    worker computes with those kernels inside the same sandbox (and says which in its
    start-up trace)."""
    if kernels == "no-avx512":
        monkeypatch.setenv("ENNCLAVE_NO_AVX512", "1")
        expected = next(k for k in kernel_families.available() if k != "avx512")
    else:
        kernel_families.use(kernels, monkeypatch)
        expected = kernels
    monkeypatch.setenv("ENNCLAVE_TRACE", "1")
    with ennclave.load(enclave_bundle.path, keystore=enclave_bundle.keystore) as m:
        for n in (1, 2, 13, 300):
            x = _x(n, seed=n)
            np.testing.assert_allclose(
                m.predict(x), reference(enclave_bundle.weights, x), atol=1e-5, rtol=1e-5
            )
        m.worker._stderr.seek(0)
        trace = m.worker._stderr.read().decode()
    assert f"fp32 kernels {expected}\n" in trace


@needs_worker
@pytest.mark.parametrize("doorbell", PATHS)
def test_outputs_of_many_chunks_arrive_whole(enclave_bundle, doorbell):
    """On the doorbell the worker writes a full output in 4096-float chunks and the
    host copies each one out as soon as it is announced: outputs of several chunks,
    and of a partial last one, arrive exactly."""
    with ennclave.load(enclave_bundle.path, keystore=enclave_bundle.keystore, max_batch=2048) as m:
        m.worker._use_doorbell = doorbell
        for n in (2000, 820, 1639):  # 10000, 4100 and 8195 floats
            x = _x(n, seed=n)
            y = m.worker.infer(x)
            assert m.worker.ready.max_batch >= n
            np.testing.assert_allclose(y, reference(enclave_bundle.weights, x), atol=1e-5)


@needs_worker
@pytest.mark.parametrize(
    "policy",
    [{"mode": "label"}, {"mode": "top_k", "k": 3}, {"mode": "round", "decimals": 1}],
)
def test_output_policies(make_enclave_bundle, policy):
    b = make_enclave_bundle("p", policy=policy)
    x = _x(20)
    ref = reference(b.weights, x)
    with ennclave.load(b.path, keystore=b.keystore) as m:
        y = m.predict(x)
    if policy["mode"] == "label":
        np.testing.assert_array_equal(y, ref.argmax(axis=1))
        assert y.dtype == np.int64
    elif policy["mode"] == "top_k":
        order = np.argsort(-ref, axis=1, kind="stable")[:, :3]
        np.testing.assert_array_equal(y.indices, order)
        np.testing.assert_allclose(y.values, np.take_along_axis(ref, order, 1), atol=1e-5)
    else:
        np.testing.assert_allclose(y, np.round(ref, 1), atol=0.051)
        assert np.allclose(y * 10, np.round(y * 10), atol=1e-4)


@needs_worker
@pytest.mark.parametrize("doorbell", PATHS)
def test_query_budget_counted_in_worker(make_enclave_bundle, doorbell):
    b = make_enclave_bundle("q", policy={"mode": "full", "max_queries": 10})
    with ennclave.load(b.path, keystore=b.keystore) as m:
        m.worker._use_doorbell = doorbell
        m.predict(_x(6))
        with pytest.raises(QueryBudgetExhausted, match="budget of 10"):
            m.predict(_x(5))
        assert m.ping()["queries_used"] == 6  # still serving
        m.predict(_x(4))
        with pytest.raises(QueryBudgetExhausted):
            m.predict(_x(1))


@needs_worker
def test_input_validation(enclave_bundle):
    with ennclave.load(enclave_bundle.path, keystore=enclave_bundle.keystore) as m:
        cases = [
            (np.zeros((0, IN), np.float32), "empty"),
            (np.zeros(IN, np.float32), "single sample"),
            (np.zeros((2, IN + 1), np.float32), "expects"),
            (np.zeros((2, IN, 1), np.float32), "rank"),
            (np.array([["a"] * IN]), "dtype"),
            (np.zeros((2, IN), np.complex64), "dtype"),
        ]
        for x, msg in cases:
            with pytest.raises(InputError, match=msg):
                m.predict(x)
        bad = _x(3)
        bad[1, 2] = np.nan
        with pytest.raises(InputError, match="NaN"):
            m.predict(bad)
        with pytest.raises(InputError):
            m.predict(_x(2), batch_size=0)
        # allowed on request: the worker accepts it and propagates NaN
        y = m.predict(bad, allow_nonfinite=True)
        assert y.shape == (3, OUT) and np.isfinite(y[0]).all()  # (relu may swallow NaN)
        # the worker itself rejects NaN when not allowed (host validation bypassed) and
        # keeps serving
        with pytest.raises(InputError, match="NaN or infinity"):
            m.worker.infer(bad)
        np.testing.assert_allclose(
            m.predict(_x(2)), reference(enclave_bundle.weights, _x(2)), atol=1e-5
        )


@needs_worker
@pytest.mark.parametrize("doorbell", PATHS)
def test_worker_names_the_first_nonfinite_value_anywhere_in_a_batch(enclave_bundle, doorbell):
    """The worker checks its private copy chunk by chunk (8 KiB): a value in any chunk,
    including the last value of the batch, is found and named by sample and position."""
    with ennclave.load(enclave_bundle.path, keystore=enclave_bundle.keystore, max_batch=1024) as m:
        m.worker._use_doorbell = doorbell
        n = 1000
        assert m.worker.ready.max_batch >= n and n * IN > 3 * 2048  # several chunks
        cases = [(0, 0, -np.inf), (700, 5, np.nan), (n - 1, IN - 1, np.inf)]
        for s, j, v in cases:
            x = _x(n)
            x[s, j] = v
            x[-1, 0] = np.nan if s < n - 1 else x[-1, 0]  # a later one must not win
            with pytest.raises(
                InputError, match=f"sample {s} contains NaN or infinity at position {j}"
            ):
                m.worker.infer(x)
        np.testing.assert_allclose(
            m.worker.infer(_x(n)), reference(enclave_bundle.weights, _x(n)), atol=1e-5
        )


@needs_worker
def test_worker_rejects_bad_requests_and_keeps_serving(enclave_bundle):
    with ennclave.load(enclave_bundle.path, keystore=enclave_bundle.keystore) as m:
        w = m.worker
        rd = w.ready
        with w._lock:
            for batch in (0, rd.max_batch + 1, 2**32 - 1):
                w._send(wmod._frame(wmod.INFER, struct.pack("<II", batch, 0)))
                ty, p = w._recv()
                assert ty == wmod.ERROR
                assert isinstance(w._error(p), InputError)
            w._send(wmod._frame(wmod.MANIFEST, wmod._b(b"{}")))  # wrong phase
            ty, p = w._recv()
            assert ty == wmod.ERROR
            if wmod.DOORBELL_OK:  # the same requests posted on the doorbell
                for batch in (0, rd.max_batch + 1, 2**32 - 1):
                    seq = _post(w, batch, n_in=0)
                    _ring_and_wait(w, seq)
                    assert wmod._DB_ANS.unpack_from(w._mm, wmod.DB_ANS_STATUS)[0] != 0
                    ty, p = w._recv()
                    assert ty == wmod.ERROR and isinstance(w._error(p), InputError)
        assert w.ping()["queries_used"] == 0
        np.testing.assert_allclose(
            m.predict(_x(4)), reference(enclave_bundle.weights, _x(4)), atol=1e-5
        )


@needs_worker
def test_canonical_json_matches_between_python_and_rust(make_enclave_bundle):
    """Non-ASCII, escapes, control characters and big integers canonicalise identically."""
    extra = {
        "created_by": 'é ü 中文 "q" \\ \n\t\u0001\u007f \u2028 😀',
        "zz": [2**63 - 1, -(2**63), True, None],
    }
    b = make_enclave_bundle("u", extra_manifest=extra)
    with ennclave.load(b.path, keystore=b.keystore) as m:
        np.testing.assert_allclose(m.predict(_x(2)), reference(b.weights, _x(2)), atol=1e-5)


def test_canonical_manifest_refuses_what_rust_cannot_read():
    from ennclave.seal import canonical_manifest

    for bad in ({"a": 2**64}, {"a": 0.5}, {"a": {1: 2}}):
        with pytest.raises(ValueError):
            canonical_manifest(bad)


@needs_worker
def test_tampered_manifest_fails_authentication(enclave_bundle):
    mpath = enclave_bundle.path / "manifest.json"
    m = json.loads(mpath.read_text())
    m["output_policy"] = {"mode": "full", "max_queries": 1000000}  # try to lift a limit
    mpath.write_text(json.dumps(m))
    with pytest.raises(AuthenticationError, match="did not authenticate"):
        ennclave.load(enclave_bundle.path, keystore=enclave_bundle.keystore)


@needs_worker
def test_tampered_sealed_file(enclave_bundle):
    spath = enclave_bundle.path / "private.sealed"
    data = bytearray(spath.read_bytes())
    data[100] ^= 0x40
    spath.write_bytes(bytes(data))
    # the integrity digest catches a damaged download first, naming the file …
    with pytest.raises(BundleError, match=r"private\.sealed does not match"):
        ennclave.load(enclave_bundle.path, keystore=enclave_bundle.keystore)
    # … and with a forged digest, the GCM tag inside the enclave does
    _rehash(enclave_bundle.path)
    with pytest.raises(AuthenticationError):
        ennclave.load(enclave_bundle.path, keystore=enclave_bundle.keystore)


@needs_worker
def test_wrong_or_missing_key(enclave_bundle, tmp_path):
    other = tmp_path / "other.json"
    with pytest.raises(KeyNotFound):
        ennclave.load(enclave_bundle.path, keystore=other)
    Keystore(other).put(enclave_bundle.key_id, new_data_key())
    with pytest.raises(AuthenticationError):
        ennclave.load(enclave_bundle.path, keystore=other)


def test_missing_bundle_files(enclave_bundle, tmp_path):
    with pytest.raises(BundleError, match="not a bundle directory"):
        ennclave.load(tmp_path / "nope")
    (enclave_bundle.path / "private.sealed").unlink()
    with pytest.raises(BundleError, match="missing"):
        ennclave.load(enclave_bundle.path, keystore=enclave_bundle.keystore)


def test_missing_binary(enclave_bundle, monkeypatch, tmp_path):
    monkeypatch.setenv("ENNCLAVE_WORKER", str(tmp_path / "no-such-worker"))
    with pytest.raises(WorkerNotFound, match="ENNCLAVE_WORKER"):
        ennclave.load(enclave_bundle.path, keystore=enclave_bundle.keystore)
    monkeypatch.delenv("ENNCLAVE_WORKER")
    monkeypatch.setattr(wmod.sysconfig, "get_path", lambda name: str(tmp_path))
    monkeypatch.setattr(wmod.shutil, "which", lambda name: None)
    monkeypatch.setattr(wmod, "__file__", str(tmp_path / "a" / "b" / "c" / "worker.py"))
    with pytest.raises(WorkerNotFound, match="was not found"):
        ennclave.load(enclave_bundle.path, keystore=enclave_bundle.keystore)


def _stop(pid: int) -> None:
    """SIGSTOP `pid` and wait until every one of its threads has stopped: kill()
    returns before they do, and a worker still running could answer the next call."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while True:
        tasks = os.listdir(f"/proc/{pid}/task")
        states = [
            open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()[0] for t in tasks
        ]
        if all(s in "tT" for s in states):
            return
        assert time.monotonic() < deadline, f"the worker did not stop: thread states {states}"
        time.sleep(0.001)


@needs_worker
@pytest.mark.parametrize("doorbell", PATHS)
def test_crash_then_recovery(enclave_bundle, doorbell):
    x = _x(5)
    ref = reference(enclave_bundle.weights, x)
    with ennclave.load(enclave_bundle.path, keystore=enclave_bundle.keystore) as m:
        m.worker._use_doorbell = doorbell
        # 1. killed while a call is in flight (stopped first so the call surely waits)
        pid = m.worker_pid
        _stop(pid)
        errors: list[BaseException] = []

        def call():
            try:
                m.predict(x)
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
        t.join(10)
        assert len(errors) == 1 and isinstance(errors[0], WorkerCrashed)
        assert "SIGKILL" in str(errors[0]) and "next call" in str(errors[0])
        np.testing.assert_allclose(m.predict(x), ref, atol=1e-5)  # fresh worker
        assert m.worker_pid != pid and m.worker.restarts == 1
        # 2. killed while idle: reported once, then recovered
        os.kill(m.worker_pid, signal.SIGKILL)
        time.sleep(0.2)
        with pytest.raises(WorkerCrashed):
            m.predict(x)
        np.testing.assert_allclose(m.predict(x), ref, atol=1e-5)
        assert m.ping()["queries_used"] == 5


@needs_worker
@pytest.mark.parametrize("doorbell", PATHS)
def test_stopped_worker_fails_the_call_at_its_deadline(enclave_bundle, doorbell):
    """A SIGSTOPped worker used to make predict (and worker_pid) hang forever."""
    x = _x(3)
    with ennclave.load(enclave_bundle.path, keystore=enclave_bundle.keystore, timeout=1.0) as m:
        m.worker._use_doorbell = doorbell
        pid = m.worker_pid
        _stop(pid)
        errors: list[BaseException] = []
        t = threading.Thread(target=lambda: errors.append(_catch(m.predict, x)))
        t0 = time.monotonic()
        t.start()
        time.sleep(0.2)
        seen: list[int | None] = []  # worker_pid answers while the call waits
        reader = threading.Thread(target=lambda: seen.append(m.worker_pid), daemon=True)
        reader.start()
        reader.join(2)
        assert seen == [pid], "worker_pid blocked behind the stuck call"
        t.join(15)
        assert not t.is_alive(), "predict hung on a stopped worker"
        assert 0.9 < time.monotonic() - t0 < 10
        assert isinstance(errors[0], WorkerError) and "did not answer within 1 s" in str(errors[0])
        with contextlib.suppress(FileNotFoundError):  # killed: gone, or a zombie
            assert open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in "ZX"
        # The next call starts a fresh worker and answers.
        np.testing.assert_allclose(m.predict(x), reference(enclave_bundle.weights, x), atol=1e-5)
        assert m.worker_pid != pid


def _catch(fn, *args):
    try:
        fn(*args)
    except BaseException as e:
        return e
    return None


@needs_worker
def test_concurrent_callers(enclave_bundle):
    with ennclave.load(enclave_bundle.path, keystore=enclave_bundle.keystore) as m:
        failures: list[str] = []

        def worker(i: int) -> None:
            for j in range(15):
                x = _x(1 + (i * 7 + j) % 300, seed=i * 100 + j)
                y = m.predict(x, batch_size=64)
                if not np.allclose(y, reference(enclave_bundle.weights, x), atol=1e-5):
                    failures.append(f"thread {i} call {j}")

        ts = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        assert not failures


@needs_worker
def test_keras_layer(enclave_bundle):
    keras = pytest.importorskip("keras")
    from ennclave.runtime.keras_layer import EnclaveLayer

    layer = EnclaveLayer(enclave_bundle.path, keystore=enclave_bundle.keystore)
    try:
        inp = keras.Input((IN,))
        model = keras.Model(inp, layer(keras.layers.Identity()(inp)))
        x = _x(10)
        np.testing.assert_allclose(
            model.predict(x, verbose=0), reference(enclave_bundle.weights, x), atol=1e-5
        )
        assert layer.get_config()["bundle"] == str(enclave_bundle.path)
    finally:
        layer.close()


@needs_worker
def test_worker_refuses_to_run_by_hand():
    import subprocess

    r = subprocess.run([str(wmod.find_worker_binary())], capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "not meant to be run by hand" in r.stderr


@needs_worker
def test_an_unknown_kernel_family_is_refused_in_one_sentence(enclave_bundle, monkeypatch):
    monkeypatch.setenv("ENNCLAVE_KERNEL", "avx1024")
    with pytest.raises(InputError, match="ENNCLAVE_KERNEL must be one of avx512, avx2, portable"):
        ennclave.load(enclave_bundle.path, keystore=enclave_bundle.keystore)


@needs_worker
def test_start_up_trace(enclave_bundle, monkeypatch):
    """ENNCLAVE_TRACE=1: the worker prints its start-up phases (names and times only)."""
    monkeypatch.setenv("ENNCLAVE_TRACE", "1")
    with ennclave.load(enclave_bundle.path, keystore=enclave_bundle.keystore) as m:
        np.testing.assert_allclose(
            m.predict(_x(2)), reference(enclave_bundle.weights, _x(2)), atol=1e-5
        )
        err = m.worker._stderr
        err.seek(0)
        lines = err.read().decode().splitlines()
    assert lines and all(line.startswith("ennclave-enclave trace:") for line in lines)
    assert any("unsealed" in line for line in lines) and "READY sent" in lines[-1]
    key = Keystore(enclave_bundle.keystore).get(enclave_bundle.key_id)
    assert key.hex() not in "\n".join(lines)


def _slow_checking_worker(enclave_bundle, **kw) -> wmod.WorkerClient:
    """A worker whose own periodic check is 60 s away, so a lost wake would hang."""
    from ennclave.keystore import Keystore

    release = wmod.local_key_release(Keystore(enclave_bundle.keystore), enclave_bundle.key_id)
    return wmod.WorkerClient(
        (enclave_bundle.path / "manifest.json").read_bytes(),
        enclave_bundle.path / "private.sealed",
        release,
        in_len=IN,
        out_len=OUT,
        idle_check_ms=60_000,
        **kw,
    )


@needs_worker
def test_idle_worker_sleeps_and_every_message_wakes_it(enclave_bundle):
    """Between requests the worker sleeps on the doorbell's events word (futex), not in
    a busy loop; a request or control frame posted while it sleeps wakes it at once.
    The worker's own periodic check is set to 60 s here, so a lost wake would hang."""
    with _slow_checking_worker(enclave_bundle) as w:
        ref = reference(enclave_bundle.weights, _x(3))
        np.testing.assert_allclose(w.infer(_x(3)), ref, atol=1e-5)
        for step in ("infer", "ping", "infer"):
            time.sleep(0.3)  # well past the worker's 200 µs of polling: it sleeps
            cpu = _cpu_seconds(w.pid)
            time.sleep(1.0)
            assert _cpu_seconds(w.pid) - cpu < 0.1, "the idle worker burns CPU"
            # A lost wake hangs the call; after 20 s the worker is killed, and the
            # call fails instead of hanging the test run.
            watchdog = threading.Timer(20, os.kill, (w.pid, signal.SIGKILL))
            watchdog.start()
            try:
                if step == "infer":
                    np.testing.assert_allclose(w.infer(_x(3)), ref, atol=1e-5)
                else:
                    assert w.ping()["queries_used"] >= 3
            finally:
                watchdog.cancel()
        assert w.restarts == 0


@needs_worker
def test_a_worker_that_sleeps_between_every_request_is_always_woken(enclave_bundle):
    """The host wakes the worker only when the worker says it may sleep (doorbell
    WORKER_SLEEPS, each side fencing between its store and its load). With no polling
    (`spin_us=0`) the worker goes to sleep before every request and, for a large
    input, while it waits for the rest of it: every request races the flag. A lost wake
    would stall a call for the worker's 60 s idle check; the watchdog turns that into a
    failure."""
    with _slow_checking_worker(enclave_bundle, spin_us=0) as w:
        small, large = _x(1), _x(200)
        refs = reference(enclave_bundle.weights, small), reference(enclave_bundle.weights, large)
        switches = _voluntary_switches(w.pid)
        watchdog = threading.Timer(60, os.kill, (w.pid, signal.SIGKILL))
        watchdog.start()
        try:
            slowest = 0.0
            for i in range(1500):
                x, ref = (small, refs[0]) if i % 3 else (large, refs[1])
                t = time.perf_counter()
                y = w.infer(x)
                slowest = max(slowest, time.perf_counter() - t)
                np.testing.assert_allclose(y, ref, atol=1e-5)
        finally:
            watchdog.cancel()
        assert w.restarts == 0
        # It did sleep (else this tested nothing), and no call waited for a timeout.
        assert _voluntary_switches(w.pid) - switches > 500
        assert slowest < 5.0, f"a call took {slowest:.1f} s: a wake was lost"


def _voluntary_switches(pid: int) -> int:
    """Voluntary context switches (sleeps) of all of `pid`'s threads."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        for line in open(f"/proc/{pid}/task/{tid}/status"):
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of all of `pid`'s threads."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _post(w, batch: int, n_in: int, x: np.ndarray | None = None) -> int:
    """Post a raw doorbell request: `batch` in the request, `x` copied in and the first
    `n_in` input floats announced (no ring)."""
    seq = w._seq = (w._seq + 1) & 0xFFFFFFFF
    wmod._DB_REQ.pack_into(w._mm, wmod.DB_REQ_BATCH, batch, 0)
    w._db.req.value = seq
    if x is not None:
        w._shm_in_flat[: x.size] = x.reshape(-1)
    w._db.in_progress.value = seq << 32 | n_in
    return seq


def _ring_and_wait(w, seq: int) -> None:
    w._db.ring()
    deadline = time.monotonic() + 10
    while w._db.ans.value != seq:
        assert time.monotonic() < deadline, "no answer"
        time.sleep(0.001)


@needs_worker
@pytest.mark.skipif(not wmod.DOORBELL_OK, reason="the doorbell is used on x86-64 only")
def test_doorbell_input_may_arrive_after_the_request(enclave_bundle):
    """A doorbell request can be posted before its input: the worker copies what the
    host announces, waits (asleep, after its polling window) for the rest, and fails
    the request cleanly when the host sends a frame before the whole input."""
    with ennclave.load(enclave_bundle.path, keystore=enclave_bundle.keystore) as m:
        w = m.worker
        assert w.ready.max_batch >= 3  # started
        x = _x(3)
        with w._lock:
            seq = _post(w, 3, n_in=IN, x=x)  # only the first sample so far
            time.sleep(0.05)  # the worker waits for the rest, past its polling window
            assert w._db.ans.value != seq
            w._db.in_progress.value = seq << 32 | x.size
            _ring_and_wait(w, seq)
            assert wmod._DB_ANS.unpack_from(w._mm, wmod.DB_ANS_STATUS)[0] == 0
            y = w._shm_out[:3].copy()
            np.testing.assert_allclose(y, reference(enclave_bundle.weights, x), atol=1e-5)
            # Two of three samples announced, then a frame instead of the rest: the
            # request fails cleanly (nothing computed) and the frame is answered.
            seq = _post(w, 3, n_in=2 * IN, x=x)
            w._db.ring()
            time.sleep(0.05)
            assert w._db.ans.value != seq  # still waiting for the input
            w._send(wmod._frame(wmod.PING, struct.pack("<Q", 7)))
            _ring_and_wait(w, seq)
            assert wmod._DB_ANS.unpack_from(w._mm, wmod.DB_ANS_STATUS)[0] != 0
            ty, p = w._recv()
            assert ty == wmod.ERROR and "whole input" in str(w._error(p))
            ty, p = w._recv()
            assert ty == wmod.PONG and struct.unpack("<QQ", p) == (7, 3)
        assert w.ping()["queries_used"] == 3
        np.testing.assert_allclose(m.predict(x), reference(enclave_bundle.weights, x), atol=1e-5)


@needs_worker
def test_tsm_evidence_needs_a_confidential_vm(enclave_bundle):
    """`evidence="tsm"` (configfs-tsm reports inside a TDX/SEV-SNP VM, untested on
    hardware) is refused where configfs-tsm is absent, by the host and by the worker."""
    import subprocess

    if os.path.isdir(wmod.TSM_ROOT):
        pytest.skip("this machine has configfs-tsm: a confidential VM")
    with pytest.raises(EnnclaveError, match="configfs-tsm"):
        ennclave.load(enclave_bundle.path, keystore=enclave_bundle.keystore, evidence="tsm")
    r, w = os.pipe(), os.pipe()
    try:
        run = subprocess.run(
            [
                str(wmod.find_worker_binary()),
                *("--ctl-fd", str(r[0]), "--shm-fd", str(w[0]), "--evidence", "tsm"),
            ],
            pass_fds=(r[0], w[0]),
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        for fd in (*r, *w):
            os.close(fd)
    assert run.returncode == 2 and "configfs-tsm" in run.stderr, run.stderr


# The HELLO of a protocol-2 worker (before EVIDENCE carried protections), byte for byte:
# version 2, public key, binary hash, secret-memory backing; nothing after it.
V2_HELLO = struct.pack("<IB", 1 + 4 + 64 + 4 + 12, wmod.HELLO) + struct.pack("<I", 2)
V2_HELLO += b"\x01" * 32 + b"\x02" * 32 + struct.pack("<I", 12) + b"memfd_secret"


def test_an_older_workers_hello_is_refused_with_its_version(enclave_bundle, tmp_path):
    """A worker of protocol 2 (its HELLO replayed byte for byte by a stand-in that the
    host starts as it starts the worker) gets one clear sentence, not a parse error."""
    old = tmp_path / "old-worker"
    old.write_text(
        "#!/usr/bin/env python3\n"
        "import os, sys, time\n"
        "fd = int(sys.argv[sys.argv.index('--ctl-fd') + 1])\n"
        f"os.write(fd, {V2_HELLO!r})\n"
        "time.sleep(5)\n"
    )
    old.chmod(0o755)
    with pytest.raises(
        WorkerError, match=f"speaks protocol 2, this ennclave speaks {wmod.PROTOCOL_VERSION}"
    ) as e:
        wmod.WorkerClient(
            (enclave_bundle.path / "manifest.json").read_bytes(),
            enclave_bundle.path / "private.sealed",
            wmod.local_key_release(Keystore(enclave_bundle.keystore), enclave_bundle.key_id),
            in_len=IN,
            out_len=OUT,
            binary=old,
        )
    assert e.value.code == wmod.E_PROTOCOL
