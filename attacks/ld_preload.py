"""Attack: start the allowed, unmodified worker binary with LD_PRELOAD (bypassing the
host, which passes no such variable), so that attacker code runs inside it — its hash
still matches `allowed_binaries` — and can read the data key or freeze the licence
clock. Also: a preloaded library that removes LD_PRELOAD from the environment again to
hide, LD_LIBRARY_PATH and LD_AUDIT. Claim: the worker refuses before HELLO (a fatal
SANDBOX error), so the host never releases the key; the preloaded constructor runs (its
marker file shows it) but finds nothing to take."""

from __future__ import annotations

import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from _common import start_hostile_worker, step

from ennclave.runtime.worker import find_worker_binary
from support.enclave_bundle import write_bundle

EVIL_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
__attribute__((constructor)) static void evil(void) {
    FILE *f = fopen(getenv("EVIL_MARKER"), "a");
    if (f) { fprintf(f, "constructor ran in pid %d\n", (int)getpid()); fclose(f); }
#ifdef HIDE
    unsetenv("LD_PRELOAD");  /* hide from an environment check */
#endif
}
"""


def build_evil(tmp: Path, hide: bool) -> Path:
    src = tmp / "evil.c"
    src.write_text(EVIL_C)
    out = tmp / ("evil-hide.so" if hide else "evil.so")
    cmd = ["gcc", "-shared", "-fPIC", "-O1", "-o", str(out), str(src)]
    subprocess.run(cmd + (["-DHIDE"] if hide else []), check=True)
    return out


def launcher(tmp: Path, name: str, env: str) -> Path:
    """What the attacker runs instead of the host's clean start: the real worker binary
    (a copy: identical bytes) with `env` in its environment."""
    worker = tmp / "ennclave-enclave"
    if not worker.exists():
        shutil.copy2(find_worker_binary(), worker)
    p = tmp / name
    p.write_text(f'#!/bin/sh\n{env} exec {worker} "$@"\n')
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return p


def is_static(binary: Path) -> bool:
    """Whether `binary` (ELF64) has no PT_INTERP program header: no dynamic loader runs
    in it, so LD_PRELOAD and LD_AUDIT load nothing (`-C target-feature=+crt-static`)."""
    import struct

    data = binary.read_bytes()[:65536]
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(
        struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3  # PT_INTERP
        for i in range(phnum)
    )


def main() -> None:
    if shutil.which("gcc") is None:
        raise SystemExit("ld_preload: needs gcc to build the preloaded library")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        b = write_bundle(tmp / "bundle", tmp / "keystore.json")
        marker = tmp / "marker.txt"
        evil, hide = build_evil(tmp, False), build_evil(tmp, True)
        static = is_static(find_worker_binary())
        if static:
            step("the worker is linked statically: no loader, so no preloaded code can run")
        cases = [
            ("LD_PRELOAD", f"EVIL_MARKER={marker} LD_PRELOAD={evil}", "LD_PRELOAD", True),
            (
                "LD_PRELOAD, removed again by the library's constructor",
                f"EVIL_MARKER={marker} LD_PRELOAD={hide}",
                # Statically linked, the library never loads and LD_PRELOAD stays set.
                "LD_PRELOAD" if static else "foreign code mapped",
                True,
            ),
            ("LD_LIBRARY_PATH", f"LD_LIBRARY_PATH={tmp}", "LD_LIBRARY_PATH", False),
            ("LD_AUDIT", f"LD_AUDIT={evil}", "LD_AUDIT", False),
        ]
        for i, (what, env, expect, constructor) in enumerate(cases):
            marker.unlink(missing_ok=True)
            step(f"worker started with {what}")
            err, released = start_hostile_worker(b, launcher(tmp, f"launch{i}", env), "preloaded")
            assert err.code == 11 and err.fatal, f"refused oddly: {err!r}"
            assert expect in str(err), err
            assert not released, "ATTACK SUCCEEDED: the host released the key to it"
            ran = marker.read_text().strip() if marker.exists() else "no marker"
            if constructor and static:
                assert ran == "no marker", f"preloaded code ran in a static worker: {ran}"
            elif constructor:
                assert "constructor ran" in ran, ran
            step(f"refused before HELLO, key never released (marker: {ran}): {err}")
    print("ld_preload: the attack failed, as it should")


if __name__ == "__main__":
    main()
