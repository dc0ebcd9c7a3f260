"""The owner's token and clients of several servers: a second `ennclave keyserver` on
a port in use fails without touching the first's saved token (it once overwrote it,
locking the owner out for good); the owner config keeps one entry per server URL and
`ennclave keys` uses the entry of the URL it talks to; `--keyserver` takes several
URLs and a client moves on to the next when one cannot be reached."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from ennclave.keyserver.client import KeyServerClient, KeyServerUnreachable
from support.keyserver_util import KeyServerProc, SoftwareWorker, free_port, release

MANIFEST = "cd" * 32


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    d = tmp_path / "cfg"
    monkeypatch.setenv("ENNCLAVE_CONFIG_DIR", str(d))
    monkeypatch.delenv("ENNCLAVE_KEYSERVER_TOKEN", raising=False)
    return d


def _owner_file(cfg) -> bytes:
    return (cfg / "keyserver-owner.json").read_bytes()


def test_a_second_server_on_a_used_port_changes_nothing(tmp_path, cfg, keyserver_db):
    first = KeyServerProc(keyserver_db, cfg).start()
    try:
        saved = _owner_file(cfg)
        second = KeyServerProc(str(tmp_path / "other.db"), cfg, port=first.port)
        r = subprocess.run(second.argv, env=second.env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert "Cannot listen" in r.stderr and "Nothing was changed" in r.stderr
        assert _owner_file(cfg) == saved  # the first server's token is untouched
        assert not (tmp_path / "other.db").exists()  # nor was a database made
        with KeyServerClient(first.url, first.token) as c:
            assert c.list() == []  # the owner still gets in
    finally:
        first.stop()


def test_one_config_entry_per_server_and_keys_uses_the_one_it_talks_to(
    tmp_path, cfg, keyserver_db, capsys
):
    from ennclave.cli import main

    a = KeyServerProc(keyserver_db, cfg).start()
    b = KeyServerProc(str(tmp_path / "b.db"), cfg).start()  # another database: its own token
    try:
        servers = json.loads(_owner_file(cfg))["servers"]
        assert set(servers) == {a.url, b.url} and a.token != b.token
        for s in (a, b):
            assert main(["keys", "list", "--keyserver", s.url, "--json"]) == 0
            assert json.loads(capsys.readouterr().out) == []
        with KeyServerClient(a.url, a.token) as c:
            c.register("only-on-a", os.urandom(32), MANIFEST, {})
        assert main(["keys", "show", "only-on-a", "--keyserver", a.url, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["key_id"] == "only-on-a"
        assert main(["keys", "show", "only-on-a", "--keyserver", b.url]) == 2
        assert "unknown_bundle" in capsys.readouterr().err  # b's token, b's answer
    finally:
        b.stop()
        a.stop()


def test_clients_fail_over_to_the_next_url(tmp_path, cfg, keyserver_db, capsys):
    from ennclave.cli import main

    a = KeyServerProc(keyserver_db, cfg, extra=["--rate", "0"]).start()
    b = KeyServerProc(keyserver_db, cfg, extra=["--rate", "0"]).start()  # a replica
    dead = f"http://127.0.0.1:{free_port()}"
    try:
        with KeyServerClient(f"{dead},{a.url}", a.token) as c:
            c.register("k", os.urandom(32), MANIFEST, {"allow_software": True})
            assert c.url == a.url  # it stays with the one that answered
        # the command line: repeated and comma-separated, the dead one first
        assert main(["keys", "list", "--keyserver", dead, "--keyserver", f"{b.url},{a.url}"]) == 0
        assert "k" in capsys.readouterr().out
        # key requests: one replica goes away, the client carries on with the other
        w = SoftwareWorker()
        with KeyServerClient([a.url, b.url]) as c:
            nonce = c.challenge("k")
            assert c.release(w.body("k", nonce, MANIFEST))["key_id"] == "k"
            a.stop()
            nonce = c.challenge("k")
            assert c.release(w.body("k", nonce, MANIFEST))["key_id"] == "k"
            assert c.url == b.url
        with pytest.raises(KeyServerUnreachable, match="cannot be reached"):
            with KeyServerClient(f"{dead},{a.url}") as c:
                c.challenge("k")
        assert release(b.url, "k", MANIFEST, w) == (200, "granted")
    finally:
        b.stop()
        a.stop()
