"""The owner token never needs to be on a command line (issue #14): --token-file and
ENNCLAVE_OWNER_TOKEN reach a real key server; --token still works but warns that other
users can read it in the process list."""

from __future__ import annotations

import pytest

from support.keyserver_util import KeyServerProc

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


@pytest.fixture
def lone_server(tmp_path, monkeypatch):
    """A key server whose token is NOT in this client's owner config."""
    ks = KeyServerProc(str(tmp_path / "keys.db"), tmp_path / "server-cfg", extra=["--rate", "0"])
    ks.config_dir.mkdir()
    ks.start()
    monkeypatch.setenv("ENNCLAVE_CONFIG_DIR", str(tmp_path / "client-cfg"))
    monkeypatch.delenv("ENNCLAVE_OWNER_TOKEN", raising=False)
    monkeypatch.delenv("ENNCLAVE_KEYSERVER_TOKEN", raising=False)
    yield ks
    ks.stop()


def test_token_from_file_env_or_argv(lone_server, tmp_path, monkeypatch, capsys):
    from ennclave.cli import main

    url = ["--keyserver", lone_server.url]
    assert main(["keys", "list", *url]) == 2  # no token anywhere
    assert "--token-file" in capsys.readouterr().err

    token_file = tmp_path / "owner.token"
    token_file.write_text(lone_server.token + "\n")
    assert main(["keys", "list", *url, "--token-file", str(token_file)]) == 0
    captured = capsys.readouterr()
    assert "No keys registered" in captured.out and "warning" not in captured.err

    token_file.write_text("not-the-token")
    assert main(["keys", "list", *url, "--token-file", str(token_file)]) == 2
    capsys.readouterr()
    assert main(["keys", "list", *url, "--token-file", str(tmp_path / "none")]) == 2
    assert "cannot be read" in capsys.readouterr().err

    monkeypatch.setenv("ENNCLAVE_OWNER_TOKEN", lone_server.token)
    assert main(["keys", "list", *url]) == 0
    monkeypatch.delenv("ENNCLAVE_OWNER_TOKEN")

    # --token=VALUE: a token may start with "-", which argparse would read as an option
    assert main(["keys", "list", *url, f"--token={lone_server.token}"]) == 0
    assert "visible to other users" in capsys.readouterr().err


def test_hardware_policy_flags_reach_the_key(lone_server, tmp_path, capsys):
    """`keys policy` pins measurements per kind; the server keeps them in the key's
    policy sections (attest/policy.py decides releases with them)."""
    import json

    from ennclave.cli import main
    from support.enclave_bundle import write_bundle

    token = tmp_path / "owner.token"
    token.write_text(lone_server.token)
    auth = ["--keyserver", lone_server.url, "--token-file", str(token)]
    b = write_bundle(tmp_path / "b", tmp_path / "ks.json", licence="required")
    assert main(["keys", "register", str(b.path), "--keystore", str(b.keystore), *auth]) == 0
    mrtd, rtmr, meas = "ab" * 48, "cd" * 48, "EF" * 48
    argv = ["keys", "policy", b.key_id, *auth, "--tdx-mrtd", mrtd, "--tdx-rtmr", f"2={rtmr}"]
    argv += ["--snp-measurement", meas, "--accept-tcb", "SWHardeningNeeded"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["keys", "show", b.key_id, "--json", *auth]) == 0
    out = capsys.readouterr().out
    policy = json.loads(out[out.index("{") :])["policy"]
    assert policy["tdx"]["mrtds"] == [mrtd] and policy["tdx"]["rtmrs"] == {"2": rtmr}
    assert policy["snp"]["measurements"] == [meas.lower()]
    assert "SWHardeningNeeded" in policy["sgx"]["accepted_tcb_statuses"]
    assert not policy["tdx"].get("allow_debug")  # debug stays forbidden
    assert main(["keys", "policy", b.key_id, *auth, "--tdx-rtmr", "7=00"]) == 2
