"""Attack: start the worker under a tracer from its birth (PTRACE_TRACEME before exec),
as the same user. PR_SET_DUMPABLE 0 stops *new* attaches but does not detach this
tracer, which can then rewrite a system call to dump the decrypted weights (issue #14).
Claim: the worker reads TracerPid from /proc/self/status after hardening (and again just
before unwrapping the key) and refuses before HELLO, so the key is never released to it.
If ptrace is not permitted here at all (a seccomp or Yama policy), the attack is
impossible and the script says so."""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from _common import start_hostile_worker, step

from ennclave.runtime.worker import find_worker_binary
from support.enclave_bundle import write_bundle

# The tracer: forks; the child asks to be traced (PTRACE_TRACEME) and execs the worker;
# the parent continues it through every stop (passing signals on) and exits as it does.
TRACER = r"""
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
PTRACE_TRACEME, PTRACE_CONT = 0, 7
pid = os.fork()
if pid == 0:
    if libc.ptrace(PTRACE_TRACEME, 0, None, None) != 0:
        os._exit(97)
    os.execv(sys.argv[1], sys.argv[1:])
while True:
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status):
        sys.exit(os.WEXITSTATUS(status))
    if os.WIFSIGNALED(status):
        sys.exit(128 + os.WTERMSIG(status))
    sig = os.WSTOPSIG(status)
    libc.ptrace(PTRACE_CONT, pid, None, None if sig == signal.SIGTRAP else sig)
"""


def ptrace_possible() -> bool:
    """Whether a child may ask to be traced here (PTRACE_TRACEME, then a stop)."""
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    pid = os.fork()
    if pid == 0:
        if libc.ptrace(0, 0, None, None) != 0:
            os._exit(97)
        os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSTOPPED(status):
        libc.ptrace(8, pid, None, None)  # PTRACE_KILL
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return True
    return False


def launcher(tmp: Path) -> tuple[Path, str]:
    """A launcher the host starts as "the worker binary": the tracer above around a copy
    of the real worker; as root it first drops to nobody (a same-user attacker)."""
    tmp.parent.chmod(0o755)
    tmp.mkdir(mode=0o755)
    worker = tmp / "ennclave-enclave"
    shutil.copy2(find_worker_binary(), worker)
    worker.chmod(0o755)
    tracer = tmp / "tracer.py"
    tracer.write_text(TRACER)
    tracer.chmod(0o644)
    if os.getuid() == 0 and Path("/usr/bin/python3").exists():
        who = "nobody"
        cmd = f"setpriv --reuid=nobody --regid=nogroup --clear-groups -- /usr/bin/python3 {tracer}"
    else:
        who = f"uid {os.getuid()}"
        cmd = f"{sys.executable} {tracer}"
    p = tmp / "traced-worker"
    p.write_text(f'#!/bin/sh\nexec {cmd} {worker} "$@"\n')
    p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return p, who


def main() -> None:
    if not ptrace_possible():
        step(
            "ptrace (PTRACE_TRACEME) is not permitted in this sandbox: the attack is impossible here"
        )
        print("tracer_from_birth: the attack failed, as it should (ptrace impossible here)")
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        b = write_bundle(tmp / "bundle", tmp / "keystore.json")
        binary, who = launcher(tmp / "bin")
        step(f"worker started under a tracer from birth (PTRACE_TRACEME, as {who})")
        err, released = start_hostile_worker(b, binary, "traced")
        assert err.code == 11 and err.fatal, f"refused oddly: {err!r}"
        assert "traces it" in str(err), err
        assert not released, "ATTACK SUCCEEDED: the host released the key to it"
        step(f"refused before HELLO, key never released: {err}")
    print("tracer_from_birth: the attack failed, as it should (refusal observed)")


if __name__ == "__main__":
    main()
