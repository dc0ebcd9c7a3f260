"""Attack: run the worker where it can lock no memory (a tiny RLIMIT_MEMLOCK, as an
unprivileged user: root's CAP_IPC_LOCK ignores the limit), so that the decrypted weights
land in ordinary, swappable memory — before issue #14 silently (`secmem: anonymous`).
Claim: the worker refuses to unseal with one sentence that says how to raise the limit,
unless the bundle's authenticated manifest allows unlocked memory
(`private.memory: "unlocked-ok"`, `split --allow-unlocked-memory`), and an unknown
`memory` value is refused.

On this kernel (6.x) memfd_secret pages are charged to RLIMIT_MEMLOCK too, so the small
limit defeats both memfd_secret and mlock here. Where memfd_secret were missing instead
(old kernel, `secretmem.enable=0`, ENOSYS under a seccomp filter) the same decision
applies; the Rust unit test `secmem::tests::unlocked_memory_only_when_allowed` covers it."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np
from _common import step

from ennclave.bundle import MEMORY_UNLOCKED_OK
from ennclave.bundle import write_bundle as write_bundle_files
from ennclave.errors import BundleError, EnnclaveError, WorkerError
from ennclave.keystore import Keystore
from ennclave.runtime.worker import WorkerClient, find_worker_binary, local_key_release
from ennclave.seal import new_data_key, seal_container
from support.enclave_bundle import IN, OUT, Bundle, manifest_for, program_container, reference

LIMIT = 1 << 20  # 1 MiB of locked memory
HID = 1 << 16  # weights of about 3.4 MiB: larger than the limit


def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "fc1.kernel": rng.standard_normal((IN, HID)).astype(np.float32),
        "fc1.bias": rng.standard_normal(HID).astype(np.float32) * 0.1,
        "fc2.kernel": rng.standard_normal((HID, OUT)).astype(np.float32) * 0.01,
        "fc2.bias": rng.standard_normal(OUT).astype(np.float32) * 0.1,
    }


def limited_launcher(tmp: Path) -> Path:
    """A launcher the host starts as "the worker binary": it lowers RLIMIT_MEMLOCK and,
    when run as root, drops to nobody, then execs a copy of the real worker (inherited
    fds and arguments unchanged)."""
    tmp.parent.chmod(0o755)  # nobody must reach the copy
    tmp.mkdir(mode=0o755)
    worker = tmp / "ennclave-enclave"
    shutil.copy2(find_worker_binary(), worker)
    worker.chmod(0o755)
    drop = "setpriv --reuid=nobody --regid=nogroup --clear-groups -- " if os.getuid() == 0 else ""
    launcher = tmp / "limited-worker"
    launcher.write_text(f'#!/bin/sh\nexec prlimit --memlock={LIMIT}:{LIMIT} {drop}{worker} "$@"\n')
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return launcher


def start(b: Bundle, launcher: Path | str) -> WorkerClient:
    return WorkerClient(
        (b.path / "manifest.json").read_bytes(),
        b.path / "private.sealed",
        local_key_release(Keystore(b.keystore), b.key_id),
        in_len=IN,
        out_len=OUT,
        max_batch=1,
        threads=1,
        binary=launcher,
        call_timeout=60.0,
    )


def refusal(b: Bundle, launcher: Path) -> EnnclaveError:
    wc = None
    try:
        wc = start(b, launcher)
        raise AssertionError(
            f"ATTACK SUCCEEDED: the worker unsealed into {wc.ready.secmem} memory "
            f"(HELLO said {wc.hello.secmem})"
        )
    except (WorkerError, BundleError) as e:
        return e
    finally:
        if wc is not None:
            wc.close()


def sealed_with_memory(dest: Path, ks: Path, w: dict[str, np.ndarray], value: str | None) -> Bundle:
    """A bundle whose authenticated manifest has `private.memory` = value (None: absent,
    the default: locked memory required)."""
    container = program_container(w)
    key, key_id = new_data_key(), secrets.token_hex(8)
    manifest = manifest_for(key_id, {"mode": "full"}, len(container))
    if value is not None:
        manifest["private"]["memory"] = value
    sealed = seal_container(container, manifest, key)
    write_bundle_files(dest, manifest, sealed)
    Keystore(ks).put(key_id, key)
    return Bundle(dest, ks, key_id, w)


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        launcher = limited_launcher(tmp / "bin")
        who = "nobody" if os.getuid() == 0 else f"uid {os.getuid()}"
        w = weights()

        b = sealed_with_memory(tmp / "locked", tmp / "ks1.json", w, None)
        step(f"worker as {who}, RLIMIT_MEMLOCK {LIMIT} B, a ~3.4 MiB program, default bundle")
        err = refusal(b, launcher)
        assert isinstance(err, WorkerError) and err.code == 11, f"refused oddly: {err!r}"
        assert "ulimit -l" in str(err) and "LimitMEMLOCK" in str(err), err
        step(f"refused: {err}")

        b = sealed_with_memory(tmp / "odd", tmp / "ks2.json", w, "whatever")
        step('the same with private.memory "whatever" (a value the worker does not know)')
        err = refusal(b, launcher)
        # BundleError, or WorkerCrashed with the same sentence when the worker's exit
        # races the host's sealed chunks.
        assert "private.memory" in str(err) and "does not know" in str(err), repr(err)
        step(f"refused: {err}")

        b = sealed_with_memory(tmp / "ok", tmp / "ks3.json", w, MEMORY_UNLOCKED_OK)
        step(f"the same with private.memory {MEMORY_UNLOCKED_OK!r} (the owner allows it)")
        wc = start(b, launcher)
        try:
            x = np.ones((1, IN), np.float32)
            np.testing.assert_allclose(wc.infer(x), reference(w, x), rtol=1e-3, atol=1e-3)
            assert wc.ready.secmem == "anonymous", wc.ready.secmem
            step(
                f"answers, and says so: HELLO secmem {wc.hello.secmem!r}, READY {wc.ready.secmem!r}"
            )
        finally:
            wc.close()

        b = sealed_with_memory(tmp / "plain", tmp / "ks4.json", w, None)
        step("the default bundle under this host's own limits")
        wc = start(b, find_worker_binary())
        try:
            assert wc.ready.secmem in ("memfd_secret", "mlock"), wc.ready.secmem
            step(f"HELLO secmem {wc.hello.secmem!r}, READY {wc.ready.secmem!r}")
        finally:
            wc.close()
    print("unlocked_memory: the attack failed, as it should")


if __name__ == "__main__":
    main()
