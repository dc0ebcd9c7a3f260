"""Host side of the enclave worker protocol (docs/worker-protocol.md).

`WorkerClient` spawns `ennclave-enclave` with one end of a socketpair (control frames)
and a memfd (tensors and the sealed program) — or, with `platform="gramine-direct"` or
`"gramine-sgx"`, under Gramine with a TCP connection on 127.0.0.1 and a /dev/shm file
instead (docs/platforms.md) — runs the handshake — the worker's
ephemeral public key arrives in HELLO, the data key goes back wrapped to it with HPKE
(RFC 9180) — and then serves `infer()` calls, posted on the doorbell in the shared
region where the platform allows it (x86-64) and as INFER frames elsewhere. It never
sees the plaintext program.

Crash handling: if the worker dies, the call in flight raises `WorkerCrashed`; the next
call starts a fresh worker (a new ephemeral key, the full handshake again). All public
methods hold one lock, so any number of threads may share a client.
"""

from __future__ import annotations

import contextlib
import ctypes
import hmac
import json
import mmap
import os
import platform
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..attest.binding import evidence_hash
from ..errors import (
    AuthenticationError,
    BundleError,
    EnnclaveError,
    InputError,
    KeyNotFound,
    LicenceError,
    QueryBudgetExhausted,
    WorkerCrashed,
    WorkerError,
    WorkerNotFound,
)
from ..seal import CachedKey, WrappedKey, wrap_data_key

BINARY_NAME = "ennclave-enclave"
# Linux configfs-tsm, where a confidential VM's guest reports come from (platform/tsm.rs).
TSM_ROOT = "/sys/kernel/config/tsm/report"
# The only environment the worker gets: diagnostics, and the switches that choose its
# fp32 kernel family and cap the quantised-kernel path (docs/worker-protocol.md,
# "Sandbox").
_WORKER_ENV = (
    "ENNCLAVE_SECCOMP_LOG",
    "ENNCLAVE_TRACE",
    "ENNCLAVE_NO_AVX512",
    "ENNCLAVE_KERNEL",
    "ENNCLAVE_QKERNEL",
    "RUST_BACKTRACE",
)
# ENNCLAVE_KERNEL's values: the worker's fp32 kernel families (ops/dense.rs `Isa`).
KERNEL_FAMILIES = ("avx512", "avx2", "portable")
# 3: EVIDENCE carries the worker's protections, bound into the evidence hash.
# 4: the worker says on the doorbell when it may sleep; the host wakes it only then.
PROTOCOL_VERSION = 4
MAX_FRAME = 1 << 20
# How long the host polls for an answer, when the previous one came within this time.
# Waking a blocked process costs tens of µs on a VM (the answer's write has to kick the
# sleeping core): a tenth of a batch-1 dense head. The poll yields the core between
# tries, so the worker's compute threads keep both cores; answers slower than this are
# waited for asleep, where that cost is noise.
SPIN_S = 1e-3
# When the last answer came within this time, the host polls without yielding for this
# long first: each yield adds a system call to a wait this short. Kept short: where host
# and worker share a core (a loaded machine), a poll that does not yield holds the core
# the worker needs to answer (50 µs here made every round trip ≥ 80 µs there).
HOT_SPIN_S = 5e-6

# message types (protocol.rs `ty`)
HELLO, CHALLENGE, EVIDENCE = 0x01, 0x02, 0x03
MANIFEST, SEALED_BEGIN, SEALED_CHUNK, CHUNK_OK, KEY, READY = 0x10, 0x11, 0x12, 0x13, 0x14, 0x15
LICENCE, KEY_CACHE, CACHED_KEY = 0x16, 0x17, 0x18
INFER, RESULT, PING, PONG, SHUTDOWN, BYE, ERROR = 0x20, 0x21, 0x22, 0x23, 0x2E, 0x2F, 0x7F
USAGE = 0x2D  # after SHUTDOWN, before BYE: a metered licence's final usage report

# error codes (protocol.rs `code`)
E_BAD_REQUEST, E_BAD_INPUT_SIZE, E_NONFINITE, E_BUDGET = 1, 2, 3, 4
E_AUTH, E_KEY, E_PROGRAM, E_PROTOCOL, E_INTERNAL, E_MANIFEST, E_SANDBOX = 5, 6, 7, 8, 9, 10, 11
E_LICENCE_EXPIRED, E_LICENCE_INVALID = 12, 13

INFER_ALLOW_NONFINITE = 1

_HDR = struct.Struct("<IB")
_U32 = struct.Struct("<I")
_INFER = struct.Struct("<IBII")  # a whole INFER frame: length, type, batch, flags
_RESULT_HEAD = struct.Struct("<II")

# The doorbell block at the start of the shared region (protocol.rs `doorbell`):
# requests and answers without socket frames. Byte offsets:
DB_REQ_SEQ, DB_REQ_BATCH, DB_REQ_PROGRESS = 0, 4, 16  # progress: u64 seq << 32 | floats
DB_ANS_SEQ, DB_ANS_STATUS, DB_ANS_PROGRESS = 64, 68, 88
DB_EVENTS, DB_WORKER_SLEEPS = 128, 132
DB_STATUS_OK = 0
_DB_REQ = struct.Struct("<II")  # batch, flags
_DB_ANS = struct.Struct("<IIIQ")  # status, batch, out_len, queries left
# The host copies a doorbell request's input in after posting it, in chunks of this
# many floats (32 KiB), so the worker copies each chunk while the next is written.
# 64×512 round trip, interleaved: 37 µs (64 KiB chunks 37.5, one chunk 42).
_IN_CHUNK = 8192
# The doorbell relies on the host's plain stores becoming visible in program order
# (the fields before the sequence number, each input chunk before its progress): true
# on x86-64 (TSO), not on weaker memory models, where Python cannot fence. Elsewhere
# requests go as INFER frames.
DOORBELL_OK = platform.machine().lower() in ("x86_64", "amd64")
# How long one call may wait for the worker's answer before it fails and the worker is
# replaced (a stopped or wedged worker). Generous: a large batch on a slow CPU is fine.
DEFAULT_CALL_TIMEOUT_S = 600.0
# How long a sleeping host waits on the answer word before it checks that the worker
# is still alive.
_LIVENESS_CHECK_S = 0.05


_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}


class _Futex:
    """FUTEX_WAIT / FUTEX_WAKE on words of the shared region (shared futexes: the
    worker is another process), through libc's syscall(2)."""

    def __init__(self) -> None:
        self.nr = _SYS_FUTEX.get(platform.machine().lower())
        if self.nr is None:
            return  # unknown syscall number: no wakes; the worker still polls
        self._call = ctypes.CDLL(None, use_errno=True).syscall
        self._call.restype = ctypes.c_long
        self._call.argtypes = [
            ctypes.c_long,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_uint32,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_uint32,
        ]

    def wake(self, addr: int) -> None:
        if self.nr is not None:
            self._call(self.nr, addr, 1, 0x7FFFFFFF, None, None, 0)  # FUTEX_WAKE

    def wait(self, addr: int, expected: int, timeout_s: float) -> None:
        """Sleep while the word holds `expected` (at most `timeout_s`; the GIL is
        released meanwhile). Any outcome is fine: the caller re-reads the word. Only
        the doorbell waits, and it runs only where the syscall number is known."""
        assert self.nr is not None
        ts = (ctypes.c_long * 2)(int(timeout_s), int(timeout_s % 1 * 1e9))
        self._call(self.nr, addr, 0, expected, ctypes.addressof(ts), None, 0)  # FUTEX_WAIT


_futex = _Futex()


class _Doorbell:
    """The doorbell block's words, as ctypes views into the shared region (they hold
    exports of the mmap: drop this before closing it)."""

    __slots__ = (
        "ans",
        "ans_addr",
        "events",
        "events_addr",
        "fence",
        "in_progress",
        "out_progress",
        "req",
        "sleeps",
    )

    def __init__(self, mm: mmap.mmap) -> None:
        self.req = ctypes.c_uint32.from_buffer(mm, DB_REQ_SEQ)
        self.ans = ctypes.c_uint32.from_buffer(mm, DB_ANS_SEQ)
        self.events = ctypes.c_uint32.from_buffer(mm, DB_EVENTS)
        self.sleeps = ctypes.c_uint32.from_buffer(mm, DB_WORKER_SLEEPS)
        # Taken and released only as a store-load fence (see `ring`): a lock of its
        # own, so it is never contended.
        self.fence = threading.Lock()
        self.in_progress = ctypes.c_uint64.from_buffer(mm, DB_REQ_PROGRESS)
        self.out_progress = ctypes.c_uint64.from_buffer(mm, DB_ANS_PROGRESS)
        self.ans_addr = ctypes.addressof(self.ans)
        self.events_addr = ctypes.addressof(self.events)

    def ring(self) -> None:
        """Tell the worker something was posted (a doorbell request's whole input, or a
        frame): bump the events word, and wake it if it may be asleep.

        The worker raises its sleeps word, fences, then reads `events` before it sleeps
        (serve.rs `sleep_on_events`); here the bump must be visible before the sleeps
        word is read, which x86-64 does not promise for a store and a later load.
        Taking a lock is a locked read-modify-write there (a full fence), so with one
        in between either this side sees the flag and wakes, or the worker sees the
        bump. A polling worker (the common case between quick requests) then costs no
        system call, about 3 µs of each round trip on a VM. Elsewhere a lock is no
        such fence, so the worker is always woken."""
        self.events.value = (self.events.value + 1) & 0xFFFFFFFF
        if DOORBELL_OK:
            with self.fence:
                pass
            if not self.sleeps.value:
                return
        _futex.wake(self.events_addr)


# ------------------------------------------------------------------ binary lookup


def find_worker_binary(explicit: str | os.PathLike[str] | None = None) -> Path:
    """`explicit`, then $ENNCLAVE_WORKER, then the installed scripts dir, then the
    development build `enclave/target/release/`, then $PATH."""
    candidates: list[tuple[str, Path]] = []
    if explicit:
        candidates.append(("the given path", Path(explicit)))
    env = os.environ.get("ENNCLAVE_WORKER")
    if env:
        candidates.append(("ENNCLAVE_WORKER", Path(env)))
        # An explicit setting that is wrong is an error, not a reason to fall back.
        if not (Path(env).is_file() and os.access(env, os.X_OK)):
            raise WorkerNotFound(
                f"ENNCLAVE_WORKER points to {env}, which is not an executable file; "
                "fix or unset it."
            )
    scripts = sysconfig.get_path("scripts")
    if scripts:
        candidates.append(("scripts", Path(scripts) / BINARY_NAME))
    repo = Path(__file__).resolve().parents[3]
    candidates.append(("development build", repo / "enclave" / "target" / "release" / BINARY_NAME))
    on_path = shutil.which(BINARY_NAME)
    if on_path:
        candidates.append(("PATH", Path(on_path)))
    for _, p in candidates:
        if p.is_file() and os.access(p, os.X_OK):
            return p
    raise WorkerNotFound(
        f"The enclave worker {BINARY_NAME} was not found; install ennclave with its worker "
        "(pip install ennclave), build it with `cargo build-worker` in enclave/, or set "
        "ENNCLAVE_WORKER to its path."
    )


# ------------------------------------------------------------------ key release


@dataclass(frozen=True)
class Hello:
    version: int
    pubkey: bytes
    binary_sha256: str
    secmem: str
    # Where the worker says it runs: native, gramine-direct or gramine-sgx.
    platform: str = "native"


@dataclass(frozen=True)
class Evidence:
    """The worker's EVIDENCE answer to one challenge: `kind` ("none" for software
    evidence), its `report`, and `protections`, the canonical JSON of what protects its
    secrets (docs/key-release.md "Protections"), which the report's hash covers."""

    kind: str
    report: bytes
    protections: bytes

    def protections_dict(self) -> dict[str, Any]:
        return json.loads(self.protections)


PLATFORMS = ("native", "gramine-direct", "gramine-sgx")


KeyRelease = Callable[[Hello], WrappedKey | CachedKey]
"""Called once per worker start with its HELLO. May call `WorkerClient.evidence_for`
(during this call only). If it has a `store_key_cache(key_id, blob)` method, that gets
the worker's KEY_CACHE frames (offline licences)."""


def local_key_release(keystore: Any, key_id: str) -> KeyRelease:
    """`key_source: "local"`: the host reads the key from the owner's keystore and wraps
    it to the worker's ephemeral key itself (the host sees the key)."""

    def release(hello: Hello) -> WrappedKey:
        key = keystore.get(key_id)
        try:
            return wrap_data_key(hello.pubkey, key, key_id)
        finally:
            del key

    return release


# ------------------------------------------------------------------ framing


def _frame(ty: int, payload: bytes = b"") -> bytes:
    return _HDR.pack(1 + len(payload), ty) + payload


def _b(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


class _Reader:
    def __init__(self, payload: bytes) -> None:
        self.p, self.i = payload, 0

    def take(self, n: int) -> bytes:
        if self.i + n > len(self.p):
            raise WorkerError(
                "The enclave worker sent a truncated frame; this is a bug.", E_PROTOCOL
            )
        v = self.p[self.i : self.i + n]
        self.i += n
        return v

    def u(self, fmt: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def bytes_(self) -> bytes:
        return self.take(self.u("<I"))

    def str_(self) -> str:
        return self.bytes_().decode("utf-8", "replace")


@dataclass(frozen=True)
class Ready:
    max_batch: int
    in_len: int
    out_len: int
    in_offset: int
    out_offset: int
    secmem: str
    policy: str


def _pack_inputs(xs: list[np.ndarray] | tuple[np.ndarray, ...]) -> np.ndarray:
    """Several program inputs as the worker takes them: `(batch, sum of values per
    sample)`, each sample's first input, then its second, ... (float32)."""
    arrs = [np.asarray(a) for a in xs]
    if not arrs or any(a.ndim == 0 for a in arrs):
        raise InputError("The input batch is empty; pass at least one sample.")
    sizes = [a.shape[0] for a in arrs]
    if len(set(sizes)) > 1:
        raise InputError(
            f"The private inputs have different batch sizes {sizes}; pass the same number "
            "of samples for every input."
        )
    return np.concatenate([a.reshape(sizes[0], -1).astype(np.float32) for a in arrs], axis=1)


def _shm_size(in_len: int, out_len: int, max_batch: int) -> int:
    per_sample = (in_len + out_len) * 4
    want = per_sample * max_batch + 4096
    size = min(max(want, 4 << 20), 64 << 20)
    size = max(size, per_sample + 4096)
    return (size + 4095) // 4096 * 4096


class WorkerClient:
    """One enclave worker process serving one bundle's private part.

    `manifest_bytes`: manifest.json exactly as stored (the worker authenticates it).
    `sealed_path`: private.sealed. `key_release(hello) -> WrappedKey` releases the data
    key for the worker's ephemeral key (see `local_key_release`).

    Requests go through the shared region's doorbell (docs/worker-protocol.md) where
    the platform allows it (x86-64); `doorbell=False` sends INFER frames instead.
    `idle_check_ms`: how long an idle worker sleeps before it checks that the host is
    still there. `spin_us`: how long an idle worker polls before it sleeps (None: the
    worker's default, 200 µs; 0 makes it sleep between every two requests; native
    only).
    """

    def __init__(
        self,
        manifest_bytes: bytes,
        sealed_path: str | os.PathLike[str],
        key_release: KeyRelease,
        *,
        binary: str | os.PathLike[str] | None = None,
        threads: int = 0,
        max_batch: int = 256,
        shm_bytes: int | None = None,
        in_len: int | None = None,
        out_len: int | None = None,
        handshake_timeout: float = 300.0,
        call_timeout: float | None = DEFAULT_CALL_TIMEOUT_S,
        doorbell: bool | None = None,
        idle_check_ms: int = 100,
        spin_us: int | None = None,
        platform: str = "native",
        gramine_dir: str | os.PathLike[str] | None = None,
        evidence: str = "software",
        start: bool = True,
    ) -> None:
        if platform not in PLATFORMS:
            raise ValueError(f"platform must be one of {', '.join(PLATFORMS)}, not {platform!r}")
        if evidence not in ("software", "tsm"):
            raise ValueError(f"evidence must be software or tsm, not {evidence!r}")
        # "tsm": inside a TDX / SEV-SNP / CCA confidential VM the worker answers the key
        # server's challenge with a hardware report from configfs-tsm (untested here).
        if evidence == "tsm" and not Path(TSM_ROOT).is_dir():
            raise EnnclaveError(
                f"evidence='tsm' needs Linux configfs-tsm ({TSM_ROOT}) inside a TDX, SEV-SNP "
                "or CCA confidential VM; this machine has none, so use software evidence."
            )
        self._evidence_source = evidence
        self._platform = platform
        self._gramine_dir = Path(gramine_dir) if gramine_dir else None
        self._shm_path: str | None = None
        self._manifest = bytes(manifest_bytes)
        self._sealed_path = Path(sealed_path)
        self._key_release = key_release
        self._binary = find_worker_binary(binary)
        self._threads = int(threads)
        self._max_batch = int(max_batch)
        self._shm_bytes = shm_bytes or _shm_size(in_len or 1, out_len or 1, self._max_batch)
        self._handshake_timeout = handshake_timeout
        self._call_timeout = call_timeout if call_timeout and call_timeout > 0 else None
        # None: the doorbell where the platform allows it; False: INFER frames only.
        self._use_doorbell = DOORBELL_OK if doorbell is None else bool(doorbell) and DOORBELL_OK
        # Gramine has no futex shared with the host: requests go as INFER frames there.
        self._ring = platform == "native"
        if not self._ring:
            self._use_doorbell = False
        self._idle_check_ms = int(idle_check_ms)
        self._spin_args = [] if spin_us is None else ["--spin-us", str(int(spin_us))]
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._mm: mmap.mmap | None = None
        self._stderr: Any = None
        self._ready: Ready | None = None
        # Per-start caches for the hot path (set after READY, dropped in _teardown).
        self._shm_in: np.ndarray | None = None
        self._shm_out: np.ndarray | None = None
        self._shm_out_flat: np.ndarray | None = None
        self._shm_in_flat: np.ndarray | None = None
        self._db: _Doorbell | None = None
        self._seq = 0  # the last doorbell request's sequence number
        self._rx = bytearray(4096)  # receive buffer; _rx[_rx_start:_rx_end] is unread
        self._rx_start = self._rx_end = 0
        self._last_answer_s = 0.0  # how long the last INFER took to answer
        self._answered_at = 0.0  # perf_counter() of the last answer
        self.hello: Hello | None = None
        # What protects the worker's secrets, from its evidence (docs/key-release.md).
        self.protections: dict[str, Any] | None = None
        self._in_key_release = False
        self.restarts = 0
        self._closed = False
        self._finalizer = weakref.finalize(self, WorkerClient._kill_quietly, [None])
        if start:
            with self._lock:
                self._start()

    # -- lifecycle ----------------------------------------------------------------

    @staticmethod
    def _kill_quietly(holder: list[Any]) -> None:
        proc = holder[0]
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                proc.kill()
                proc.wait(timeout=5)

    def _start(self) -> None:
        if self._closed:
            raise EnnclaveError("This enclaved model is closed; load the bundle again.")
        kernel = os.environ.get("ENNCLAVE_KERNEL")
        if kernel is not None and kernel not in KERNEL_FAMILIES:
            raise InputError(
                f"ENNCLAVE_KERNEL must be one of {', '.join(KERNEL_FAMILIES)}, got {kernel!r}; "
                "unset it to use the best kernels this CPU has."
            )
        if self._platform != "native":
            self._start_gramine()
            return
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        memfd = os.memfd_create("ennclave-shm", os.MFD_CLOEXEC)
        try:
            os.ftruncate(memfd, self._shm_bytes)
            self._mm = mmap.mmap(memfd, self._shm_bytes, mmap.MAP_SHARED)
            self._stderr = tempfile.TemporaryFile()
            argv = [
                str(self._binary),
                "--ctl-fd",
                str(child.fileno()),
                "--shm-fd",
                str(memfd),
                "--max-batch",
                str(self._max_batch),
                "--threads",
                str(self._threads),
                "--idle-check-ms",
                str(self._idle_check_ms),
                *self._spin_args,
                *(["--evidence", "tsm"] if self._evidence_source == "tsm" else []),
            ]
            try:
                self._proc = subprocess.Popen(
                    argv,
                    pass_fds=(child.fileno(), memfd),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=self._stderr,
                    close_fds=True,
                    env={k: v for k, v in os.environ.items() if k in _WORKER_ENV},
                )
            except OSError as e:
                raise WorkerNotFound(
                    f"The enclave worker {self._binary} could not be started ({e.strerror}); "
                    "reinstall ennclave or set ENNCLAVE_WORKER."
                ) from None
        finally:
            child.close()
            os.close(memfd)
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, WorkerClient._kill_quietly, [self._proc])
        self._sock = parent
        self._handshake_or_teardown()

    def _handshake_or_teardown(self) -> None:
        try:
            self._handshake()
        except _Dead:
            raise self._crashed("start-up") from None
        except BaseException:
            self._teardown(kill=True)
            raise

    def _start_gramine(self) -> None:
        """Start the worker under gramine-direct or gramine-sgx (docs/platforms.md):
        a /dev/shm file for tensors, a listening socket on 127.0.0.1 for control
        frames, and a one-time token on the worker's stdin, which the worker sends
        first: the host accepts only the connection that carries it."""
        from . import gramine

        launcher = "gramine-sgx" if self._platform == "gramine-sgx" else "gramine-direct"
        if launcher == "gramine-sgx" and not gramine.SGX_DEVICE.exists():
            raise WorkerError(
                f"gramine-sgx needs an SGX machine, and this one has no {gramine.SGX_DEVICE}; "
                "use platform gramine-direct (no protection) or native.",
                E_SANDBOX,
                True,
            )
        exe = gramine.need_tool(launcher)
        gdir = self._gramine_dir or gramine.manifest_dir_for(self._binary)
        if launcher == "gramine-sgx" and not (gdir / (gramine.MANIFEST + ".sgx")).is_file():
            gramine.sign(gdir)
        token = secrets.token_bytes(32)
        self._shm_path = f"/dev/shm/ennclave-{os.getpid()}-{secrets.token_hex(8)}"
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            fd = os.open(self._shm_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, self._shm_bytes)
                self._mm = mmap.mmap(fd, self._shm_bytes, mmap.MAP_SHARED)
            finally:
                os.close(fd)
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(4)
            port = lsock.getsockname()[1]
            self._stderr = tempfile.TemporaryFile()
            argv = [
                str(exe),
                BINARY_NAME,
                "--platform",
                "gramine",
                "--ctl-port",
                str(port),
                "--shm-path",
                self._shm_path,
                "--shm-bytes",
                str(self._shm_bytes),
                "--max-batch",
                str(self._max_batch),
                "--threads",
                # SGX has a fixed number of thread slots (the manifest's max_threads).
                str(self._threads or min(os.cpu_count() or 1, gramine.WORKER_THREADS_MAX)),
                "--idle-check-ms",
                str(self._idle_check_ms),
            ]
            try:
                self._proc = subprocess.Popen(
                    argv,
                    cwd=gdir,
                    stdin=subprocess.PIPE,
                    # Gramine v1.9 hands the application's stderr to the host's stdout
                    # (measured): both go to the file the crash report reads.
                    stdout=self._stderr,
                    stderr=self._stderr,
                    close_fds=True,
                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                )
            except OSError as e:
                raise WorkerNotFound(
                    f"{exe} could not be started ({e.strerror}); check the Gramine install."
                ) from None
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, WorkerClient._kill_quietly, [self._proc])
            assert self._proc.stdin is not None
            with contextlib.suppress(OSError):
                self._proc.stdin.write(token.hex().encode())
                self._proc.stdin.close()
            try:
                self._sock = self._accept_worker(lsock, token)
            except _Dead:
                raise self._crashed("start-up") from None
        except BaseException:
            if self._proc is not None or self._mm is not None:
                self._teardown(kill=True)
            raise
        finally:
            lsock.close()
            self._unlink_shm()  # the worker has mapped it (or is gone)
        self._handshake_or_teardown()

    def _accept_worker(self, lsock: socket.socket, token: bytes) -> socket.socket:
        """The first connection on `lsock` that sends `token`; others are dropped."""
        deadline = time.monotonic() + self._handshake_timeout
        lsock.settimeout(0.1)
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise _Dead()
            if time.monotonic() > deadline:
                raise WorkerError(
                    "The enclave worker under Gramine did not connect in time.", E_INTERNAL, True
                )
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                continue
            try:
                conn.settimeout(5.0)
                got = b""
                while len(got) < len(token):
                    part = conn.recv(len(token) - len(got))
                    if not part:
                        break
                    got += part
            except OSError:
                got = b""
            if hmac.compare_digest(got, token):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return conn
            conn.close()

    def _unlink_shm(self) -> None:
        path, self._shm_path = self._shm_path, None
        if path:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _handshake(self) -> None:
        assert self._sock is not None and self._mm is not None
        self._sock.settimeout(self._handshake_timeout)
        ty, p = self._recv()
        if ty != HELLO:
            raise self._unexpected(ty, p, "HELLO")
        r = _Reader(p)
        version = r.u("<I")
        # The version first: an older worker's HELLO may not parse as this one's.
        if version != PROTOCOL_VERSION:
            raise WorkerError(
                f"The enclave worker speaks protocol {version}, this ennclave speaks "
                f"{PROTOCOL_VERSION}; reinstall ennclave so both match.",
                E_PROTOCOL,
                True,
            )
        pubkey = r.take(32)
        binsha = r.take(32).hex()
        secmem = r.str_()
        reported = r.str_() if r.i < len(r.p) else "native"
        if reported != self._platform:
            raise WorkerError(
                f"The enclave worker runs on {reported}, not on the {self._platform} asked for; "
                "check the Gramine install and the worker binary.",
                E_PROTOCOL,
                True,
            )
        self.hello = Hello(version, pubkey, binsha, secmem, reported)
        # The manifest before the first challenge: whether it allows unlocked memory
        # decides what the worker can promise in its protections (secmem::commit).
        self._send(_frame(MANIFEST, _b(self._manifest)))
        # SEALED_BEGIN at once: the worker allocates the plaintext's secret buffer and
        # starts faulting its pages in (the slowest part of a start: each fresh
        # memfd_secret page costs a TLB-flush IPI), which then overlaps the evidence
        # round trip as well as the transfer and the key release.
        total = self._sealed_path.stat().st_size
        self._send(_frame(SEALED_BEGIN, struct.pack("<Q", total)))

        # Freshness/evidence round trip (a key server checks this; locally we only
        # check that the worker answers for the key it announced).
        nonce = secrets.token_bytes(32)
        got = self._evidence(nonce)
        kind, report = got.kind, got.report
        expect = evidence_hash(nonce, pubkey, bytes.fromhex(binsha), got.protections)
        if kind == "sgx-dcap-v3" and self._platform == "gramine-sgx":  # untested on SGX
            report = _sgx_report_data(report)[:32] if _sgx_binds(report, expect) else b""
        if self._evidence_source == "tsm" and kind in ("tdx-dcap", "sev-snp", "cca"):
            # A confidential VM's report (untested on hardware): the key server verifies
            # it; here only that it carries this handshake's hash in its REPORT_DATA.
            report = expect if expect in report else b""
        if report != expect:
            raise WorkerError(
                "The enclave worker's evidence does not match; reinstall ennclave.",
                E_PROTOCOL,
                True,
            )
        self.protections = got.protections_dict()

        chunk = len(self._mm)
        sent = 0
        with open(self._sealed_path, "rb") as f:
            while sent < total:
                n = f.readinto(memoryview(self._mm)[: min(chunk, total - sent)])
                if not n:
                    raise BundleError(
                        f"{self._sealed_path} changed size while being read; try again."
                    )
                self._send(_frame(SEALED_CHUNK, struct.pack("<I", n)))
                ty, p = self._recv()
                if ty != CHUNK_OK:
                    raise self._unexpected(ty, p, "CHUNK_OK")
                sent += n
        self._in_key_release = True
        try:
            wk = self._key_release(self.hello)
        finally:
            self._in_key_release = False
        if isinstance(wk, CachedKey):
            self._send(_frame(CACHED_KEY, _b(wk.key_id.encode()) + _b(wk.blob)))
        else:
            if wk.licence is not None:
                if wk.licence_mac is None or len(wk.licence_mac) != 32:
                    raise LicenceError(
                        "The key server's licence MAC is malformed; try again.", E_LICENCE_INVALID
                    )
                self._send(_frame(LICENCE, _b(wk.licence) + wk.licence_mac))
            self._send(_frame(KEY, _b(wk.key_id.encode()) + wk.enc + _b(wk.wrapped)))
        del wk
        ty, p = self._recv()
        while ty == KEY_CACHE:  # offline licence: the worker's sealed key cache
            r = _Reader(p)
            kid, blob = r.str_(), r.bytes_()
            keep = getattr(self._key_release, "store_key_cache", None)
            if keep is not None:
                with contextlib.suppress(OSError):  # a cache that cannot be written is no cache
                    keep(kid, blob)
            ty, p = self._recv()
        if ty != READY:
            raise self._unexpected(ty, p, "READY")
        r = _Reader(p)
        self._ready = Ready(
            r.u("<I"), r.u("<I"), r.u("<I"), r.u("<Q"), r.u("<Q"), r.str_(), r.str_()
        )
        rd = self._ready
        if (
            rd.out_offset + rd.max_batch * rd.out_len * 4 > len(self._mm)
            or rd.max_batch < 1
            or rd.in_offset < DB_EVENTS + 4
        ):
            raise WorkerError(
                "The enclave worker announced an invalid shared-memory layout.", E_PROTOCOL, True
            )
        self._shm_in = np.ndarray((rd.max_batch, rd.in_len), np.float32, self._mm, rd.in_offset)
        self._shm_out = np.ndarray((rd.max_batch, rd.out_len), np.float32, self._mm, rd.out_offset)
        self._shm_out_flat = self._shm_out.reshape(-1)
        self._shm_in_flat = self._shm_in.reshape(-1)
        self._db = _Doorbell(self._mm)
        self._seq = 0
        # A stopped or wedged worker fails the call (and is replaced) after the deadline.
        self._sock.settimeout(self._call_timeout)

    def _teardown(self, kill: bool) -> int | None:
        proc, self._proc = self._proc, None
        rc = None
        if proc is not None:
            if kill and proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.kill()
            try:
                rc = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._rx_start = self._rx_end = 0
        # Release the mmap's exports before closing it.
        self._shm_in = self._shm_out = self._shm_in_flat = self._shm_out_flat = None
        self._db = None
        if self._mm is not None:
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        self._unlink_shm()
        self._ready = None
        self._finalizer.detach()
        return rc

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        with contextlib.suppress(OSError, ValueError):
            self._stderr.seek(0)
            text = self._stderr.read()[-2000:].decode("utf-8", "replace").strip()
            return text.splitlines()[-1] if text else ""
        return ""

    def _crashed(self, during: str) -> WorkerCrashed:
        pid = self._proc.pid if self._proc else None
        tail = self._stderr_tail()
        rc = self._teardown(kill=True)
        how = "was killed by the host"
        if rc is not None and rc < 0:
            try:
                how = f"was killed by {signal.Signals(-rc).name}"
            except ValueError:
                how = f"was killed by signal {-rc}"
        elif rc is not None:
            how = f"exited with status {rc}"
        detail = f" ({tail})" if tail else ""
        return WorkerCrashed(
            f"The enclave worker (pid {pid}) {how} during {during}{detail}; "
            "the next call starts a fresh worker.",
            E_INTERNAL,
            True,
        )

    def _ensure(self) -> Ready:
        if self._closed:
            raise EnnclaveError("This enclaved model is closed; load the bundle again.")
        # Died between calls (OOM killer, a signal): report it once; the next call
        # starts a fresh worker. Not asked within 10 ms of an answer (it costs a system
        # call per request): a worker that dies then fails the request itself.
        if (
            self._proc is not None
            and time.perf_counter() - self._answered_at > 0.01
            and self._proc.poll() is not None
        ):
            raise self._crashed("idle time")
        if self._proc is None or self._ready is None:
            if self._proc is not None:
                self._teardown(kill=True)
            self.restarts += 1
            self._start()
        assert self._ready is not None
        return self._ready

    def _evidence(self, nonce: bytes) -> Evidence:
        self._send(_frame(CHALLENGE, nonce))
        ty, p = self._recv()
        if ty != EVIDENCE:
            raise self._unexpected(ty, p, "EVIDENCE")
        r = _Reader(p)
        got, kind, report, protections = r.take(32), r.str_(), r.bytes_(), r.bytes_()
        if got != nonce:
            raise WorkerError(
                "The enclave worker answered a different challenge; this is a bug.",
                E_PROTOCOL,
                True,
            )
        try:
            if not isinstance(json.loads(protections), dict):
                raise ValueError
        except ValueError:
            raise WorkerError(
                "The enclave worker's protections are not a JSON object; reinstall ennclave.",
                E_PROTOCOL,
                True,
            ) from None
        return Evidence(kind, report, protections)

    def evidence_for(self, nonce: bytes) -> Evidence:
        """Send CHALLENGE{nonce} to the worker and return its EVIDENCE (kind, report and
        the protections the report binds).

        Only while the key release runs (from inside the `key_release` callback during
        start-up): that is when a key server's nonce must be answered."""
        nonce = bytes(nonce)
        if len(nonce) != 32:
            raise ValueError("the challenge nonce must be 32 bytes")
        with self._lock:
            if not self._in_key_release or self._sock is None:
                raise EnnclaveError(
                    "WorkerClient.evidence_for() works only during the worker's key release "
                    "(inside the key_release callback)."
                )
            return self._evidence(nonce)

    # -- frames -------------------------------------------------------------------

    def _send(self, frame: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(frame)
        except OSError:
            raise _Dead() from None
        if self._db is not None and self._ring:  # serving: the idle worker sleeps on the doorbell
            self._db.ring()

    def _fill(self, need: int, spin_s: float = 0.0) -> None:
        """Receive until `need` unread bytes are buffered (usually one recv_into for a
        whole small frame). For the first `spin_s` seconds the socket is polled without
        blocking, yielding the core between tries: when the answer is due soon this
        skips the cost of sleeping and being woken."""
        assert self._sock is not None
        rx = self._rx
        if self._rx_start + need > len(rx):
            unread = rx[self._rx_start : self._rx_end]
            if need > len(rx):
                rx = self._rx = bytearray(need)
            rx[: len(unread)] = unread
            self._rx_start, self._rx_end = 0, len(unread)
        view = memoryview(rx)
        polling, spin_until = spin_s > 0, time.perf_counter() + spin_s
        try:
            while self._rx_end - self._rx_start < need:
                flags = socket.MSG_DONTWAIT if polling else 0
                try:
                    got = self._sock.recv_into(view[self._rx_end :], 0, flags)
                except BlockingIOError:  # polling, nothing yet
                    # The worker's threads may need this core more than we do.
                    os.sched_yield()
                    polling = time.perf_counter() < spin_until  # then block
                    continue
                except TimeoutError:
                    raise self._late() from None
                except OSError:
                    raise _Dead() from None
                if not got:
                    raise _Dead()
                self._rx_end += got
        finally:
            view.release()

    def _recv(self, spin_s: float = 0.0) -> tuple[int, bytes]:
        if self._rx_end - self._rx_start < 4:
            self._fill(4, spin_s)
        (n,) = _U32.unpack_from(self._rx, self._rx_start)
        if n < 1 or n > MAX_FRAME:
            raise WorkerError(
                "The enclave worker sent an invalid frame; this is a bug.", E_PROTOCOL, True
            )
        if self._rx_end - self._rx_start < 4 + n:
            self._fill(4 + n)
        i = self._rx_start + 4
        ty, body = self._rx[i], bytes(self._rx[i + 1 : i + n])
        self._rx_start = i + n
        if self._rx_start == self._rx_end:
            self._rx_start = self._rx_end = 0
        return ty, body

    def _unexpected(self, ty: int, payload: bytes, wanted: str) -> EnnclaveError:
        if ty == ERROR:
            return self._error(payload)
        return WorkerError(
            f"The enclave worker sent message 0x{ty:02x} where {wanted} was expected; this is a bug.",
            E_PROTOCOL,
            True,
        )

    def _error(self, payload: bytes) -> EnnclaveError:
        r = _Reader(payload)
        code, fatal, msg = r.u("<H"), bool(r.u("<B")), r.str_()
        msg = msg[:1].upper() + msg[1:]
        if not msg.endswith("."):
            msg += "."
        if code == E_AUTH:
            return AuthenticationError(
                "The sealed program did not authenticate inside the enclave: the data key is "
                "wrong, or manifest.json or private.sealed was modified after sealing; get an "
                "intact bundle and the matching key from the model owner."
            )
        if code == E_KEY:
            return AuthenticationError(
                f"{msg[:-1]}; check that the keystore holds this bundle's key."
            )
        if code in (E_BAD_INPUT_SIZE, E_NONFINITE):
            return InputError(msg)
        if code == E_BUDGET:
            new = "licence" if "licence" in msg else "bundle"
            return QueryBudgetExhausted(
                f"{msg[:-1]}; ask the model owner for a new {new}.", code, fatal
            )
        if code == E_LICENCE_EXPIRED:
            return LicenceError(msg, code, fatal)
        if code == E_LICENCE_INVALID:
            return LicenceError(
                f"The enclave worker refused the key server's licence: {msg[:1].lower()}{msg[1:-1]}; "
                "load the bundle again while the key server can be reached, or ask the model owner.",
                code,
                fatal,
            )
        if code in (E_MANIFEST, E_PROGRAM):
            return BundleError(
                f"{msg[:-1]}; the bundle is unusable, get a fresh one from the owner."
            )
        return WorkerError(msg, code, fatal)

    # -- API ----------------------------------------------------------------------

    def _late(self) -> WorkerError:
        """The call's deadline passed (a stopped or wedged worker): fatal, so the worker
        is killed and the next call starts a fresh one."""
        return WorkerError(
            f"The enclave worker did not answer within {self._call_timeout:g} s (it may have "
            "been stopped); it was replaced, so try again, or pass a longer timeout to "
            "ennclave.load(..., timeout=S).",
            E_INTERNAL,
            True,
        )

    @property
    def pid(self) -> int | None:
        # No lock: a call stuck on a stopped worker must not make this block too.
        proc = self._proc
        return proc.pid if proc is not None else None

    @property
    def ready(self) -> Ready:
        with self._lock:
            return self._ensure()

    def start(self) -> None:
        with self._lock:
            self._call(lambda: self._ensure(), "start-up")

    def _call(self, fn: Callable[..., Any], during: str, *args: Any) -> Any:
        try:
            return fn(*args)
        except _Dead:
            raise self._crashed(during) from None
        except WorkerError as e:
            if e.fatal:
                self._teardown(kill=True)
            raise
        except EnnclaveError:
            raise
        except BaseException:
            # Anything else (KeyboardInterrupt mid-frame…) leaves the stream in an
            # unknown state: drop the worker; the next call starts a fresh one.
            self._teardown(kill=True)
            raise

    def infer(
        self,
        x: np.ndarray | list[np.ndarray],
        *,
        allow_nonfinite: bool = False,
        poll: bool = True,
    ) -> np.ndarray:
        """Run the private part on `x` (batch first; any trailing shape with the right
        number of values). Returns float32 `(batch, out_len)` after the output policy.
        Batches larger than the shared-memory region are streamed in chunks. A program
        of several inputs takes a list of arrays in its input order, all of one batch:
        they travel packed per sample (docs/worker-protocol.md).

        `poll=False` always sleeps until the answer instead of polling for a fast one:
        for callers with other Python threads at work (a polling thread keeps taking
        the GIL back from them)."""
        with self._lock:
            return self._call(self._infer, "inference", x, allow_nonfinite, poll)

    def _infer(self, x: np.ndarray, allow_nonfinite: bool, poll: bool) -> np.ndarray:
        # A start-up failure after a crash is a start-up error, not an inference one.
        rd = self._ensure()
        if isinstance(x, (list, tuple)):
            x = _pack_inputs(x)
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = x.shape[0] if x.ndim else 0
        if n == 0:
            raise InputError("The input batch is empty; pass at least one sample.")
        in_len, out_len = rd.in_len, rd.out_len
        if x.size != n * in_len:
            raise InputError(
                f"Each sample must have {in_len} values for the private part, got {x.size // n}."
            )
        # Flat views throughout: every reshape or slice costs a fraction of a µs, and
        # a batch-1 round trip is only a few µs more than the copies.
        flat_in = x.reshape(-1)
        flat_out = np.empty(n * out_len, dtype=np.float32)
        flags = INFER_ALLOW_NONFINITE if allow_nonfinite else 0
        db = self._db if self._use_doorbell else None
        for s in range(0, n, rd.max_batch):
            b = min(rd.max_batch, n - s)
            whole = b == n  # one request: no slices
            src = flat_in if whole else flat_in[s * in_len : (s + b) * in_len]
            dst = flat_out if whole else flat_out[s * out_len : (s + b) * out_len]
            # Spin for the answer only when the last one came within the spin window;
            # a longer computation would just lose a core to the spinning host.
            spin = SPIN_S if poll and self._last_answer_s < SPIN_S else 0.0
            t = time.perf_counter()
            if db is not None:  # copies in and out itself, alongside the worker
                got_b, got_len = self._doorbell(db, src, b, flags, spin, dst)
            else:
                assert self._shm_in_flat is not None and self._shm_out_flat is not None
                self._shm_in_flat[: src.size] = src
                self._send(_INFER.pack(9, INFER, b, flags))
                ty, p = self._recv(spin)
                if ty != RESULT:
                    raise self._unexpected(ty, p, "RESULT")
                got_b, got_len = _RESULT_HEAD.unpack_from(p)
            self._answered_at = time.perf_counter()
            self._last_answer_s = self._answered_at - t
            if got_b != b or got_len != out_len:
                raise WorkerError(
                    "The enclave worker answered for the wrong batch; this is a bug.",
                    E_PROTOCOL,
                    True,
                )
            if db is None:
                dst[:] = self._shm_out_flat[: dst.size]
        return flat_out.reshape(n, out_len)

    def _doorbell(
        self,
        db: _Doorbell,
        flat_in: np.ndarray,
        batch: int,
        flags: int,
        spin_s: float,
        dst: np.ndarray,
    ) -> tuple[int, int]:
        """Post one INFER of `batch` samples, `flat_in` their values, on the doorbell;
        then copy the input in chunk by chunk (the worker copies each chunk as it
        lands), wait for the answer and copy its output into the flat `dst` (batch ×
        out_len floats). For the first `spin_s` seconds the answer word is polled and
        the output copied chunk by chunk while the worker still writes the rest; then
        the host sleeps on the answer word. Returns the answer's (batch, out_len)."""
        mm, src, shm_in = self._mm, self._shm_out_flat, self._shm_in_flat
        assert mm is not None and src is not None and shm_in is not None
        seq = self._seq = (self._seq + 1) & 0xFFFFFFFF
        _DB_REQ.pack_into(mm, DB_REQ_BATCH, batch, flags)
        db.req.value = seq  # after the fields (x86-64 keeps stores in order)
        size, in_progress = flat_in.size, db.in_progress
        if size <= _IN_CHUNK:
            shm_in[:size] = flat_in
            in_progress.value = seq << 32 | size
        else:
            for a in range(0, size, _IN_CHUNK):
                e = min(a + _IN_CHUNK, size)
                shm_in[a:e] = flat_in[a:e]
                in_progress.value = seq << 32 | e  # after the chunk
        db.ring()  # the whole input is in place
        ans, progress = db.ans, db.out_progress
        total, done = dst.size, 0
        if spin_s > 0:
            now = time.perf_counter()
            # Without yielding only while a quick answer is expected: a computation
            # needs every core, and a host holding one slows it more than it gains.
            hot = now + (HOT_SPIN_S if self._last_answer_s < HOT_SPIN_S else 0.0)
            until = now + spin_s
            while ans.value != seq:
                p = progress.value
                if p >> 32 == seq and (ready := min(p & 0xFFFFFFFF, total)) > done:
                    dst[done:ready] = src[done:ready]  # while the worker writes the rest
                    done = ready
                    continue
                if (now := time.perf_counter()) >= until:
                    break
                if now >= hot:
                    os.sched_yield()  # the worker's threads may need this core more
        deadline = time.monotonic() + self._call_timeout if self._call_timeout else None
        while (seen := ans.value) != seq:
            _futex.wait(db.ans_addr, seen, _LIVENESS_CHECK_S)
            if ans.value != seq and self._proc is not None and self._proc.poll() is not None:
                raise _Dead()
            if deadline is not None and ans.value != seq and time.monotonic() > deadline:
                raise self._late()
        status, got_b, got_len, _left = _DB_ANS.unpack_from(mm, DB_ANS_STATUS)
        if status != DB_STATUS_OK:  # the ERROR frame is already on the socket
            ty, p = self._recv()
            raise self._unexpected(ty, p, "RESULT")
        if done < total:
            dst[done:] = src[done:total]
        return got_b, got_len

    def ping(self) -> dict[str, int]:
        """Health check: round trip through the worker. Returns {"queries_used": n}."""
        with self._lock:

            def go() -> dict[str, int]:
                self._ensure()
                nonce = secrets.randbits(63)
                self._send(_frame(PING, struct.pack("<Q", nonce)))
                ty, p = self._recv(SPIN_S)
                if ty != PONG:
                    raise self._unexpected(ty, p, "PONG")
                got, used = struct.unpack("<QQ", p)
                if got != nonce:
                    raise WorkerError(
                        "The enclave worker answered a different ping; this is a bug.",
                        E_PROTOCOL,
                        True,
                    )
                return {"queries_used": used}

            return self._call(go, "a health check")

    def _stop(self, timeout: float) -> None:
        """Ask the worker to exit (SHUTDOWN → [USAGE] → BYE), hand a metered licence's
        usage report to the key release (`report_usage`: the key server credits back
        what the slice did not use; the worker answers nothing after it), then reap it."""
        usage: tuple[bytes, bytes] | None = None
        if self._proc is not None and self._proc.poll() is None and self._sock is not None:
            with contextlib.suppress(Exception):
                self._sock.settimeout(timeout)
                self._send(_frame(SHUTDOWN))
                ty, p = self._recv()
                if ty == USAGE:
                    r = _Reader(p)
                    usage = (r.bytes_(), r.take(32))
                    self._recv()  # BYE
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=timeout)
        self._teardown(kill=True)
        report = getattr(self._key_release, "report_usage", None)
        if usage is not None and report is not None:
            with contextlib.suppress(Exception):  # never fails a close: kept pending instead
                report(*usage)

    def restart(self, timeout: float = 5.0) -> None:
        """Stop the worker in order (its usage report goes to the key release) and
        start a fresh one: a new key release, so a new licence (a metered key's next
        slice)."""
        with self._lock:
            if self._closed:
                raise EnnclaveError("This enclaved model is closed; load the bundle again.")
            self._stop(timeout)
            self.restarts += 1
            self._call(self._start, "start-up")

    def close(self, timeout: float = 5.0) -> None:
        """Ask the worker to exit (`_stop`), then reap it. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop(timeout)

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"WorkerClient(binary={str(self._binary)!r}, pid={self.pid})"


def _sgx_report_data(quote: bytes) -> bytes:
    """The REPORT_DATA of an SGX quote (no signature check: the key server verifies the
    quote; the host only checks the binding). Untested on SGX hardware."""
    from ..attest import dcap

    return bytes(
        dcap.EnclaveReport.parse(dcap.parse_quote(quote, allow_trailing=True).body).report_data
    )


def _sgx_binds(quote: bytes, h: bytes) -> bool:
    try:
        return hmac.compare_digest(_sgx_report_data(quote), h + bytes(32))
    except Exception:
        return False


class _Dead(Exception):
    """The control channel broke: the worker is gone."""


__all__ = [
    "PLATFORMS",
    "CachedKey",
    "Hello",
    "KeyNotFound",
    "Ready",
    "WorkerClient",
    "WrappedKey",
    "find_worker_binary",
    "local_key_release",
    "wrap_data_key",
]

if sys.platform != "linux":  # memfd, SCM-less fd inheritance and seccomp are Linux-only
    raise ImportError("the ennclave enclave runtime needs Linux")
