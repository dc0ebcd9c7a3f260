"""`split --weights bf16|int8`: quantised dense and conv kernels in the sealed program.

The worker runs them on every kernel path this CPU has (ENNCLAVE_QKERNEL caps the
path) and must agree with the numpy reference executor on the *same* quantised
program; the shipped bytes, the worker's secret memory and the verification report
follow from the quantised weights.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

import ennclave
from ennclave import cli
from ennclave.adapters.keras import KerasAdapter
from ennclave.errors import ProgramError
from ennclave.graph import TensorInfo, find_cut_points
from ennclave.passes import optimize
from ennclave.program import (
    Program,
    ProgramBuilder,
    bf16_round,
    quantise_int8,
    quantise_rows_int8,
)
from ennclave.reference import execute
from ennclave.seal import HEADER_BYTES
from ennclave.split import split_model
from support.enclave_bundle import needs_worker


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


FLAGS = _cpu_flags()
PATH_NEEDS = {
    "amx": {"avx512f", "amx_bf16", "amx_tile"},
    "avx512bf16": {"avx512f", "avx512_bf16"},
    "avx512": {"avx512f"},
    "avx2": {"avx2", "fma"},
    "portable": set(),
}


def _cnn():
    import keras

    keras.utils.set_random_seed(4)
    inp = keras.Input((9, 9, 3))
    h = keras.layers.Conv2D(40, 3, padding="same", activation="relu")(inp)
    h = keras.layers.Conv2D(33, 1, activation="relu")(h)  # pointwise
    h = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(70, activation="relu")(h)
    return keras.Model(inp, keras.layers.Dense(5)(h))


@pytest.fixture(scope="module")
def cnn():
    model = _cnn()
    adapter = KerasAdapter.from_model(model)
    program = optimize(adapter.lower_private(find_cut_points(adapter.graph)[0]))
    x = np.random.default_rng(1).standard_normal((13, 9, 9, 3)).astype(np.float32)
    return adapter, program, x


@needs_worker
@pytest.mark.parametrize("path", sorted(PATH_NEEDS))
@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_worker_equals_reference_of_the_quantised_program(
    cnn, weights, path, tmp_path, monkeypatch
):
    if not PATH_NEEDS[path] <= FLAGS:
        pytest.skip(f"this CPU cannot run the {path} kernels")
    monkeypatch.setenv("ENNCLAVE_QKERNEL", path)
    adapter, program, x = cnn
    split_model(adapter, 0, tmp_path / "b", keystore=tmp_path / "ks.json", weights=weights)
    with ennclave.load(tmp_path / "b", keystore=tmp_path / "ks.json") as m:
        got = m.predict(x, batch_size=8)  # 13 samples: a full and a ragged batch
    want = execute(program.quantised(weights), x)
    scale = float(np.abs(want).max())
    # bf16 rounds and int8 quantises every dense/conv input as well, so a value the
    # worker and the reference compute a float32 ulp apart may round to either side of
    # a step when it is the next layer's input: slack for that, far below a wrong
    # kernel (the exact integer sums are checked by cargo test, ops::qdense).
    tol = 2e-3 * scale
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)
    # The quantised weights are what ran: the float32 program is clearly further off.
    off_fp32 = float(np.abs(got - execute(program, x)).max())
    assert off_fp32 > 3 * float(np.abs(got - want).max())


def _odd_dense():
    """k = 70 (not a multiple of 4 or 64), n = 45 (not a multiple of 16), a bias: an
    all-zero input row (scale 0) comes out as the bias. One layer, so the worker and
    the reference quantise identical float32 inputs and agree to float32 rounding."""
    import keras

    keras.utils.set_random_seed(5)
    inp = keras.Input((70,))
    model = keras.Model(inp, keras.layers.Dense(45)(inp))
    w = model.layers[-1].get_weights()[0]
    model.layers[-1].set_weights([w, np.linspace(-1, 1, 45).astype(np.float32)])
    return model


@needs_worker
@pytest.mark.parametrize("path", sorted(PATH_NEEDS))
def test_int8_dense_edge_cases_equal_reference(path, tmp_path, monkeypatch):
    if not PATH_NEEDS[path] <= FLAGS:
        pytest.skip(f"this CPU cannot run the {path} kernels")
    monkeypatch.setenv("ENNCLAVE_QKERNEL", path)
    adapter = KerasAdapter.from_model(_odd_dense())
    program = optimize(adapter.lower_private(find_cut_points(adapter.graph)[0]))
    x = np.random.default_rng(2).standard_normal((64, 70)).astype(np.float32)
    x[[0, 5, 40]] = 0.0
    split_model(adapter, 0, tmp_path / "b", keystore=tmp_path / "ks.json", weights="int8")
    shipped = program.quantised("int8")
    bias = np.linspace(-1, 1, 45).astype(np.float32)
    with ennclave.load(tmp_path / "b", keystore=tmp_path / "ks.json") as m:
        for batch in (1, 2, 17, 64):  # every kernel's partial row blocks
            got = m.predict(x[:batch], batch_size=batch)
            want = execute(shipped, x[:batch])
            assert np.isfinite(got).all()
            np.testing.assert_allclose(got, want, atol=1e-5 * float(np.abs(want).max()), rtol=0)
            zero = [i for i in (0, 5, 40) if i < batch]
            np.testing.assert_allclose(got[zero], np.broadcast_to(bias, (len(zero), 45)))
    # Quantising the activations is what ran: weights-only int8 is clearly further off.
    weights_only = x @ shipped.weights[shipped.nodes[0].weights["kernel"]] + bias
    assert np.abs(got - weights_only).max() > 10 * np.abs(got - want).max()


def _head(k: int = 512, h: int = 2048, out: int = 67):
    import keras

    inp = keras.Input((k,))
    x = keras.layers.Dense(h, activation="relu")(inp)
    x = keras.layers.Dense(h, activation="relu")(x)
    return keras.Model(inp, keras.layers.Dense(out)(x))


def _locked_kib(pid: int) -> int:
    """The worker's locked memory (memfd_secret pages count as locked; so do mlocked
    ones on the fallback), from /proc."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Locked:"):
            return int(line.split()[1])
    raise AssertionError("no Locked: line")


@needs_worker
def test_secret_memory_half_and_quarter(tmp_path):
    adapter = KerasAdapter.from_model(_head())
    x = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
    kib = {}
    for weights in ("fp32", "bf16", "int8"):
        out = tmp_path / weights
        split_model(adapter, 0, out, keystore=tmp_path / "ks.json", n_random=2, weights=weights)
        with ennclave.load(out, keystore=tmp_path / "ks.json") as m:
            m.predict(x)
            try:
                kib[weights] = _locked_kib(m.worker_pid)
            except OSError:
                pytest.skip("the worker's /proc/PID/smaps_rollup is not readable here")
    assert kib["fp32"] > 20_000  # 21.5 MB of float32 weights
    assert 0.45 < kib["bf16"] / kib["fp32"] < 0.58, kib
    assert 0.2 < kib["int8"] / kib["fp32"] < 0.32, kib


def _tensor_starts(container: bytes) -> dict[str, tuple[str, list[int], int]]:
    """Each tensor of a sealed-offset container: dtype, shape, and where its data starts
    in the buffer the worker decrypts into (after the seal header)."""
    (nj,) = struct.unpack("<Q", container[8:16])
    (nh,) = struct.unpack("<Q", container[16 + nj : 24 + nj])
    header = json.loads(container[24 + nj : 24 + nj + nh])
    data = HEADER_BYTES + 24 + nj + nh
    return {
        k: (t["dtype"], t["shape"], data + t["data_offsets"][0])
        for k, t in header.items()
        if k != "__metadata__"
    }


def test_container_round_trip_and_bytes():
    rng = np.random.default_rng(0)
    b = ProgramBuilder()
    kernel = rng.standard_normal((37, 70)).astype(np.float32)
    h = b.add("dense", ["x"], "fc", weights={"kernel": kernel, "bias": np.ones(70, np.float32)})
    b.add("conv", [b.add("reshape", [h], "r", {"shape": [7, 10, 1]})], "c",
          {"strides": [1, 1], "pads": [[1, 1], [1, 1]], "groups": 1},
          {"kernel": rng.standard_normal((3, 3, 1, 5)).astype(np.float32)}, output="y")  # fmt: skip
    p = b.build([TensorInfo("x", (None, 37))], [TensorInfo("y", (None, 7, 10, 5))])
    x = rng.standard_normal((3, 37)).astype(np.float32)
    for weights in ("bf16", "int8"):
        q = p.quantised(weights)
        back = Program.from_container(q.to_container())
        assert back.weights_dtype == weights and set(back.quant) == set(q.quant)
        for key, w in q.quant.items():
            np.testing.assert_array_equal(back.quant[key].data, w.data)
            np.testing.assert_array_equal(back.weights[key], q.weights[key])
        np.testing.assert_array_equal(execute(back, x), execute(q, x))
        # Every quantised kernel starts 64-byte aligned where the worker reads the
        # container (after the seal header), though the float32 bias before it is not
        # a multiple of 64 bytes.
        starts = _tensor_starts(q.to_container(offset=HEADER_BYTES))
        kernels = {k: at for k, (dtype, _, at) in starts.items() if dtype != "F32"}
        assert len(kernels) == 2, starts
        assert all(at % 64 == 0 for at in kernels.values()), (weights, starts)
    # Float32 programs are laid out the same way: the packed dense kernel
    # ([3, 37, 32]) starts on a cache line, its 70-float bias does not end on one.
    starts = _tensor_starts(p.to_container(offset=HEADER_BYTES))
    packed = [at for _, shape, at in starts.values() if shape == [3, 37, 32]]
    assert len(packed) == 1 and packed[0] % 64 == 0, starts
    # bf16: half the kernel bytes; int8: a quarter plus one float32 scale per column.
    kb = 4 * (kernel.size + 45)
    assert p.weight_bytes - p.quantised("bf16").weight_bytes == kb // 2
    assert p.weight_bytes - p.quantised("int8").weight_bytes == 3 * kb // 4 - 4 * (70 + 5)
    # An old (float32) container is written exactly as before quantisation existed.
    assert p.quantised("fp32").to_container() == p.to_container()


def test_activation_rows_quantise_like_the_worker():
    """Round half to even after a float32 multiply by 127 / max|x|, clipped to ±127;
    a zero row has scale 0 and a NaN or infinity makes the row's scale NaN."""
    x = np.array(
        [[0, 0, 0], [1, -2, 0.5], [127, 3.5, -2.5], [np.nan, 1, 2], [np.inf, 1, 1]], np.float32
    )
    q, scale = quantise_rows_int8(x)
    np.testing.assert_array_equal(q[:3], [[0, 0, 0], [64, -127, 32], [127, 4, -2]])
    np.testing.assert_array_equal(scale[:3, 0], np.float32([0, 2 / np.float32(127), 1]))
    assert np.isnan(scale[3:]).all()


def test_quantisers():
    a = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -3.14159, np.inf], np.float32)
    np.testing.assert_array_equal(bf16_round(a), [1.0, 1.0, 1 + 2**-6, -3.140625, np.inf])
    assert np.isnan(bf16_round(np.array([np.nan], np.float32)))[0]
    w = np.array([[0.5, 0.0], [-1.27, 0.0], [0.01, 0.0]], np.float32)
    q, scale = quantise_int8(w)
    np.testing.assert_allclose(scale, [0.01, 0.0])
    np.testing.assert_array_equal(q[:, 0], [50, -127, 1])
    assert not q[:, 1].any()


def test_malformed_quantised_container_is_one_sentence():
    b = ProgramBuilder()
    b.add("dense", ["x"], "fc", weights={"kernel": np.ones((4, 3), np.float32)}, output="y")
    q = b.build([TensorInfo("x", (None, 4))], [TensorInfo("y", (None, 3))]).quantised("int8")
    shipped = q.shipped()
    del shipped.weights["fc.kernel.scale"]
    del shipped.nodes[0].weights["kernel_scale"]
    data = shipped.json_bytes(), shipped.weights_bytes()
    with pytest.raises(ProgramError, match="kernel_scale"):
        Program.from_parts(*data)


@needs_worker
def test_cli_split_reports_error_accuracy_and_bytes(cnn, tmp_path, capsys):
    adapter, program, x = cnn
    model_path = tmp_path / "m.keras"
    adapter.model.save(model_path)
    labels = np.asarray(adapter.predict(x)).argmax(-1)
    labels[:3] = (labels[:3] + 1) % 5  # the original gets 10 of 13 right
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", labels)
    argv = ["split", str(model_path), "--cut", "0", "-o", str(tmp_path / "b"),
            "--keystore", str(tmp_path / "ks.json"), "--weights", "int8",
            "--samples", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy")]  # fmt: skip
    assert cli.main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    v = json.loads((tmp_path / "b" / "verification.json").read_text())
    assert v["weights"] == "int8" and v["accuracy_samples"] == 13
    assert v["accuracy_fp32"] == pytest.approx(10 / 13)
    shipped = execute(program.quantised("int8"), x)
    assert v["accuracy_shipped"] == pytest.approx(float((shipped.argmax(-1) == labels).mean()))
    want = float(np.abs(shipped - np.asarray(adapter.predict(x))).max())
    assert 0 < want <= v["quantised_max_abs_error"]  # the samples plus random inputs
    assert v["weight_bytes"] < 0.3 * v["weight_bytes_fp32"]
    assert "Weights stored as int8" in out and "Accuracy on the 13 labelled samples" in out
    assert cli.main(["plan", str(model_path), "--json"]) == 0
    c0 = json.loads(capsys.readouterr().out)["cut_points"][0]
    assert c0["enclave_bytes_int8"] < 0.3 * c0["enclave_bytes"]
    assert 0.45 < c0["enclave_bytes_bf16"] / c0["enclave_bytes"] < 0.55
