"""The owner's key server: a real server process, a real worker, attested key release."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("sqlalchemy")
pytest.importorskip("httpx")

import ennclave
from ennclave import seal
from ennclave.errors import QueryBudgetExhausted, WorkerNotFound
from ennclave.keyserver import evidence as ev
from ennclave.keyserver.client import (
    KeyReleaseRefused,
    KeyServerClient,
    KeyserverRelease,
    KeyServerUnreachable,
    LicenceError,
)
from ennclave.keyserver.licence import Licence, check_licence_mac, licence_mac
from ennclave.keystore import Keystore
from ennclave.runtime import worker as wmod
from ennclave.seal import canonical_manifest
from support.enclave_bundle import reference, write_bundle
from support.keyserver_util import REPO, free_port

try:
    WORKER = wmod.find_worker_binary()
except WorkerNotFound:
    WORKER = None
needs_worker = pytest.mark.skipif(WORKER is None, reason="needs the built worker")


@pytest.fixture
def server(keyserver):
    """A key server process on SQLite or PostgreSQL (conftest `keyserver`)."""
    return keyserver


def _digest(bundle: Path) -> str:
    return hashlib.sha256(
        canonical_manifest(json.loads((bundle / "manifest.json").read_text()))
    ).hexdigest()


@pytest.fixture
def registered(server, tmp_path):
    """A bundle whose key is registered on the server (and removed from the keystore)."""

    def make(name: str = "b", memory: str | None = None, **policy):
        b = write_bundle(tmp_path / name, tmp_path / f"{name}-ks.json", memory=memory)
        key = Keystore(b.keystore).get(b.key_id)
        with KeyServerClient(server.url, server.token) as c:
            c.register(b.key_id, key, _digest(b.path), policy)
        b.keystore.unlink()  # the host has no key file at all
        b.data_key = key  # for the tests' own checks only
        return b

    return make


def _admin(server):
    return KeyServerClient(server.url, server.token)


# ------------------------------------------------------------------ a fake worker


class FakeWorker:
    """What a worker announces, computed in Python (software evidence)."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        self.sk = X25519PrivateKey.generate()
        self.pub = self.sk.public_key().public_bytes_raw()
        self.binsha = hashlib.sha256(b"a worker binary").digest()

    def request(self, key_id: str, nonce: bytes, manifest: str, protections=None, **over):
        h = ev.evidence_hash(nonce, self.pub, self.binsha, protections)
        body = {
            "key_id": key_id,
            "nonce": nonce.hex(),
            "pubkey": self.pub.hex(),
            "binary_sha256": self.binsha.hex(),
            "manifest_sha256": manifest,
            "client_id": "ab" * 32,
            "evidence": {
                "kind": "software",
                "report": base64.b64encode(h).decode(),
            },
        }
        if protections is not None:
            body["protections"] = protections.decode()
        body.update(over)
        return body

    def unwrap(self, resp, key_id: str) -> bytes:
        from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

        suite = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM)
        ct = base64.b64decode(resp["enc"]) + base64.b64decode(resp["wrapped"])
        return suite.decrypt(ct, self.sk, info=seal.hpke_info(key_id))


def _refused(fn) -> KeyReleaseRefused:
    with pytest.raises(KeyReleaseRefused) as e:
        fn()
    return e.value


# ------------------------------------------------------------------ protocol


def test_release_wraps_the_key_to_the_worker_and_licence_verifies(registered, server):
    b = registered(allow_software=True, query_budget=7, licence_ttl=60)
    w = FakeWorker()
    with KeyServerClient(server.url) as c:  # no token: key requests need none
        nonce = c.challenge(b.key_id)
        resp = c.release(w.request(b.key_id, nonce, _digest(b.path)))
    assert w.unwrap(resp, b.key_id) == b.data_key
    lic = check_licence_mac(
        b.data_key, base64.b64decode(resp["licence"]), base64.b64decode(resp["licence_mac"])
    )
    assert lic.query_budget == 7 and lic.pubkey == w.pub.hex() and lic.evidence == "software"
    assert 55 <= lic.expires_at - int(time.time()) <= 60
    assert resp["software"] is True
    assert b.data_key.hex() not in json.dumps(resp)


def test_bad_forged_replayed_evidence_is_refused(registered, server):
    b = registered(allow_software=True)
    w = FakeWorker()
    d = _digest(b.path)
    with KeyServerClient(server.url) as c:
        n1 = c.challenge(b.key_id)
        c.release(w.request(b.key_id, n1, d))
        e = _refused(lambda: c.release(w.request(b.key_id, n1, d)))  # replay
        assert (e.status, e.code) == (403, "nonce_invalid")
        e = _refused(lambda: c.release(w.request(b.key_id, os.urandom(32), d)))  # never issued
        assert e.code == "nonce_invalid"
        n2 = c.challenge(b.key_id)
        forged = w.request(b.key_id, n2, d, pubkey=os.urandom(32).hex())  # report ≠ key
        assert _refused(lambda: c.release(forged)).code == "evidence_invalid"
        n3 = c.challenge(b.key_id)  # the refused nonce is spent: ask again
        assert _refused(lambda: c.release(w.request(b.key_id, n3, "00" * 32))).code == (
            "manifest_mismatch"
        )
        n4 = c.challenge(b.key_id)
        bad = w.request(b.key_id, n4, d, evidence={"kind": "tpm", "report": ""})
        assert _refused(lambda: c.release(bad)).code == "unknown_kind"
        n5 = c.challenge("someotherkey")
        e = _refused(lambda: c.release(w.request(b.key_id, n5, d)))  # nonce of another key
        assert e.code == "nonce_invalid"
        n6 = c.challenge("0123456789abcdef")
        e = _refused(lambda: c.release(w.request("0123456789abcdef", n6, d)))
        assert (e.status, e.code) == (404, "unknown_bundle")
        e = _refused(lambda: c.release({"key_id": b.key_id, "nonce": "zz"}))
        assert (e.status, e.code) == (400, "bad_request")
    with _admin(server) as a:
        log = a.audit(b.key_id)
    reasons = [r["reason"] for r in log if r["event"] == "release"]
    assert reasons == [
        "software",
        "nonce_invalid",
        "nonce_invalid",
        "evidence_invalid",
        "manifest_mismatch",
        "unknown_kind",
        "nonce_invalid",
    ]
    assert all(r["decision"] == "refused" for r in log[2:] if r["event"] == "release")


NATIVE = {  # what a native worker reports (handshake.rs `protections`)
    "environment_check": True,
    "mapping_check": True,
    "non_dumpable": True,
    "platform": "native",
    "seccomp": True,
    "secret_memory": "memfd_secret",
    "static_binary": False,
    "tracer_check": True,
}


def _prot(**over) -> bytes:
    return ev.canonical_json({**NATIVE, **over})


def test_required_protections_are_checked_against_the_bound_evidence(registered, server):
    """A policy's require_protections: refused when the evidence lacks one, when a
    worker reports none (before protocol 3), when the host rewrites what the worker
    hashed, or when the JSON is not canonical; granted (and audited) otherwise."""
    b = registered(allow_software=True, require_protections=["seccomp", "no_tracer"])
    w = FakeWorker()
    d = _digest(b.path)
    with KeyServerClient(server.url) as c:

        def attempt(**kw):
            return c.release(w.request(b.key_id, c.challenge(b.key_id), d, **kw))

        e = _refused(lambda: attempt())
        assert (e.status, e.code) == (403, "protections_missing")
        assert "reports no protections" in str(e) and "seccomp, no_tracer" in str(e)
        e = _refused(lambda: attempt(protections=_prot(tracer_check=False)))
        assert e.code == "protections_missing"
        assert "(no_tracer;" in str(e) and '"tracer_check":false' in str(e)
        # The host rewrites the worker's protections after it hashed them.
        n = c.challenge(b.key_id)
        body = w.request(b.key_id, n, d, protections=_prot(tracer_check=False))
        body["protections"] = _prot().decode()
        assert _refused(lambda: c.release(body)).code == "evidence_invalid"
        for bad in (b'{"seccomp": true}', b"[]", b"{", _prot()[:-1] + b',"x":[1]}'):
            assert _refused(lambda b=bad: attempt(protections=b)).code == "protections_malformed"
        resp = attempt(protections=_prot())
        assert w.unwrap(resp, b.key_id) == b.data_key
    with _admin(server) as a:
        rows = a.audit(b.key_id)
        assert rows[-1]["decision"] == "granted"
        assert ("protections " + _prot().decode()) in rows[-1]["detail"]
        assert any(
            r["reason"] == "protections_missing" and '"tracer_check":false' in r["detail"]
            for r in rows
        )
        # Without a requirement, a worker that reports none still gets its key (v1).
        a.set_policy(b.key_id, {"require_protections": []})
    with KeyServerClient(server.url) as c:
        assert w.unwrap(c.release(w.request(b.key_id, c.challenge(b.key_id), d)), b.key_id)


def test_require_protections_policy_is_validated():
    ok = ev.Policy.from_json({"require_protections": ["memfd_secret", "seccomp"]})
    assert ok.require_protections == ["memfd_secret", "seccomp"]
    for bad in (["seccomp", "seccomp"], ["root_proof"], "seccomp", [1], None):
        with pytest.raises(ValueError, match="require_protections"):
            ev.Policy.from_json({"require_protections": bad})
    from ennclave.errors import InputError
    from ennclave.keyserver.cli import _protection_names

    assert _protection_names("seccomp, no_tracer") == ["seccomp", "no_tracer"]
    assert _protection_names("none") == []
    for bad in ("", "seccomp,seccomp", "nope"):
        with pytest.raises(InputError, match="--require-protections"):
            _protection_names(bad)


def test_policy_checks_software_default_off_expiry_clients(registered, server):
    b = registered()  # default policy: software evidence not accepted
    w = FakeWorker()
    d = _digest(b.path)
    with KeyServerClient(server.url) as c, _admin(server) as a:
        e = _refused(lambda: c.release(w.request(b.key_id, c.challenge(b.key_id), d)))
        assert (e.status, e.code) == (403, "software_not_allowed")
        a.set_policy(b.key_id, {"allow_software": True, "allowed_binaries": ["11" * 32]})
        e = _refused(lambda: c.release(w.request(b.key_id, c.challenge(b.key_id), d)))
        assert e.code == "binary_not_allowed"
        a.set_policy(b.key_id, {"allowed_binaries": [w.binsha.hex()], "max_clients": 1})
        c.release(w.request(b.key_id, c.challenge(b.key_id), d))
        c.release(w.request(b.key_id, c.challenge(b.key_id), d))  # same client again: fine
        other = w.request(b.key_id, c.challenge(b.key_id), d, client_id="cd" * 32)
        assert _refused(lambda: c.release(other)).code == "too_many_clients"
        a.set_policy(b.key_id, {"expires_at": int(time.time()) - 1})
        e = _refused(lambda: c.release(w.request(b.key_id, c.challenge(b.key_id), d)))
        assert (e.status, e.code) == (403, "expired")
        with pytest.raises(KeyReleaseRefused, match="bad_policy"):
            a.set_policy(b.key_id, {"licence_ttl": 0.5})
        with pytest.raises(KeyReleaseRefused, match="bad_policy"):
            a.set_policy(b.key_id, {"no_such_field": 1})


def test_owner_calls_need_the_token(registered, server):
    b = registered()
    for token in (None, "wrong-token"):
        with KeyServerClient(server.url, token) as c:
            for call in (c.list, lambda c=c: c.revoke(b.key_id), lambda c=c: c.audit()):
                e = _refused(call)
                assert (e.status, e.code) == (401, "unauthorized")
    with _admin(server) as a:
        assert _refused(lambda: a.register(b.key_id, b"\0" * 32)).code == "exists"
        assert a.get(b.key_id)["revoked"] is False


def test_request_size_limit(server):
    import httpx

    r = httpx.post(
        server.url + "/v1/release",
        content=b"{" + b" " * (200 * 1024) + b"}",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"] == "too_large"

    def chunks():
        for _ in range(100):
            yield b" " * 1024

    r = httpx.post(
        server.url + "/v1/release", content=chunks(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_rate_limit_per_client():
    from fastapi.testclient import TestClient

    from ennclave.keyserver.app import ServerSettings, create_app

    app = create_app(object(), ServerSettings(rate=1.0, burst=3))  # type: ignore[arg-type]
    with TestClient(app) as c:
        codes = [c.get("/v1/health").status_code for _ in range(5)]
    assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]


def test_restart_keeps_keys_policies_token_and_audit(registered, server):
    b = registered(allow_software=True, query_budget=3)
    token = server.token
    with _admin(server) as a:
        a.revoke(b.key_id, "test")
    server.stop()
    server.start()
    assert server.token == token  # not re-created
    with _admin(server) as a:
        rec = a.get(b.key_id)
        assert rec["revoked"] and rec["policy"]["query_budget"] == 3
        assert [r["event"] for r in a.audit()][-2:] == ["register", "revoke"]
    from ennclave.keyserver.store import Store

    st = Store(server.db, b"\0" * 32)  # chain check needs no KEK
    assert st.verify_audit_chain() >= 3
    from sqlalchemy import text
    from sqlalchemy.exc import DatabaseError

    for sql in ("DELETE FROM audit", "UPDATE audit SET decision='granted'"):
        with pytest.raises(DatabaseError, match="append-only"), st.engine.begin() as c:
            c.execute(text(sql))
    with st.read() as c:  # the data key is not stored in clear in the database
        blobs = [bytes(r[0]) for r in c.execute(text("SELECT sealed_key FROM bundles"))]
    assert blobs and all(b.data_key not in blob for blob in blobs)
    if server.sqlite:
        assert b.data_key not in Path(server.db).read_bytes()
    st.close()


def test_owner_cli_register_policy_revoke_audit(server, tmp_path, capsys):
    from ennclave.cli import main

    # `keys register` takes only a bundle whose sealed manifest requires a licence
    b = write_bundle(tmp_path / "cli-b", tmp_path / "cli-ks.json", licence="required")
    assert (
        main(["keys", "register", str(b.path), "--keystore", str(b.keystore), "--max-clients", "2"])
        == 0
    )  # URL and token from the saved owner config
    assert (
        main(
            [
                "keys",
                "policy",
                b.key_id,
                "--allow-software",
                "--query-budget",
                "9",
                "--expires-in",
                "3600",
                "--require-protections",
                "seccomp,no_tracer",
            ]
        )
        == 0
    )
    assert "requires seccomp, no_tracer" in capsys.readouterr().out
    assert main(["keys", "policy", b.key_id, "--require-protections", "seccomp,root"]) == 2
    assert "--require-protections expects distinct names" in capsys.readouterr().err
    assert main(["keys", "show", b.key_id, "--json"]) == 0
    out = capsys.readouterr().out
    shown = json.loads(out[out.index("{") :])
    assert shown["policy"]["allow_software"] and shown["policy"]["query_budget"] == 9
    assert shown["policy"]["max_clients"] == 2
    assert shown["policy"]["require_protections"] == ["seccomp", "no_tracer"]
    assert main(["keys", "revoke", b.key_id, "--reason", "end of contract"]) == 0
    assert main(["keys", "audit", b.key_id, "--json"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("[") :])
    assert [r["event"] for r in rows] == ["register", "policy", "revoke"]  # one policy row
    assert main(["keys", "list", "--token", "not-the-token"]) == 2  # clear error, no traceback
    assert "unauthorized" in capsys.readouterr().err
    assert server.token not in json.dumps(rows)


def test_keys_register_refuses_a_local_key_bundle(server, tmp_path, capsys):
    """A local-key bundle's sealed manifest lets it run without a licence, so its key
    on the server would be bypassed by a host that drops the licence (issue #14)."""
    from ennclave.cli import main

    for name, kw in [("plain", {}), ("none", {"licence": "none"})]:
        b = write_bundle(tmp_path / name, tmp_path / f"{name}-ks.json", **kw)
        assert main(["keys", "register", str(b.path), "--keystore", str(b.keystore)]) == 2
        err = capsys.readouterr().err
        assert "local-key bundle" in err and "--keyserver URL" in err, err
        with _admin(server) as a:
            assert all(r["key_id"] != b.key_id for r in a.list())  # nothing registered
    b = write_bundle(tmp_path / "odd", tmp_path / "odd-ks.json", licence="optional")
    assert main(["keys", "register", str(b.path), "--keystore", str(b.keystore)]) == 2
    assert "private.licence" in capsys.readouterr().err


def test_licence_required_follows_the_manifest():
    from ennclave.bundle import SourceSpec, build_manifest, licence_required
    from ennclave.errors import BundleError

    def manifest(**kw):
        return build_manifest(
            source=SourceSpec("m", "keras", None),
            cut={"index": 0},
            public=None,
            private_inputs=[],
            private_outputs=[],
            key_id="k",
            **kw,
        )

    local, remote = manifest(), manifest(keyserver_url="https://ks.example/")
    assert "licence" not in local["private"] and not licence_required(local)
    assert remote["private"]["licence"] == "required" and licence_required(remote)
    assert licence_required({"private": {"key_source": "keyserver"}})  # older bundles
    assert licence_required({"private": {"key_source": "local", "licence": "required"}})
    assert not licence_required({"private": {"key_source": "local", "licence": "none"}})
    for bad in ["optional", None, True, "Required"]:
        with pytest.raises(BundleError, match=r"private\.licence"):
            licence_required({"private": {"licence": bad}})


# ------------------------------------------------------------------ with the real worker


@needs_worker
def test_worker_end_to_end_revoke_then_next_start_fails(registered, server):
    b = registered(allow_software=True)
    x = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    # a bundle sealed for the local keystore, its key moved to the server: keyserver= URL
    with ennclave.load(b.path, keyserver=server.url) as m:
        np.testing.assert_allclose(m.predict(x), reference(b.weights, x), rtol=1e-5, atol=1e-5)
        assert m.licence.evidence == "software"
    with _admin(server) as a:
        a.revoke(b.key_id, "licence ended")
        with pytest.raises(KeyReleaseRefused, match="revoked") as e:
            ennclave.load(b.path, keyserver=server.url)
        assert e.value.status == 403
        assert a.audit(b.key_id)[-1]["reason"] == "revoked"


@needs_worker
def test_real_worker_reports_its_protections_and_a_policy_can_require_them(registered, server):
    """The worker's own protections meet a policy that requires what a native worker
    has; the audit row and the client both record them; one it lacks refuses the key."""
    have = ["locked_memory", "seccomp", "no_tracer", "environment_check", "non_dumpable"]
    b = registered(allow_software=True, require_protections=have)
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    with ennclave.load(b.path, keyserver=server.url) as m:
        np.testing.assert_allclose(m.predict(x), reference(b.weights, x), rtol=1e-5, atol=1e-5)
        prot, secmem = m.worker.protections, m.worker.ready.secmem
    assert prot["seccomp"] is True and prot["tracer_check"] is True
    assert prot["secret_memory"] == secmem
    with _admin(server) as a:
        assert ("protections " + ev.canonical_json(prot).decode()) in a.audit(b.key_id)[-1][
            "detail"
        ]
    # A bundle whose owner allowed unlocked memory: its worker reports `anonymous`
    # memory, so a policy requiring locked memory must refuse it, on any kernel.
    u = registered("u", memory="unlocked-ok", allow_software=True, require_protections=have)
    with pytest.raises(KeyReleaseRefused, match=r"lacks protection.*locked_memory") as e:
        ennclave.load(u.path, keyserver=server.url)
    assert e.value.code == "protections_missing"


@needs_worker
def test_query_budget_exactly_n_then_refusal(registered, server):
    b = registered(allow_software=True, query_budget=5)
    x = np.ones((1, 8), np.float32)
    with ennclave.load(b.path, keyserver=server.url) as m:
        for _ in range(5):
            m.predict(x)
        with pytest.raises(QueryBudgetExhausted, match="budget of 5"):
            m.predict(x)
        with pytest.raises(QueryBudgetExhausted):
            m.predict_private(x)


@needs_worker
def test_expired_licence_is_refused(registered, server):
    b = registered(allow_software=True, licence_ttl=2)
    with ennclave.load(b.path, keyserver=server.url) as m:
        m.predict(np.ones((1, 8), np.float32))
        time.sleep(max(0.0, m.licence.expires_at - time.time()) + 0.1)
        with pytest.raises(LicenceError, match="expired"):
            m.predict(np.ones((1, 8), np.float32))


@needs_worker
def test_unreachable_server_and_running_offline(registered, server):
    b = registered(allow_software=True)
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(KeyServerUnreachable, match="cannot be reached"):
        ennclave.load(b.path, keyserver=dead)
    with ennclave.load(b.path, keyserver=server.url) as m:
        server.stop()  # a started model keeps working within its licence
        assert m.predict(np.ones((2, 8), np.float32)).shape == (2, 5)


@needs_worker
def test_split_with_keyserver_registers_and_never_writes_the_key(server, tmp_path, monkeypatch):
    keras = pytest.importorskip("keras")
    from ennclave.split import split_model

    inp = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu", trainable=False)(inp)
    out = keras.layers.Dense(3)(h)
    model = keras.Model(inp, out)
    model.save(tmp_path / "m.keras")
    ks_file = tmp_path / "should-not-exist.json"
    res = split_model(
        tmp_path / "m.keras",
        "auto",
        tmp_path / "bundle",
        keystore=ks_file,
        keyserver=server.url,
        keyserver_policy={"allow_software": True},
    )
    assert not ks_file.exists()
    priv = res.manifest["private"]
    assert priv["key_source"] == "keyserver" and priv["keyserver"] == {"url": server.url}
    assert priv["licence"] == "required"
    x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    with ennclave.load(tmp_path / "bundle") as m:  # URL from the manifest
        np.testing.assert_allclose(m.predict(x), model(x).numpy(), atol=1e-4)
    with _admin(server) as a:
        assert a.get(res.key_id)["manifest_sha256"] == _digest(tmp_path / "bundle")


SCAN = textwrap.dedent(
    r"""
    import json, sys
    import numpy as np
    import ennclave

    bundle, url, a_hex, b_hex = sys.argv[1:5]
    half_a, half_b = bytes.fromhex(a_hex), bytes.fromhex(b_hex)
    del a_hex, b_hex
    sys.argv[3] = sys.argv[4] = ""

    sys.path.insert(0, TESTS_DIR)
    from support.memscan import scan_self as scan

    with ennclave.load(bundle, keyserver=url) as m:
        y = m.predict(np.ones((8, 8), np.float32))
        found = scan(half_a, half_b)
    after_close = scan(half_a, half_b)
    c1, c2 = bytes(range(100, 116)), bytes(range(200, 216))
    planted = bytearray(c1) + bytearray(c2)
    print(json.dumps({"found": found, "after_close": after_close, "control": scan(c1, c2)}))
    """
).replace("TESTS_DIR", repr(str(Path(__file__).resolve().parent)))


@needs_worker
def test_host_process_never_holds_the_data_key(registered, server):
    """Key-server mode: a fresh host process loads and runs the bundle; its memory never
    contains the 32-byte data key (it only relays the HPKE-wrapped key)."""
    b = registered(allow_software=True)
    a_hex, b_hex = b.data_key[:16].hex(), b.data_key[16:].hex()
    r = subprocess.run(
        [sys.executable, "-c", SCAN, str(b.path), server.url, a_hex, b_hex],
        capture_output=True,
        text=True,
        timeout=300,
        env=server.env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["control"] >= 1, res
    assert res["found"] == 0 and res["after_close"] == 0, res


def test_openapi_schema_is_current():
    """docs/keyserver-openapi.json is generated by `python -m ennclave.keyserver.openapi`."""
    from ennclave.keyserver.app import openapi_schema

    want = json.loads((REPO / "docs" / "keyserver-openapi.json").read_text())
    assert openapi_schema() == want, "regenerate: python -m ennclave.keyserver.openapi"


# ------------------------------------------------------------------ the worker enforces the licence


def _mint(b, hello, **over) -> seal.WrappedKey:
    """What the key server sends (a licence MACed under the data key), made with the
    test's copy of the key so that every field can be chosen."""
    now = int(time.time())
    fields = dict(
        key_id=b.key_id,
        issued_at=now,
        expires_at=now + 600,
        query_budget=None,
        pubkey=hello.pubkey.hex(),
        binary_sha256=hello.binary_sha256,
        client_id="ab" * 32,
        offline=False,
        evidence="software",
    )
    fields.update(over)
    lic = Licence.new(**fields)
    wk = seal.wrap_data_key(hello.pubkey, b.data_key, b.key_id)
    return seal.WrappedKey(
        wk.key_id,
        wk.enc,
        wk.wrapped,
        licence=lic.to_bytes(),
        licence_mac=licence_mac(b.data_key, lic),
    )


class _Release:
    """A key release that mints licences (see `_mint`) and keeps KEY_CACHE blobs."""

    def __init__(self, b, **over) -> None:
        self.b, self.over, self.caches = b, over, []

    def __call__(self, hello):
        return _mint(self.b, hello, **self.over)

    def store_key_cache(self, key_id, blob):
        self.caches.append((key_id, blob))


def _local(tmp_path, name="w", **kw):
    b = write_bundle(tmp_path / name, tmp_path / f"{name}-ks.json", **kw)
    b.data_key = Keystore(b.keystore).get(b.key_id)
    return b


def _client(b, release, **kw) -> wmod.WorkerClient:
    """The worker driven directly: no EnclavedModel, no host-side licence check."""
    return wmod.WorkerClient(
        (b.path / "manifest.json").read_bytes(),
        b.path / "private.sealed",
        release,
        in_len=8,
        out_len=5,
        **kw,
    )


X1 = np.ones((1, 8), np.float32)


@needs_worker
def test_worker_enforces_the_licence_budget_from_a_real_release(registered, server):
    """A real key-server release, the worker driven directly (no host-side check): exactly
    N samples, then ERROR 4, non-fatal. Also through a model whose host check is off.
    The key's total is 6 in slices of 3: each worker gets one slice."""
    b = registered(allow_software=True, query_budget=6, budget_slice=3)
    relay = KeyserverRelease(server.url, b.key_id, _digest(b.path))
    wc = _client(b, relay, start=False)
    relay.bind(wc)
    try:
        wc.start()
        assert "licence_budget:3" in wc.ready.policy
        wc.infer(np.ones((2, 8), np.float32))
        wc.infer(X1)
        with pytest.raises(QueryBudgetExhausted, match="licence's query budget of 3") as e:
            wc.infer(X1)
        assert e.value.code == 4 and not e.value.fatal
        assert wc.ping() == {"queries_used": 3}  # still serving
        with pytest.raises(ennclave.errors.EnnclaveError, match="only during"):
            wc.evidence_for(b"\0" * 32)  # not outside a key release
    finally:
        wc.close()
    with ennclave.load(b.path, keyserver=server.url) as m:  # a "modified host"
        m._relay.spend = lambda *a, **k: None
        m.predict(np.ones((3, 8), np.float32))
        with pytest.raises(QueryBudgetExhausted, match="licence's"):
            m.predict(X1)


@needs_worker
def test_worker_budget_is_the_tighter_of_manifest_and_licence(tmp_path):
    b = _local(tmp_path, policy={"mode": "full", "max_queries": 2})
    with _client(b, _Release(b, query_budget=5)) as wc:
        wc.infer(np.ones((2, 8), np.float32))
        with pytest.raises(QueryBudgetExhausted, match="bundle's query budget of 2"):
            wc.infer(X1)
    b = _local(tmp_path, "w2", policy={"mode": "full", "max_queries": 9})
    with _client(b, _Release(b, query_budget=1)) as wc:
        wc.infer(X1)
        with pytest.raises(QueryBudgetExhausted, match="licence's query budget of 1"):
            wc.infer(X1)


@needs_worker
def test_worker_refuses_inference_after_licence_expiry(tmp_path):
    b = _local(tmp_path)
    expires = int(time.time()) + 2
    with _client(b, _Release(b, expires_at=expires)) as wc:
        assert f"licence_expires_at:{expires}" in wc.ready.policy
        wc.infer(X1)
        time.sleep(max(0.0, expires - time.time()) + 0.1)
        with pytest.raises(LicenceError, match="expired") as e:
            wc.infer(X1)
        assert e.value.code == 12 and not e.value.fatal
        wc.ping()  # the worker keeps running, it only refuses to infer


@needs_worker
def test_worker_refuses_to_start_with_a_forged_or_foreign_licence(registered, server, tmp_path):
    # a real release whose licence the host changed (budget 2 → 2000), MAC kept
    b = registered(allow_software=True, query_budget=2)
    relay = KeyserverRelease(server.url, b.key_id, _digest(b.path))

    def forge(hello):
        wk = relay(hello)
        d = json.loads(wk.licence)
        d["query_budget"] = 2000
        raw = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return seal.WrappedKey(wk.key_id, wk.enc, wk.wrapped, raw, wk.licence_mac)

    wc = _client(b, forge, start=False)
    relay.bind(wc)
    with pytest.raises(LicenceError, match="does not authenticate") as e:
        wc.start()
    assert e.value.code == 13 and e.value.fatal and wc.pid is None
    wc.close()

    lb = _local(tmp_path, "l")
    other = hashlib.sha256(b"another worker").hexdigest()
    for over, match in [
        ({"pubkey": os.urandom(32).hex()}, "another worker key"),
        ({"binary_sha256": other}, "another worker binary"),
        ({"expires_at": int(time.time()) - 1}, "expired"),
    ]:
        with pytest.raises(LicenceError, match=match):
            _client(lb, _Release(lb, **over))

    def no_mac(hello):  # a licence MACed under another key
        wk = _mint(lb, hello)
        return seal.WrappedKey(wk.key_id, wk.enc, wk.wrapped, wk.licence, os.urandom(32))

    with pytest.raises(LicenceError, match="does not authenticate"):
        _client(lb, no_mac)


@needs_worker
def test_keyserver_bundle_needs_a_licence(tmp_path):
    b = _local(tmp_path, key_source="keyserver")
    release = wmod.local_key_release(Keystore(b.keystore), b.key_id)  # key, no licence
    with pytest.raises(LicenceError, match="needs its licence"):
        _client(b, release)
    with _client(b, _Release(b)) as wc:  # with a valid licence it serves
        assert wc.infer(X1).shape == (1, 5)


@needs_worker
def test_licence_required_bundle_needs_a_licence_whatever_its_key_source(tmp_path):
    """`private.licence: "required"` with `key_source: "local"` (issue #14): the key
    alone is refused; with a valid licence it serves and the licence is enforced."""
    b = _local(tmp_path, licence="required")
    release = wmod.local_key_release(Keystore(b.keystore), b.key_id)  # key, no licence
    with pytest.raises(LicenceError, match="needs its licence") as e:
        _client(b, release)
    assert e.value.code == 13 and e.value.fatal
    with _client(b, _Release(b, query_budget=1)) as wc:
        assert "licence_budget:1" in wc.ready.policy
        wc.infer(X1)
        with pytest.raises(QueryBudgetExhausted, match="licence's query budget of 1"):
            wc.infer(X1)
    n = _local(tmp_path, "n", licence="none")  # explicitly none: a local-key bundle
    with _client(n, wmod.local_key_release(Keystore(n.keystore), n.key_id)) as wc:
        assert wc.infer(X1).shape == (1, 5)
    odd = _local(tmp_path, "odd", licence="optional")  # unknown: refused, even with one
    for rel in (wmod.local_key_release(Keystore(odd.keystore), odd.key_id), _Release(odd)):
        with pytest.raises(ennclave.errors.BundleError, match=r"private\.licence"):
            _client(odd, rel)


# ------------------------------------------------------------------ offline key cache


@needs_worker
def test_offline_licence_cache_serves_when_the_server_is_down(registered, server, tmp_path):
    from ennclave.keyserver import cache

    with pytest.raises(KeyReleaseRefused, match="cannot allow offline licences"):
        registered("nope", allow_software=True, offline=True, query_budget=4)  # a cache resets it
    b = registered(allow_software=True, offline=True)
    x = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
    with ennclave.load(b.path, keyserver=server.url) as m:
        want = m.predict(x)
        assert m.licence.offline
    path = cache.cache_path(b.key_id)
    assert path.is_file() and (path.stat().st_mode & 0o777) == 0o600
    stored = path.read_bytes()
    assert b.data_key not in stored and base64.b64encode(b.data_key) not in stored
    assert b.data_key.hex().encode() not in stored

    server.stop()
    with ennclave.load(b.path, keyserver=server.url) as m:  # offline restart
        np.testing.assert_array_equal(m.predict(x), want)
        assert m.licence.query_budget is None  # offline licences are never metered

    # the worker opens the cache without the host's help
    blob = cache.load(b.key_id)["blob"]
    with _client(b, lambda hello: seal.CachedKey(b.key_id, blob)) as wc:
        assert "licence_expires_at" in wc.ready.policy and "licence_budget" not in wc.ready.policy
        assert wc.infer(X1).shape == (1, 5)

    # tampered cache → refused by the worker
    d = json.loads(stored)
    raw = bytearray(base64.b64decode(d["blob"]))
    raw[40] ^= 1
    path.write_text(json.dumps(dict(d, blob=base64.b64encode(bytes(raw)).decode())))
    with pytest.raises(LicenceError, match="does not open"):
        ennclave.load(b.path, keyserver=server.url)
    # no cache at all → the server is just unreachable
    path.unlink()
    with pytest.raises(KeyServerUnreachable):
        ennclave.load(b.path, keyserver=server.url)


@needs_worker
def test_offline_cache_expires_and_binds_binary_and_offline_flag(tmp_path):
    b = _local(tmp_path)
    plain = _Release(b)  # offline: false → no cache
    with _client(b, plain):
        pass
    assert plain.caches == []
    expires = int(time.time()) + 3
    rel = _Release(b, offline=True, expires_at=expires)
    with _client(b, rel):
        pass
    [(kid, blob)] = rel.caches
    assert kid == b.key_id and b.data_key not in blob
    cached = lambda hello: seal.CachedKey(b.key_id, blob)
    with _client(b, cached) as wc:  # a fresh worker opens it (before expiry)
        wc.infer(X1)
    # another worker binary (same code, one byte appended) cannot open it
    other = tmp_path / "other-worker"
    other.write_bytes(Path(WORKER).read_bytes() + b"\0")
    other.chmod(0o755)
    with pytest.raises(LicenceError, match="does not open"):
        _client(b, cached, binary=other)
    # after expiry the worker refuses to start from it
    time.sleep(max(0.0, expires - time.time()) + 0.1)
    with pytest.raises(LicenceError, match="expired") as e:
        _client(b, cached)
    assert e.value.code == 12 and e.value.fatal
