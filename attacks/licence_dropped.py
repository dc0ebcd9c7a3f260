"""Attack: a modified host drops the key server's LICENCE frame and sends only the KEY,
to get unlimited queries with no expiry. Claim: a bundle whose authenticated manifest
requires a licence (`private.licence: "required"`, or `key_source: "keyserver"`) gets no
key into the worker without a valid licence, whatever else the manifest says; a
`licence` value the worker does not know is refused, never read as "no licence"."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from _common import step

from ennclave import seal
from ennclave.errors import BundleError, EnnclaveError, LicenceError, WorkerError
from ennclave.keystore import Keystore
from ennclave.runtime.worker import Hello, WorkerClient
from support.enclave_bundle import IN, OUT, Bundle, write_bundle


def no_licence(b: Bundle):
    """The modified host's key release: the data key wrapped to the worker, and nothing
    else (as if the key server's licence had been dropped on the way)."""
    key = Keystore(b.keystore).get(b.key_id)

    def release(hello: Hello) -> seal.WrappedKey:
        wk = seal.wrap_data_key(hello.pubkey, key, b.key_id)
        assert wk.licence is None and wk.licence_mac is None
        return wk

    return release


def attempt(b: Bundle) -> EnnclaveError:
    """Start the worker with the key alone and try one inference; the refusal."""
    wc = None
    try:
        wc = WorkerClient(
            (b.path / "manifest.json").read_bytes(),
            b.path / "private.sealed",
            no_licence(b),
            in_len=IN,
            out_len=OUT,
            call_timeout=30.0,
        )
        y = wc.infer(np.ones((1, IN), np.float32))
        raise AssertionError(f"ATTACK SUCCEEDED: the worker answered without a licence: {y}")
    except (WorkerError, BundleError) as e:
        return e
    finally:
        if wc is not None:
            wc.close()


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cases = [
            ("key_source keyserver", {"key_source": "keyserver"}),
            # The bypass from issue #14: the key went to the key server but the sealed
            # manifest still says key_source local; only `licence` says it needs one.
            ("licence required, key_source local", {"licence": "required"}),
            (
                "licence required, key_source keyserver",
                {"key_source": "keyserver", "licence": "required"},
            ),
        ]
        for i, (what, kw) in enumerate(cases):
            b = write_bundle(tmp / f"b{i}", tmp / f"ks{i}.json", **kw)
            step(f"{what}: sending KEY without LICENCE")
            err = attempt(b)
            assert isinstance(err, LicenceError), f"ATTACK SUCCEEDED? refused oddly: {err!r}"
            assert err.code == 13 and err.fatal, err
            assert "needs its licence" in str(err), err
            step(f"refused: {err}")

        # A licence value this worker does not know must not read as "no licence".
        b = write_bundle(tmp / "future", tmp / "ks-future.json", licence="optional")
        step('licence "optional" (unknown), key_source local: sending KEY without LICENCE')
        err = attempt(b)
        assert isinstance(err, BundleError), f"ATTACK SUCCEEDED? refused oddly: {err!r}"
        assert "private.licence" in str(err), err
        step(f"refused: {err}")
    print("licence_dropped: the attack failed, as it should")


if __name__ == "__main__":
    main()
