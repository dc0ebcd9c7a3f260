"""Attack: a same-user process SIGSTOPs the enclave worker, so that the client's calls
hang forever. Claim: every call has a deadline; after it the call fails with one
sentence, the stopped worker is killed and the next call starts a fresh one."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from _common import error_within, small_bundle, step, stop

import ennclave
from ennclave.errors import WorkerError
from support.enclave_bundle import IN, reference


def main() -> None:
    x = np.random.default_rng(0).standard_normal((4, IN)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        b = small_bundle(Path(d))
        with ennclave.load(b.path, keystore=b.keystore, timeout=2.0) as m:
            pid = m.worker_pid
            stop(pid)
            step(f"stopped worker pid {pid}; calling predict with a 2 s deadline")
            err = error_within(lambda: m.predict(x), 20)
            assert isinstance(err, WorkerError), f"ATTACK SUCCEEDED: predict returned {err!r}"
            step(f"the call failed: {err}")
            y = m.predict(x)
            np.testing.assert_allclose(y, reference(b.weights, x), atol=1e-5)
            assert m.worker_pid != pid
            step(f"the next call answered from a fresh worker (pid {m.worker_pid})")
    print("stopped_worker: the attack failed, as it should")


if __name__ == "__main__":
    main()
