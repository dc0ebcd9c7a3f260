"""Attack: another user on the owner's machine watches the process list while the owner
runs `ennclave keys ...`: /proc/PID/cmdline is readable by every user, so an owner
token given as `--token TOKEN` (the only way before issue #14) leaks to them.
Claim: with `--token-file FILE` or `ENNCLAVE_OWNER_TOKEN` the token never appears in
any process's argv, and (as another uid) not in a readable environment either. The
script first runs `--token` itself as a positive control: the watcher must see the
token there, or it proves nothing. Under root (CI) the watcher runs as `nobody`."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, step

from support.keyserver_util import KeyServerProc

# The watcher: reads the token from stdin (never from its argv), then scans every
# process's cmdline and (where it may) environ until the stop file appears; prints one
# line per process it saw the token in.
WATCHER = r"""
import os, sys
token = sys.stdin.readline().strip().encode()
stop = sys.argv[1]
seen = {}
print("ready", flush=True)
while not os.path.exists(stop):
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        for what in ("cmdline", "environ"):
            try:
                with open(f"/proc/{pid}/{what}", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if token in data and (pid, what) not in seen:
                seen[(pid, what)] = 1
                print(f"SEEN {what} of pid {pid}", flush=True)
print("done", flush=True)
"""


def watcher_cmd() -> tuple[list[str], str]:
    if os.getuid() == 0 and Path("/usr/bin/python3").exists():
        return [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--",
            "/usr/bin/python3",
            "-c",
            WATCHER,
        ], "nobody"
    return [sys.executable, "-c", WATCHER], f"uid {os.getuid()} (the same user: not root here)"


def watch(token: str, run, stop: Path) -> list[str]:
    """Start the watcher, run `run()` while it watches, return what it saw."""
    cmd, _ = watcher_cmd()
    w = subprocess.Popen(
        [*cmd, str(stop)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert w.stdin is not None and w.stdout is not None
    w.stdin.write(token + "\n")
    w.stdin.close()
    w.stdin = None  # closed: communicate() must not flush it
    assert w.stdout.readline().strip() == "ready", "the watcher did not start"
    try:
        run()
        time.sleep(0.2)
    finally:
        stop.touch()
    out, _ = w.communicate(timeout=30)
    stop.unlink()
    return [line for line in out.splitlines() if line.startswith("SEEN")]


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        tmp.chmod(0o755)  # the watcher (nobody) must be able to touch nothing but /proc
        stop = tmp / "stop"
        (tmp / "cfg").mkdir(mode=0o700)
        ks = KeyServerProc(str(tmp / "keys.db"), tmp / "cfg").start()
        try:
            token = ks.token
            token_file = tmp / "owner-token"
            token_file.write_text(token + "\n")
            token_file.chmod(0o600)
            # A fresh config dir: the CLI must use the token it is given, not a saved one.
            (tmp / "cli").mkdir(mode=0o700)
            env = dict(
                os.environ,
                ENNCLAVE_CONFIG_DIR=str(tmp / "cli"),
                PYTHONPATH=str(REPO / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""),
            )
            env.pop("ENNCLAVE_OWNER_TOKEN", None)
            base = [sys.executable, "-m", "ennclave", "keys", "list", "--keyserver", ks.url]
            _, who = watcher_cmd()
            step(f"a watcher as {who} scans /proc/*/cmdline and /proc/*/environ")

            def cli(extra: list[str], extra_env: dict[str, str] | None = None):
                def go() -> None:
                    r = subprocess.run(
                        base + extra,
                        env={**env, **(extra_env or {})},
                        capture_output=True,
                        text=True,
                        timeout=120,
                    )
                    assert r.returncode == 0, f"ennclave keys list failed: {r.stderr}"
                    go.stderr = r.stderr  # type: ignore[attr-defined]

                return go

            control = cli(["--token", token])
            seen = watch(token, control, stop)
            if not seen:
                raise AssertionError(
                    "the watcher did not see --token in argv, so it proves nothing here"
                )
            assert "--token is visible to other users" in control.stderr  # type: ignore[attr-defined]
            step(f"control: --token TOKEN leaks ({seen[0]}); the CLI warns about it")

            for label, run in (
                ("--token-file FILE", cli(["--token-file", str(token_file)])),
                ("ENNCLAVE_OWNER_TOKEN", cli([], {"ENNCLAVE_OWNER_TOKEN": token})),
            ):
                seen = watch(token, run, stop)
                leaked = [s for s in seen if "cmdline" in s or who == "nobody"]
                if leaked:
                    raise AssertionError(f"ATTACK SUCCEEDED: with {label} the watcher saw {leaked}")
                note = "" if who == "nobody" else " (environ is readable by the same user)"
                step(f"{label}: the command worked and the token never appeared{note}")
        finally:
            ks.stop()
    print("token_in_argv: the attack failed, as it should")
    return 0


if __name__ == "__main__":
    sys.exit(main())
