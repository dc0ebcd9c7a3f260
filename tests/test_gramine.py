"""The worker under Gramine (docs/platforms.md): the end-to-end checks run against the
native worker and against the same binary under gramine-direct — equal outputs, bad
input and tampered bundles refused — plus the TCP/shm transport's token, the platform
in HELLO, the SGX measurement, and the gramine-sgx refusal on a machine without SGX.

gramine-direct is looked up in /opt/gramine/bin. Without it these tests skip, saying
why; under CI (env CI set) they fail instead, since CI installs Gramine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ennclave
from ennclave.errors import AuthenticationError, InputError, WorkerCrashed, WorkerError
from ennclave.runtime import gramine
from ennclave.runtime import worker as wmod
from support.enclave_bundle import IN, needs_worker, reference, write_bundle

GRAMINE_DIRECT = gramine.PREFIX / "bin" / "gramine-direct"


def _need_gramine() -> None:
    if GRAMINE_DIRECT.is_file() and os.access(GRAMINE_DIRECT, os.X_OK):
        return
    why = f"{GRAMINE_DIRECT} is missing (install ../shared/gramine/, see docs/platforms.md)"
    if os.environ.get("CI"):
        pytest.fail(f"CI needs Gramine for the gramine-direct tests: {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="module")
def gramine_dir(tmp_path_factory):
    """One Gramine directory (binary copy + rendered manifest) for the module."""
    _need_gramine()
    d = tmp_path_factory.mktemp("gramine")
    gramine.write_manifest(d, wmod.find_worker_binary())
    return d


@pytest.fixture(params=["native", "gramine-direct"])
def platform(request):
    """Where the worker runs, with its load() options."""
    if request.param == "native":
        return {"platform": "native"}
    return {"platform": "gramine-direct", "gramine_dir": request.getfixturevalue("gramine_dir")}


def _x(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, IN)).astype(np.float32)


@needs_worker
def test_outputs_equal_the_native_worker_and_bad_input_is_refused(platform, tmp_path):
    b = write_bundle(tmp_path / "b", tmp_path / "ks.json", seed=3)
    top = write_bundle(
        tmp_path / "t", tmp_path / "ks.json", seed=4, policy={"mode": "top_k", "k": 2}
    )
    x = _x(300)  # more than one max_batch of 256: streamed in two requests
    with ennclave.load(b.path, keystore=b.keystore, threads=2, **platform) as m:
        assert m._worker.hello.platform == platform["platform"]
        # The protections it reports (docs/key-release.md): no seccomp or mapping check
        # under Gramine, whose loader maps its own libraries and answers seccomp ENOSYS.
        prot = m._worker.protections
        native = platform["platform"] == "native"
        assert prot["platform"] == platform["platform"] and prot["environment_check"]
        assert (prot["seccomp"], prot["mapping_check"], prot["non_dumpable"]) == (native,) * 3
        got = m.predict(x, batch_size=300)
        np.testing.assert_allclose(got, reference(b.weights, x), atol=1e-5, rtol=1e-5)
        # bad input: refused by the worker (non-finite) or the host (size); it keeps serving
        bad = x[:3].copy()
        bad[1, 2] = np.nan
        with pytest.raises(InputError, match="NaN or infinity"):
            m.predict(bad)
        with pytest.raises(InputError, match="expects"):
            m.predict(np.zeros((2, IN + 1), np.float32))
        # an INFER the host would never send (batch 0): the worker refuses it itself
        w = m._worker
        w._send(wmod._frame(wmod.INFER, struct.pack("<II", 0, 0)))
        ty, p = w._recv()
        assert ty == wmod.ERROR and "outside 1..=" in w._error(p).args[0]
        np.testing.assert_array_equal(m.predict(x[:7]), got[:7])
        assert m._worker.ping()["queries_used"] == 307
        if platform["platform"] != "native":
            assert not list(Path("/dev/shm").glob(f"ennclave-{os.getpid()}-*"))  # unlinked
    with ennclave.load(top.path, keystore=top.keystore, threads=2, **platform) as m:
        values, idx = m.predict(x[:9])
    full = reference(top.weights, x[:9])
    np.testing.assert_array_equal(idx, np.argsort(-full, axis=1)[:, :2])
    np.testing.assert_allclose(values, np.take_along_axis(full, idx, 1), atol=1e-5)


@needs_worker
def test_tampered_bundle_is_refused(platform, tmp_path):
    b = write_bundle(tmp_path / "b", tmp_path / "ks.json")
    mpath = b.path / "manifest.json"
    m = json.loads(mpath.read_text())
    orig = mpath.read_text()
    m["output_policy"] = {"mode": "full", "max_queries": 1000000}
    mpath.write_text(json.dumps(m))
    with pytest.raises(AuthenticationError, match="did not authenticate"):
        ennclave.load(b.path, keystore=b.keystore, threads=1, **platform)
    mpath.write_text(orig)
    spath = b.path / "private.sealed"
    data = bytearray(spath.read_bytes())
    data[100] ^= 0x40
    spath.write_bytes(bytes(data))
    m = json.loads(mpath.read_text())
    m["integrity"]["files"]["private.sealed"] = hashlib.sha256(data).hexdigest()
    mpath.write_text(json.dumps(m))
    with pytest.raises(AuthenticationError):  # the GCM tag, inside the worker
        ennclave.load(b.path, keystore=b.keystore, threads=1, **platform)


def test_gramine_module_names_the_worker_binary_as_the_worker_does():
    assert gramine.BINARY_NAME == wmod.BINARY_NAME
    assert gramine.TEMPLATE.is_file()


def test_host_accepts_only_the_connection_with_the_token():
    """A local process that connects first, without the token, is dropped."""
    c = wmod.WorkerClient.__new__(wmod.WorkerClient)
    c._handshake_timeout = 10.0
    c._proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    lsock = socket.socket()
    try:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(4)
        port = lsock.getsockname()[1]
        token = os.urandom(32)
        impostor = socket.create_connection(("127.0.0.1", port))
        impostor.sendall(os.urandom(32))
        worker = socket.create_connection(("127.0.0.1", port))
        worker.sendall(token)
        conn = c._accept_worker(lsock, token)
        worker.sendall(b"hi")
        assert conn.recv(2) == b"hi"
        assert impostor.recv(1) == b""  # closed by the host
        for s in (conn, worker, impostor):
            s.close()
    finally:
        lsock.close()
        c._proc.kill()
        c._proc.wait()


@needs_worker
def test_a_worker_that_fails_under_gramine_says_why(gramine_dir, tmp_path):
    """A manifest that is not ennclave's: the worker refuses to start, and the host's
    error carries the worker's sentence (Gramine sends it to stdout)."""
    bad = tmp_path / "bad"
    shutil.copytree(gramine_dir, bad)
    m = bad / gramine.MANIFEST
    m.write_text("".join(x for x in m.read_text().splitlines(True) if "ENNCLAVE_GRAMINE" not in x))
    b = write_bundle(tmp_path / "b", tmp_path / "ks.json")
    with pytest.raises(WorkerCrashed, match="the Gramine manifest is not ennclave's"):
        ennclave.load(b.path, keystore=b.keystore, platform="gramine-direct", gramine_dir=bad)


@needs_worker
def test_worker_refuses_gramine_platform_outside_gramine(tmp_path):
    """`--platform gramine` (which drops the native sandbox) outside Gramine is refused."""
    shm = Path("/dev/shm") / f"ennclave-test-{os.getpid()}"
    shm.write_bytes(bytes(1 << 16))
    try:
        r = subprocess.run(
            [
                str(wmod.find_worker_binary()),
                *("--platform", "gramine", "--ctl-port", "9"),
                *("--shm-path", str(shm), "--shm-bytes", str(1 << 16)),
            ],
            input=b"00" * 32,
            capture_output=True,
            timeout=30,
        )
    finally:
        shm.unlink()
    assert r.returncode == 2
    assert b"not running under Gramine" in r.stderr


@needs_worker
def test_gramine_sgx_needs_sgx_hardware(tmp_path):
    if gramine.SGX_DEVICE.exists():
        pytest.skip("this machine has SGX; gramine-sgx is untested here")
    b = write_bundle(tmp_path / "b", tmp_path / "ks.json")
    with pytest.raises(WorkerError, match=r"^gramine-sgx needs an SGX machine, and this one"):
        ennclave.load(b.path, keystore=b.keystore, platform="gramine-sgx")


@needs_worker
def test_mrenclave_is_deterministic_and_follows_the_binary(gramine_dir, tmp_path):
    if not gramine.signing_available():
        why = "Gramine's SGX signing tools are missing"
        if os.environ.get("CI"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    first = gramine.measure(gramine_dir)["mr_enclave"]
    assert len(first) == 64 and int(first, 16)
    # The same binary, rendered again in another folder (and signed with another
    # throw-away key): the same MRENCLAVE.
    again = tmp_path / "again"
    gramine.write_manifest(again, gramine_dir / wmod.BINARY_NAME)
    assert gramine.measure(again)["mr_enclave"] == first
    # One byte appended to the binary (not code): another MRENCLAVE.
    changed = tmp_path / "changed-bin"
    shutil.copyfile(gramine_dir / wmod.BINARY_NAME, changed)
    with open(changed, "ab") as f:
        f.write(b"\0")
    os.chmod(changed, 0o755)
    other = tmp_path / "other"
    gramine.write_manifest(other, changed)
    assert gramine.measure(other)["mr_enclave"] != first
    # The command prints the same value.
    r = subprocess.run(  # a relative DIR, as an owner would type it
        [sys.executable, "-m", "ennclave", "measure", "again", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["mr_enclave"] == first


@needs_worker
def test_cli_run_under_gramine_direct(gramine_dir, tmp_path):
    b = write_bundle(tmp_path / "b", tmp_path / "ks.json", seed=5)
    x = _x(6, seed=7)
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, ENNCLAVE_GRAMINE_DIR=str(tmp_path / "cache"))
    r = subprocess.run(
        [
            *(sys.executable, "-m", "ennclave", "run", str(b.path)),
            *("--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy")),
            *("--keystore", str(b.keystore), "--platform", "gramine-direct"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), reference(b.weights, x), atol=1e-5)


@needs_worker
@pytest.mark.parametrize("cut", ["first", "middle"])
def test_split_keras_model_same_answers_under_gramine_direct(cut, gramine_dir, tmp_path):
    from ennclave.adapters.keras import KerasAdapter
    from ennclave.graph import find_cut_points
    from ennclave.split import split_model
    from support.keras_models import residual_cnn

    model = residual_cnn()
    adapter = KerasAdapter.from_model(model)
    cuts = find_cut_points(adapter.graph)
    c = cuts[0] if cut == "first" else cuts[len(cuts) // 2]
    split_model(adapter, c.index, tmp_path / "b", keystore=tmp_path / "ks.json", n_random=4)
    x = np.random.default_rng(8).standard_normal((6, *model.input_shape[1:])).astype("float32")
    outs = {}
    for p, extra in (("native", {}), ("gramine-direct", {"gramine_dir": gramine_dir})):
        with ennclave.load(
            tmp_path / "b", keystore=tmp_path / "ks.json", threads=2, platform=p, **extra
        ) as m:
            outs[p] = m.predict(x, batch_size=4)
    np.testing.assert_allclose(outs["gramine-direct"], outs["native"], atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(outs["native"], np.asarray(model(x)), atol=1e-4)
