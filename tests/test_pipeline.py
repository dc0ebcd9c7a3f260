"""Pipelined `EnclavedModel.predict`: the public part of batch i+1 overlaps the enclave's
work on batch i; results equal the sequential ones, in order; errors propagate."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ennclave
from ennclave.split import split_model


@pytest.fixture(scope="module")
def split_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    import keras

    tmp = tmp_path_factory.mktemp("pipeline")
    keras.utils.set_random_seed(0)
    inp = keras.Input((12,), name="x")
    h = keras.layers.Dense(16, activation="relu", name="public_fc", trainable=False)(inp)
    h = keras.layers.Dense(8, activation="tanh", name="private_fc1")(h)
    out = keras.layers.Dense(3, name="private_fc2")(h)
    model = keras.Model(inp, out)
    model.save(tmp / "m.keras")
    ks = tmp / "keystore.json"
    split_model(tmp / "m.keras", "public_fc", tmp / "bundle", keystore=ks)
    return tmp / "bundle", ks, model


class Recorder:
    """Wraps a callable; records (batch first value, start, end, thread) per call."""

    def __init__(self, fn: Any, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.fn, self.delay, self.fail_on = fn, delay, fail_on
        self.calls: list[tuple[float, float, float, str]] = []
        self.kwargs: list[dict[str, Any]] = []
        self.n = 0

    def __call__(self, x: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        self.kwargs.append(kwargs)
        i, self.n = self.n, self.n + 1
        if self.fail_on == i:
            raise RuntimeError(f"boom in call {i}")
        time.sleep(self.delay)
        out = self.fn(x, *args, **kwargs)
        self.calls.append(
            (
                float(np.asarray(x).ravel()[0]),
                t0,
                time.perf_counter(),
                threading.current_thread().name,
            )
        )
        return out


def test_pipelined_equals_sequential_and_keras(split_bundle: tuple[Path, Path, Any]) -> None:
    bundle, ks, model = split_bundle
    x = np.random.default_rng(1).standard_normal((203, 12)).astype(np.float32)
    with ennclave.load(bundle, keystore=ks) as m:
        seq = m.predict(x, 16, pipeline=False)
        pipe = m.predict(x, 16, pipeline=True)
        auto = m.predict(x, 16)  # CPU public part: sequential by default
        one = m.predict(x[:5], 16, pipeline=True)  # a single batch takes the plain path
        one_seq = m.predict(x[:5], 16, pipeline=False)
    np.testing.assert_array_equal(pipe, seq)
    np.testing.assert_array_equal(auto, seq)
    np.testing.assert_array_equal(one, one_seq)
    # A batch of 5 runs other dense kernels than one of 16 (another summation order).
    np.testing.assert_allclose(one, seq[:5], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pipe, np.asarray(model(x)), atol=1e-5)


def test_public_of_next_batch_overlaps_enclave(
    split_bundle: tuple[Path, Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, ks, _ = split_bundle
    n_batches, bs = 5, 4
    x = np.random.default_rng(2).standard_normal((n_batches * bs, 12)).astype(np.float32)
    with ennclave.load(bundle, keystore=ks) as m:
        want = m.predict(x, bs, pipeline=False)
        pub = Recorder(m._public, delay=0.05)
        enc = Recorder(m._worker.infer, delay=0.05)
        monkeypatch.setattr(m, "_public", pub)
        monkeypatch.setattr(m._worker, "infer", enc)
        got = m.predict(x, bs, pipeline=True)
    np.testing.assert_array_equal(got, want)  # ordered
    assert len(pub.calls) == len(enc.calls) == n_batches
    # The enclave ran in a background thread, the public part in the caller's.
    assert all(c[3] != threading.current_thread().name for c in enc.calls)
    assert all(c[3] == threading.current_thread().name for c in pub.calls)
    # public(i+1) starts before enclave(i) ends.
    for i in range(n_batches - 1):
        assert pub.calls[i + 1][1] < enc.calls[i][2], f"no overlap at batch {i}"
    # One batch at a time in the enclave, in order (no enclave call overlaps another).
    assert all(enc.calls[i][2] <= enc.calls[i + 1][1] for i in range(n_batches - 1))
    # The enclave thread sleeps for its answers: a polling thread would keep taking the
    # GIL from the public part (on a GPU this made pipelining slower than sequential).
    assert all(kw.get("poll") is False for kw in enc.kwargs)


@pytest.mark.parametrize("where", ["enclave", "public"])
def test_errors_propagate_and_model_stays_usable(
    split_bundle: tuple[Path, Path, Any], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    bundle, ks, _ = split_bundle
    x = np.random.default_rng(3).standard_normal((40, 12)).astype(np.float32)
    with ennclave.load(bundle, keystore=ks) as m:
        want = m.predict(x, 8, pipeline=False)
        with monkeypatch.context() as mp:
            if where == "enclave":
                mp.setattr(m._worker, "infer", Recorder(m._worker.infer, fail_on=2))
            else:
                mp.setattr(m, "_public", Recorder(m._public, fail_on=3))
            with pytest.raises(RuntimeError, match="boom"):
                m.predict(x, 8, pipeline=True)
        np.testing.assert_array_equal(m.predict(x, 8, pipeline=True), want)
    assert not [t for t in threading.enumerate() if t.name.startswith("ennclave-enclave")]


@pytest.mark.parametrize("on_gpu", [False, True])
def test_default_pipelines_only_with_a_gpu_public_part(
    split_bundle: tuple[Path, Path, Any], monkeypatch: pytest.MonkeyPatch, on_gpu: bool
) -> None:
    bundle, ks, _ = split_bundle
    x = np.random.default_rng(4).standard_normal((24, 12)).astype(np.float32)
    with ennclave.load(bundle, keystore=ks) as m:
        assert m._public.on_gpu is False  # no GPU on this machine
        want = m.predict(x, 8, pipeline=False)
        monkeypatch.setattr(m._public, "on_gpu", on_gpu)
        enc = Recorder(m._worker.infer)
        monkeypatch.setattr(m._worker, "infer", enc)
        np.testing.assert_array_equal(m.predict(x, 8), want)
    in_background = [c[3] != threading.current_thread().name for c in enc.calls]
    assert in_background == [on_gpu] * 3
