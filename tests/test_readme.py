"""The README cannot drift from the code: its command-line example block, the commands
`ennclave demo` prints, and its Python API snippet all run here, on the demo's model in
a temporary directory. The commands run in-process (`ennclave.cli.main`), so TensorFlow
is imported once."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from ennclave import cli
from support.enclave_bundle import needs_worker

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def _commands(block: str) -> list[list[str]]:
    """Each `ennclave …` line as an argv without the program name."""
    argvs = [shlex.split(line, comments=True) for line in block.splitlines()]
    assert all(a[0] == "ennclave" for a in argvs if a), block
    return [a[1:] for a in argvs if a]


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, f"ennclave {shlex.join(argv)} exited with {rc}: {err}"
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("readme")


@needs_worker
def test_command_line_examples_and_the_demos_next_commands(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("XDG_DATA_HOME", str(workdir / "data"))  # never the user's keystore
    (block,) = _blocks(_section("Command line"), "bash")
    commands = _commands(block)
    assert commands[0][0] == "demo", "the example block starts with the demo it uses"
    demo_out = _run(capsys, commands[0])
    assert "Its data key is in the keystore demo/keystore.json" in demo_out
    with np.load("demo/queries.npz") as q:
        assert list(q) == ["x"]  # the audit below takes the attacker's inputs alone
    for argv in commands[1:]:
        _run(capsys, argv)
    assert np.load("y.npy").shape == (16,)  # a label bundle: one class per sample
    assert Path("bench.json").exists()

    # The three commands the demo ends with work exactly as printed.
    printed = demo_out.split("try next:\n", 1)[1].strip().splitlines()
    assert [shlex.split(line)[1] for line in printed] == ["run", "bench", "audit"]
    for line in printed:
        _run(capsys, shlex.split(line)[1:])
    assert np.load("demo/predictions.npy").shape == (16, 4)


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def test_command_table_names_only_real_options():
    """Every `--option` in the command table exists on that (sub)command."""
    parser = cli.build_parser()
    (subs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    rows = re.findall(r"^\| `ennclave (\w+)([^`]*)`", _section("Command line"), re.M)
    listed = {name for name, _ in rows}
    assert listed == set(subs.choices), (
        f"README's command table lacks {sorted(set(subs.choices) - listed)} "
        f"or lists unknown {sorted(listed - set(subs.choices))}"
    )
    for name, synopsis in rows:
        sub = subs.choices[name]
        known = _options(sub)
        for inner in sub._actions:  # `keys` has its own subcommands
            if isinstance(inner, argparse._SubParsersAction):
                known |= {s for p in inner.choices.values() for s in _options(p)}
        used = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*|-o)\b", synopsis))
        assert used <= known, f"README's `ennclave {name}` row names unknown {used - known}"


@needs_worker
def test_python_api_snippet(workdir, monkeypatch):
    d = workdir / "api"
    d.mkdir()
    demo = workdir / "demo"
    if not (demo / "demo.keras").exists():  # run alone: make the demo's files
        assert cli.main(["demo", "--out", str(demo)]) == 0
    shutil.copy(demo / "demo.keras", d / "model.keras")
    shutil.copy(demo / "sample_input.npy", d / "sample_input.npy")
    monkeypatch.chdir(d)
    monkeypatch.setenv("XDG_DATA_HOME", str(d / "data"))  # the snippet's default keystore
    (snippet,) = _blocks(_section("Python API"), "python")
    scope: dict[str, object] = {}
    exec(compile(snippet, "README.md (Python API)", "exec"), scope)
    assert scope["y"].shape == (16, 4) and scope["plan"].recommended is not None
    assert (d / "data" / "ennclave" / "keystore.json").exists()
