"""Owner-side sealing and the keystore (the host never unseals; see unseal_for_tests)."""

from __future__ import annotations

import json
import os
import stat

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ennclave.errors import EnnclaveError, KeyNotFound
from ennclave.keystore import Keystore
from ennclave.seal import SEAL_MAGIC, canonical_manifest, new_data_key, seal_container

MANIFEST = {
    "format": "ennclave-bundle",
    "version": 1,
    "private": {"key_id": "k", "shape": [None, 4], "name": 'é\n"x\\'},
    "output_policy": {"mode": "top_k", "k": 3},
    "integrity": {"files": {"private.sealed": "ab"}},
}


def unseal_for_tests(sealed: bytes, manifest: dict, key: bytes) -> bytes:
    """Test-only: the host never decrypts (the worker does, in docs/bundle.md's layout)."""
    assert sealed[:8] == SEAL_MAGIC
    return AESGCM(key).decrypt(sealed[8:20], sealed[20:], canonical_manifest(manifest))


def test_canonical_manifest_is_sorted_compact_and_drops_integrity():
    aad = canonical_manifest(MANIFEST)
    assert b"integrity" not in aad
    assert aad == (
        b'{"format":"ennclave-bundle","output_policy":{"k":3,"mode":"top_k"},'
        b'"private":{"key_id":"k","name":"\xc3\xa9\\n\\"x\\\\","shape":[null,4]},"version":1}'
    )
    # independent of key order and whitespace of the input
    shuffled = json.loads(json.dumps(dict(reversed(list(MANIFEST.items())))))
    assert canonical_manifest(shuffled) == aad


def test_canonical_manifest_refuses_floats():
    with pytest.raises(ValueError):
        canonical_manifest({"output_policy": {"decimals": 2.0}})
    canonical_manifest({"integrity": {"x": 1.5}, "a": 1})  # integrity is not authenticated


def test_round_trip_and_tamper_detection():
    key = new_data_key()
    assert len(key) == 32 and key != new_data_key()
    container = b"ENCPROG1" + os.urandom(1000)
    sealed = seal_container(container, MANIFEST, key)
    assert sealed[:8] == b"ENCSEAL1" and len(sealed) == 8 + 12 + len(container) + 16
    assert container not in sealed
    assert unseal_for_tests(sealed, MANIFEST, key) == container
    # fresh nonce per seal
    assert seal_container(container, MANIFEST, key)[8:20] != sealed[8:20]
    # any ciphertext / nonce / tag bit flip
    for pos in (8, 19, 20, 500, len(sealed) - 1):
        bad = bytearray(sealed)
        bad[pos] ^= 1
        with pytest.raises(InvalidTag):
            unseal_for_tests(bytes(bad), MANIFEST, key)
    # an authenticated manifest field changed
    m2 = json.loads(json.dumps(MANIFEST))
    m2["output_policy"]["mode"] = "full"
    with pytest.raises(InvalidTag):
        unseal_for_tests(sealed, m2, key)
    # integrity is not authenticated
    m3 = json.loads(json.dumps(MANIFEST))
    m3["integrity"]["files"]["private.sealed"] = "cd"
    assert unseal_for_tests(sealed, m3, key) == container
    with pytest.raises(InvalidTag):
        unseal_for_tests(sealed, MANIFEST, new_data_key())
    with pytest.raises(ValueError):
        seal_container(container, MANIFEST, b"short")


def test_keystore_put_get_perms_and_repr(tmp_path, caplog):
    path = tmp_path / "sub" / "keystore.json"
    ks = Keystore(path)
    key = new_data_key()
    ks.put("id1", key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ks.get("id1") == key
    assert "id1" in ks and ks.key_ids() == ["id1"]
    assert key.hex() not in repr(ks) and str(path) in repr(ks)
    ks.put("id2", new_data_key())
    assert Keystore(path).get("id1") == key  # survives reopen, earlier keys kept
    assert not [
        p
        for p in path.parent.iterdir()
        if p.name.startswith(".keystore.") and not p.name.endswith(".lock")
    ]
    with pytest.raises(KeyNotFound, match="not in the keystore"):
        ks.get("nope")
    with pytest.raises(ValueError):
        ks.put("id3", b"short")
    os.chmod(path, 0o644)
    with pytest.raises(EnnclaveError, match="readable by other users"):
        ks.get("id1")
    os.chmod(path, 0o600)
    path.write_text("[not json")
    os.chmod(path, 0o600)
    with pytest.raises(EnnclaveError, match="damaged"):
        ks.get("id1")
    assert key.hex() not in caplog.text


def test_keystore_default_path_uses_platformdirs(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    from ennclave.keystore import default_keystore_path

    assert default_keystore_path() == tmp_path / "ennclave" / "keystore.json"
