"""Shared set-up for the attack scripts: a small sealed bundle in a temporary folder,
built with the same helpers the tests use."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
try:  # a development checkout without an installed package
    import ennclave  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "python"))

from support.enclave_bundle import Bundle, write_bundle  # noqa: E402


def small_bundle(tmp: Path) -> Bundle:
    return write_bundle(tmp / "bundle", tmp / "keystore.json")


def step(text: str) -> None:
    print(f"- {text}", flush=True)


def stop(pid: int) -> None:
    """SIGSTOP `pid` and wait until every one of its threads has stopped (kill()
    returns before they do, and a thread still running could answer a call)."""
    import os
    import signal
    import time

    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while True:
        states = [
            Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[0]
            for t in os.listdir(f"/proc/{pid}/task")
        ]
        if all(s in "tT" for s in states):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {pid} did not stop: thread states {states}")
        time.sleep(0.001)


class Hung(Exception):
    """The call did not return in time: the attack succeeded in blocking the client."""


def error_within(fn, seconds: float) -> BaseException | None:
    """Run `fn()` in a thread; its exception (None if it returned), or Hung."""
    import threading

    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if not outcome:
        raise Hung(f"ATTACK SUCCEEDED: the call did not return within {seconds:g} s")
    return outcome[0]


def start_hostile_worker(b: Bundle, binary: Path, what: str):
    """Start the worker through `binary` (a launcher that compromises it) with a local
    key release. Returns the worker's refusal and whether the key was released; an
    answered inference means the attack succeeded."""
    import numpy as np

    from ennclave.errors import WorkerError
    from ennclave.keystore import Keystore
    from ennclave.runtime.worker import WorkerClient, local_key_release
    from support.enclave_bundle import IN, OUT

    released = []
    inner = local_key_release(Keystore(b.keystore), b.key_id)

    def release(hello):
        released.append(hello)
        return inner(hello)

    wc = None
    try:
        wc = WorkerClient(
            (b.path / "manifest.json").read_bytes(),
            b.path / "private.sealed",
            release,
            in_len=IN,
            out_len=OUT,
            binary=binary,
            call_timeout=30.0,
        )
        y = wc.infer(np.ones((1, IN), np.float32))
        raise AssertionError(f"ATTACK SUCCEEDED: the {what} worker answered: {y}")
    except WorkerError as e:
        return e, bool(released)
    finally:
        if wc is not None:
            wc.close()
