"""Security properties of the enclave worker and the host process."""

from __future__ import annotations

import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

import ennclave
from ennclave.errors import WorkerNotFound
from ennclave.runtime import worker as wmod
from support.enclave_bundle import write_bundle

try:
    WORKER = wmod.find_worker_binary()
except WorkerNotFound:
    WORKER = None

pytestmark = pytest.mark.skipif(
    WORKER is None or sys.platform != "linux", reason="needs the built worker on Linux"
)

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def test_worker_is_sandboxed(enclave_bundle):
    with ennclave.load(enclave_bundle.path, keystore=enclave_bundle.keystore) as m:
        m.predict(np.ones((4, 8), np.float32))
        st = _status(m.worker_pid)
        assert st["Seccomp"] == "2"
        assert st["NoNewPrivs"] == "1"
        assert int(st.get("Seccomp_filters", "3")) >= 3
        # non-dumpable: /proc/PID/* files become root-owned
        assert Path(f"/proc/{m.worker_pid}/mem").stat().st_uid == 0
        limits = Path(f"/proc/{m.worker_pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"]
        # the secret memory backing is reported (memfd_secret where the kernel has it)
        assert m.worker.ready.secmem in ("memfd_secret", "mlock", "anonymous")


PT_INTERP = 3  # the program header that names the dynamic loader (ELF gABI)


def _program_header_types(binary: Path) -> list[int]:
    """The p_type of every program header of a little-endian ELF64 file."""
    data = binary.read_bytes()[:65536]
    assert data[:6] == b"\x7fELF\x02\x01", f"{binary} is not a little-endian ELF64 file"
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]


@pytest.mark.skipif(
    platform.machine() != "x86_64" or platform.libc_ver()[0] != "glibc",
    reason="the static default build is checked on x86_64 Linux gnu only",
)
def test_worker_is_linked_statically(enclave_bundle):
    """The worker the tests use, built the default way (pyproject.toml `rustc-args`,
    `cargo build-worker`), has no dynamic loader, so LD_PRELOAD, LD_AUDIT and
    LD_LIBRARY_PATH have nothing to act on (docs/threat-model.md); and its evidence
    says so, which a key-server policy can require (`static_binary`)."""
    types = _program_header_types(WORKER)
    assert PT_INTERP not in types, (
        f"{WORKER} is linked dynamically (it names a dynamic loader, PT_INTERP), but the "
        "default build links it statically: build it with `cargo build-worker` in enclave/ "
        "(`cargo rustc --release --bin ennclave-enclave -- -C target-feature=+crt-static`; a "
        "plain `cargo build --release` links it dynamically) or install it with `pip install .`"
    )
    with ennclave.load(enclave_bundle.path, keystore=enclave_bundle.keystore) as m:
        assert m.worker.protections["static_binary"] is True
        assert m.worker.protections["mapping_check"] is True


ATTACK = textwrap.dedent(
    r"""
    import ctypes, errno, json, os, sys
    pid = int(sys.argv[1])
    res = {"uid": os.getuid()}
    try:
        with open(f"/proc/{pid}/mem", "rb") as f:
            f.seek(0x400000)
            f.read(16)
        res["mem"] = "read"
    except OSError as e:
        res["mem"] = errno.errorcode.get(e.errno, str(e.errno))
    class iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(16)
    local = iovec(ctypes.cast(buf, ctypes.c_void_p), 16)
    remote = iovec(ctypes.c_void_p(0x400000), 16)
    libc.process_vm_readv.restype = ctypes.c_ssize_t
    n = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    res["vm_readv"] = "read" if n >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")
    print(json.dumps(res))
    """
)


def _as_nobody(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def _attack(pid: int) -> dict[str, str]:
    python = "/usr/bin/python3" if os.geteuid() == 0 else sys.executable
    r = subprocess.run(
        _as_nobody([python, "-c", ATTACK, str(pid)]), capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_same_user_cannot_read_worker_memory(tmp_path, monkeypatch):
    """Another process of the worker's user can neither open /proc/PID/mem nor use
    process_vm_readv on it. As root (CAP_SYS_PTRACE bypasses dumpability) the worker is
    started as `nobody` and attacked by another `nobody` process."""
    if os.geteuid() == 0:
        if not Path("/usr/bin/python3").exists():
            pytest.skip("needs /usr/bin/python3 to run the attacker as nobody")
        d = Path(tempfile.mkdtemp(prefix="ennclave-sec-", dir="/tmp"))
        os.chmod(d, 0o755)
        wrapper = d / "worker-as-nobody"
        wrapper.write_text(
            "#!/bin/sh\n"
            f"exec /usr/bin/setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups "
            f'{WORKER} "$@"\n'
        )
        wrapper.chmod(0o755)
        monkeypatch.setenv("ENNCLAVE_WORKER", str(wrapper))
    b = write_bundle(tmp_path / "b", tmp_path / "ks.json")

    # control: a dumpable process of the same user *is* readable by the attacker
    control = subprocess.Popen(_as_nobody(["sleep", "30"]))
    try:
        ctl = _attack(control.pid)
        assert ctl["mem"] != "EACCES" and ctl["vm_readv"] != "EPERM", ctl
    finally:
        control.kill()
        control.wait()

    with ennclave.load(b.path, keystore=b.keystore) as m:
        m.predict(np.ones((2, 8), np.float32))
        pid = m.worker_pid
        if os.geteuid() == 0:
            assert _status(pid)["Uid"].split()[0] == str(NOBODY)
        res = _attack(pid)
        assert res["mem"] in ("EACCES", "EPERM"), res
        assert res["vm_readv"] == "EPERM", res
        # and the worker is unharmed
        m.predict(np.ones((2, 8), np.float32))


SCAN = textwrap.dedent(
    r"""
    import json, re, sys
    import numpy as np
    import ennclave

    bundle, keystore, a_hex, b_hex = sys.argv[1:5]
    # The needle is kept as two separate halves, never as one contiguous 32-byte run.
    half_a, half_b = bytes.fromhex(a_hex), bytes.fromhex(b_hex)
    del a_hex, b_hex
    sys.argv[3] = sys.argv[4] = ""

    sys.path.insert(0, TESTS_DIR)
    from support.memscan import scan_self as scan

    with ennclave.load(bundle, keystore=keystore) as m:
        y = m.predict(np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32))
        assert y.shape == (64, 5)
        found = scan(half_a, half_b)
    after_close = scan(half_a, half_b)
    # positive control: a planted 32-byte run made of two other halves is found
    c1, c2 = bytes(range(100, 116)), bytes(range(200, 216))
    planted = bytearray(c1) + bytearray(c2)
    control = scan(c1, c2)
    print(json.dumps({"found": found, "after_close": after_close, "control": control}))
    """
).replace("TESTS_DIR", repr(str(Path(__file__).resolve().parent)))


def test_host_memory_never_holds_plaintext_weights(tmp_path):
    """After load + predict, the host process's memory holds no plaintext weights.

    Runs in a fresh interpreter that only ever sees the sealed bundle (the pytest
    process built the bundle, so it has the weights)."""
    b = write_bundle(tmp_path / "b", tmp_path / "ks.json", seed=1234)
    needle = np.ascontiguousarray(b.weights["fc1.kernel"].reshape(-1)[40:48]).tobytes()
    assert len(needle) == 32
    a_hex, b_hex = needle[:16].hex(), needle[16:].hex()
    del needle
    env = dict(
        os.environ, PYTHONPATH=str(REPO / "python") + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    r = subprocess.run(
        [sys.executable, "-c", SCAN, str(b.path), str(b.keystore), a_hex, b_hex],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["control"] >= 1, res  # the scanner does find a planted run
    assert res["found"] == 0, res
    assert res["after_close"] == 0, res
