"""The command line's promise: every foreseeable failure is one plain sentence saying what
to do, with exit status 2, and the cheap ones are found before any framework loads.

Most commands run in-process (`ennclave.cli.main`): TensorFlow is imported once for the
whole module. Missing optional dependencies and the start-up checks run in a subprocess,
where modules can be hidden and imports observed.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ennclave import cli
from support.enclave_bundle import needs_worker

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A 5-class Keras model, a bundle of it with a public part, inputs, and bad paths."""
    from support.keras_models import sequential_cnn

    d = tmp_path_factory.mktemp("cli")
    sequential_cnn().save(d / "m.keras")
    x = np.random.default_rng(0).standard_normal((4, 12, 12, 3)).astype(np.float32)
    np.save(d / "x.npy", x)
    x[0, 0, 0, 0] = np.nan
    np.save(d / "nan.npy", x)
    (d / "afile").write_text("not a bundle")
    (d / "full").mkdir()
    (d / "full" / "something").write_text("keep me")
    (d / "m.onnx").write_bytes(b"not really onnx")
    ks = d / "ks.json"
    argv = ["split", str(d / "m.keras"), "--cut", "flat", "-o", str(d / "b"), "--keystore", str(ks)]
    assert cli.main(argv) == 0
    return SimpleNamespace(dir=d, model=d / "m.keras", bundle=d / "b", keystore=ks, x=d / "x.npy")


def _main(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, " ".join(err.split())  # rich may wrap a long sentence: compare words


# (name, argv with {d} = the fixture's directory, exit status, the sentence's key words)
MESSAGES = [
    (
        "split onto an existing file",
        "split {d}/m.keras --cut auto -o {d}/afile",
        2,
        "{d}/afile is a file, not a directory; choose a new path for the bundle.",
    ),
    (
        "split below a file",
        "split {d}/m.keras --cut auto -o {d}/afile/b",
        2,
        "The bundle {d}/afile/b cannot be created: {d}/afile is a file, not a directory.",
    ),
    (
        "split into a non-empty directory mentions --overwrite",
        "split {d}/m.keras --cut auto -o {d}/full",
        2,
        "{d}/full already exists and is not empty; choose a new path, or pass --overwrite to "
        "replace it.",
    ),
    (
        "cut at the output layer is not called a skip connection",
        "split {d}/m.keras --cut fc2 -o {d}/new",
        2,
        "Cannot cut after 'fc2': it computes the model's output, so nothing would be left for "
        "the enclave; the last valid cut is 'drop' (index 7) (see `ennclave plan`).",
    ),
    (
        "top_k larger than the model's outputs is refused by split",
        "split {d}/m.keras --cut auto -o {d}/new --output-policy top_k:9",
        2,
        "--output-policy top_k:9 asks for more scores than the model's 5 outputs per sample; "
        "use a K from 1 to 5.",
    ),
    (
        "unknown output policy",
        "split {d}/m.keras --cut auto -o {d}/new --output-policy top_k:0",
        2,
        "Unknown output policy 'top_k:0'; use full, label, top_k:K (K ≥ 1) or round:D (D from 0 "
        "to 8).",
    ),
    (
        "missing model",
        "plan {d}/nope.keras",
        2,
        "The model {d}/nope.keras does not exist; check the path.",
    ),
    (
        "NaN input names the command-line flag",
        "run {d}/b --input {d}/nan.npy --output {d}/y.npy --keystore {d}/ks.json",
        2,
        "The input contains NaN or infinity; clean it, or pass allow_nonfinite=True "
        "(`ennclave run --allow-nonfinite`).",
    ),
    (
        "a missing --keystore file is not 'key not in it'",
        "run {d}/b --input {d}/x.npy --output {d}/y.npy --keystore {d}/nope.json",
        2,
        "The keystore {d}/nope.json does not exist; pass the keystore file `ennclave split` "
        "stored the data key in (default",
    ),
    (
        "run into a missing directory fails before predicting",
        "run {d}/b --input {d}/x.npy --output {d}/no/such/y.npy --keystore {d}/ks.json",
        2,
        "The output file {d}/no/such/y.npy cannot be written: the directory {d}/no/such does "
        "not exist; create it first.",
    ),
    (
        "not a bundle",
        "bench {d}/afile",
        2,
        "{d}/afile is not a bundle directory; pass the folder `ennclave split` wrote.",
    ),
    (
        "bench batch sizes",
        "bench {d}/b --batch-sizes 0,8",
        2,
        "--batch-sizes must be comma-separated positive integers, got '0,8'.",
    ),
    (
        "audit with a missing test set",
        "audit {d}/b --queries {d}/x.npy --test {d}/nope.npz",
        2,
        "The --test file {d}/nope.npz does not exist; check the path.",
    ),
    (
        "audit budgets",
        "audit {d}/b --queries {d}/x.npy --test {d}/x.npy --budgets 50,-1",
        2,
        "--budgets must be comma-separated positive integers, got '50,-1'.",
    ),
]


@needs_worker
@pytest.mark.parametrize(
    ("argv", "status", "sentence"), [m[1:] for m in MESSAGES], ids=[m[0] for m in MESSAGES]
)
def test_message(files, capsys, argv: str, status: int, sentence: str) -> None:
    d = str(files.dir)
    rc, _, err = _main(capsys, argv.format(d=d).split())
    assert rc == status, err
    if sentence.endswith("(default"):  # the rest is the platform's data directory
        assert err.startswith(f"error: {sentence.format(d=d)} "), err
    else:
        assert err == f"error: {sentence.format(d=d)}", err


@needs_worker
def test_run_output_gets_npy_suffix_and_says_so(files, capsys) -> None:
    out = files.dir / "o"
    argv = f"run {files.bundle} --input {files.x} --output {out} --keystore {files.keystore}"
    rc, stdout, _ = _main(capsys, argv.split())
    assert rc == 0 and f"predictions to {out}.npy" in stdout
    assert np.load(f"{out}.npy").shape == (4, 5) and not out.exists()


@needs_worker
def test_run_allow_nonfinite(files, capsys) -> None:
    d = files.dir
    argv = f"run {d}/b --input {d}/nan.npy --output {d}/n.npy --keystore {d}/ks.json"
    rc, _, err = _main(capsys, [*argv.split(), "--allow-nonfinite"])
    assert rc == 0, err


@pytest.mark.parametrize("budget", ["-5", "nan"])
def test_negative_budget_is_refused(capsys, budget: str) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "m.keras", "--budget", budget])
    assert e.value.code == 2
    assert f"argument --budget: must be a number ≥ 0, got '{budget}'" in capsys.readouterr().err


def test_unexpected_error_is_short_and_debug_shows_the_traceback(monkeypatch, capsys) -> None:
    def boom(args: argparse.Namespace) -> int:
        raise RuntimeError("something odd")

    monkeypatch.setattr(cli, "cmd_plan", boom)
    rc, _, err = _main(capsys, ["plan", "m.keras"])
    assert rc == 1 and "Traceback" not in err
    assert err == (
        "error: unexpected RuntimeError: something odd; rerun with --debug for the traceback, "
        "and please report it."
    )
    rc = cli.main(["plan", "m.keras", "--debug"])
    assert rc == 1 and "Traceback" in capsys.readouterr().err


def test_markup_is_not_interpreted(monkeypatch, capsys) -> None:
    def fails(args: argparse.Namespace) -> int:
        raise cli.InputError("install it with: pip install 'ennclave[keras]' or [bold]x[/].")

    monkeypatch.setattr(cli, "cmd_plan", fails)
    rc, _, err = _main(capsys, ["plan", "m.keras"])
    assert rc == 2 and err == "error: install it with: pip install 'ennclave[keras]' or [bold]x[/]."


def test_os_errors_are_one_sentence(monkeypatch, capsys) -> None:
    for exc, sentence in [
        (FileNotFoundError(2, "No such file", "/x/y"), "/x/y does not exist; check the path."),
        (
            PermissionError(13, "Permission denied", "/x"),
            "Permission denied for /x; check its permissions or choose another path.",
        ),
        (
            NotADirectoryError(20, "Not a directory", "/f/b"),
            "Part of the path /f/b is a file, not a directory; choose another path.",
        ),
    ]:

        def fails(args: argparse.Namespace, exc: Exception = exc) -> int:
            raise exc

        monkeypatch.setattr(cli, "cmd_plan", fails)
        assert _main(capsys, ["plan", "m.keras"])[::2] == (2, f"error: {sentence}")


def test_software_not_allowed_names_the_policy_command(monkeypatch) -> None:
    from ennclave.keyserver import client as kc

    class Server:
        def __init__(self, url: str, timeout: float = 10.0) -> None:
            self.url = url.split(",")[0]  # the one that answered

        def __enter__(self) -> Server:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def challenge(self, key_id: str) -> bytes:
            return b"\0" * 32

        def release(self, body: dict) -> dict:
            raise kc.KeyReleaseRefused(
                "The key server refused (403 software_not_allowed): no.",
                "software_not_allowed",
                403,
            )

    monkeypatch.setattr(kc, "KeyServerClient", Server)
    release = kc.KeyserverRelease("http://127.0.0.1:8470,http://10.0.0.2:8470", "k123", "00" * 32)
    release.bind(
        SimpleNamespace(
            evidence_for=lambda nonce: SimpleNamespace(
                kind="none", report=b"report", protections=b"{}"
            )
        )
    )
    with pytest.raises(kc.KeyReleaseRefused) as e:
        release(SimpleNamespace(pubkey=b"\1" * 32, binary_sha256="00" * 32))
    assert (e.value.status, e.value.code) == (403, "software_not_allowed")
    assert str(e.value) == (
        "The key server http://127.0.0.1:8470 refused key k123 to this worker: it runs without "
        "a TEE and the key's policy does not allow software workers; the owner can allow them "
        "with `ennclave keys policy k123 --allow-software --keyserver http://127.0.0.1:8470`."
    )


@needs_worker
def test_software_not_allowed_command_works_as_printed(files, tmp_path, monkeypatch, capsys):
    """A real key server refuses a software worker; the command in the sentence fixes it."""
    pytest.importorskip("fastapi")
    from support.keyserver_util import KeyServerProc

    config = tmp_path / "config"
    config.mkdir()
    monkeypatch.setenv("ENNCLAVE_CONFIG_DIR", str(config))
    server = KeyServerProc(str(tmp_path / "keys.db"), config).start()
    try:
        b = tmp_path / "b"
        split = ["split", str(files.model), "--cut", "flat", "-o", str(b)]
        assert _main(capsys, [*split, "--keyserver", server.url])[0] == 0
        key_id = json.loads((b / "manifest.json").read_text())["private"]["key_id"]
        run = ["run", str(b), "--input", str(files.x), "--output", str(tmp_path / "y.npy")]
        rc, _, err = _main(capsys, run)
        assert rc == 2, err
        found = re.search(r"`(ennclave keys policy [^`]+)`", err)
        assert found, err
        command = found.group(1)
        assert command == f"ennclave keys policy {key_id} --allow-software --keyserver {server.url}"
        assert _main(capsys, shlex.split(command)[1:])[0] == 0
        assert _main(capsys, run)[0] == 0
    finally:
        server.stop()


def _all_parsers(p: argparse.ArgumentParser, name: str = "ennclave"):
    yield name, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, sp in action.choices.items():
                yield from _all_parsers(sp, f"{name} {sub}")


def test_every_argument_has_help() -> None:
    missing = [
        f"{name} {a.dest}"
        for name, p in _all_parsers(cli.build_parser())
        for a in p._actions
        if not a.help and not isinstance(a, argparse._SubParsersAction)
    ]
    assert not missing
    helps = {name: p.format_help() for name, p in _all_parsers(cli.build_parser())}
    assert "keystore.json" in helps["ennclave run"]  # says where the default keystore is


def test_all_extra_includes_every_extra() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    (all_,) = extras["all"]
    assert set(all_.split("[")[1].rstrip("]").split(",")) == set(extras) - {
        "all",
        "test",
        "experiments",
    }


# -- in a subprocess ---------------------------------------------------------------------


def _hidden(modules: list[str], argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`ennclave ARGV` with `modules` made unimportable, as if not installed."""
    code = (
        "import sys\n"
        f"for m in {modules!r}: sys.modules[m] = None\n"
        "from ennclave.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=cwd, capture_output=True, text=True, timeout=120
    )


KERAS = ["keras", "tensorflow"]
MISSING = [
    (KERAS, "plan m.keras", "keras"),
    (["onnx", "onnxruntime"], "plan m.onnx", "onnx"),
    (["matplotlib"], "plan m.keras --plot p.png", "plot"),
    (KERAS, "split m.keras --cut auto -o new", "keras"),
    (["httpx"], "split m.keras --cut auto -o new --keyserver http://127.0.0.1:1", "server"),
    (KERAS, "run b --input x.npy --output y.npy --keystore ks.json", "keras"),
    (KERAS, "bench b --keystore ks.json", "keras"),
    (KERAS, "demo --out demo", "keras"),
    (["tensorflow"], "audit b --queries q.npz --test t.npz --keystore ks.json", "keras"),
    (["fastapi"], "keyserver --db keys.db", "server"),
    (["httpx"], "keys list --token t", "server"),
    (["httpx"], "keys show k --token t", "server"),
]


@needs_worker
@pytest.mark.parametrize(("hide", "argv", "extra"), MISSING, ids=[m[1] for m in MISSING])
def test_missing_dependency_is_one_sentence_with_its_extra(files, hide, argv, extra) -> None:
    x = np.zeros((3, 12, 12, 3), np.float32)
    np.savez(files.dir / "q.npz", x=x)
    np.savez(files.dir / "t.npz", x=x, y=np.zeros(3, np.int64))
    r = _hidden(hide, argv.split(), files.dir)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("error: This needs ") and lines[0].endswith(
        f"install it with: pip install 'ennclave[{extra}]'."
    ), lines[0]


def test_cheap_checks_come_before_any_framework_import(tmp_path: Path) -> None:
    (tmp_path / "m.keras").write_bytes(b"x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("keep")
    code = (
        "import sys\n"
        "from ennclave.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
        "sys.exit(rc)\n"
    )
    for argv in [
        "split m.keras --cut auto -o full",
        "plan m.keras --plot no/dir/p.png",
        "audit full --queries q.npz --test t.npz",
        "run full --input x.npy --output y.npy",
        "demo --out m.keras",
    ]:
        r = subprocess.run(
            [sys.executable, "-c", code, *argv.split()],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2 and r.stderr.startswith("error: "), (argv, r.stderr)


def test_tensorflow_start_up_logs_are_silenced(files) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "ennclave", "plan", "m.keras", "--json"],
        cwd=files.dir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    # absl's and TensorFlow's C++ log lines: "I0000 00:00:… port.cc:153] oneDNN custom …"
    logs = [
        line
        for line in r.stderr.splitlines()
        if re.match(r"[IWEF]\d{4} ", line) or "absl::InitializeLog" in line
    ]
    assert not logs, r.stderr


@pytest.mark.parametrize("keyserver", [False, True])
def test_split_max_queries_warns_that_it_counts_per_worker_start(capsys, tmp_path, keyserver):
    """Issue #14: a local-key bundle cannot be metered against its own host; the warning
    comes before the model is loaded (this one is not a model at all)."""
    model = tmp_path / "junk.keras"
    model.write_bytes(b"not a model")
    argv = ["split", str(model), "--cut", "0", "-o", str(tmp_path / "out")]
    ks = ["--keyserver", "http://127.0.0.1:9"] if keyserver else []
    rc, _, err = _main(capsys, [*argv, *ks, "--max-queries", "5"])
    assert rc != 0 and "warning: --max-queries is counted per worker start" in err
    flat = " ".join(err.split())
    if keyserver:
        assert "the key server's query budget: `ennclave keys policy KEY --query-budget N`" in flat
    else:
        assert "a local-key bundle cannot be metered against its own host" in flat
    rc, _, err = _main(capsys, [*argv, *ks])
    assert rc != 0 and "warning" not in err
