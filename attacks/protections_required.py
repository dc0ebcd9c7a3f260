"""Attack: get a key whose owner requires protections (`require_protections`) into a
worker that lacks one, or make the host relay better protections than the worker
reported. Before issue #14 the evidence said nothing about protections, so a policy
could not require them and every worker with valid evidence got the key.
Claim: the key server refuses (403 `protections_missing`, one sentence) a worker whose
evidence lacks a required protection, and refuses protections rewritten on the way
(`evidence_invalid`: they are hashed into the evidence). What it cannot stop, stated
plainly: with software evidence a host that recomputes the report (anyone can) claims
what it likes; only hardware evidence binds the worker's own statement."""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from _common import step

import ennclave
from ennclave.bundle import write_bundle as write_bundle_files
from ennclave.keyserver.client import KeyReleaseRefused, KeyServerClient, KeyserverRelease
from ennclave.seal import canonical_manifest, new_data_key, seal_container
from support.enclave_bundle import make_weights, manifest_for, program_container
from support.keyserver_util import KeyServerProc


def unlocked_ok_bundle(tmp: Path) -> tuple[Path, str, bytes, str]:
    """A bundle whose owner allowed unlocked memory: its worker promises only
    `secret_memory: anonymous`."""
    container = program_container(make_weights())
    key, key_id = new_data_key(), "protections-attack"
    manifest = manifest_for(key_id, {"mode": "full"}, len(container))
    manifest["private"]["key_source"] = "local"
    manifest["private"]["memory"] = "unlocked-ok"
    write_bundle_files(tmp / "bundle", manifest, seal_container(container, manifest, key))
    return tmp / "bundle", key_id, key, hashlib.sha256(canonical_manifest(manifest)).hexdigest()


def refused(fn) -> KeyReleaseRefused:
    try:
        fn()
    except KeyReleaseRefused as e:
        return e
    raise AssertionError("ATTACK SUCCEEDED: the key was released")


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "cfg").mkdir()
        ks = KeyServerProc(str(tmp / "keys.db"), tmp / "cfg").start()
        try:
            path, key_id, key, digest = unlocked_ok_bundle(tmp)
            with KeyServerClient(ks.url, ks.token) as owner:
                owner.register(
                    key_id,
                    key,
                    digest,
                    {"allow_software": True, "require_protections": ["locked_memory", "seccomp"]},
                )
            step("the owner requires locked_memory and seccomp; the bundle allows unlocked memory")

            e = refused(lambda: ennclave.load(path, keyserver=ks.url))
            assert (e.status, e.code) == (403, "protections_missing"), repr(e)
            assert "locked_memory" in str(e) and '"secret_memory":"anonymous"' in str(e), e
            step(f"the genuine worker lacks locked memory: refused: {e}")

            # A modified host relays better protections than the worker reported.
            real = KeyserverRelease.__call__

            def forging(self, hello):
                worker = self._worker

                class Forger:
                    def evidence_for(self, nonce):
                        got = worker.evidence_for(nonce)
                        p = json.loads(got.protections)
                        p["secret_memory"] = "memfd_secret"
                        forged = json.dumps(p, sort_keys=True, separators=(",", ":")).encode()
                        return replace(got, protections=forged)

                self._worker = Forger()
                try:
                    return real(self, hello)
                finally:
                    self._worker = worker

            KeyserverRelease.__call__ = forging  # type: ignore[method-assign]
            try:
                e = refused(lambda: ennclave.load(path, keyserver=ks.url))
            finally:
                KeyserverRelease.__call__ = real  # type: ignore[method-assign]
            assert (e.status, e.code) == (403, "evidence_invalid"), repr(e)
            step(f"protections rewritten by the host: refused: {e}")

            with KeyServerClient(ks.url, ks.token) as owner:
                rows = owner.audit(key_id)
                assert [r["reason"] for r in rows[-2:]] == [
                    "protections_missing",
                    "evidence_invalid",
                ], rows[-2:]
                assert not any(r["decision"] == "granted" for r in rows), rows
                step("audit: both refusals recorded, no grant")
                # The owner drops the requirement: the same worker then gets its key.
                owner.set_policy(key_id, {"require_protections": []})
            with ennclave.load(path, keyserver=ks.url) as m:
                assert m.worker.protections["secret_memory"] == "anonymous"
            step("with no requirement the same bundle loads (so the refusals were the policy's)")
            step(
                "not stopped (software evidence): a host that recomputes the software "
                "report can claim any protections; hardware evidence binds them"
            )
        finally:
            ks.stop()
    print("protections_required: the attack failed, as it should")
    return 0


if __name__ == "__main__":
    sys.exit(main())
