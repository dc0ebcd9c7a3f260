"""Runs every script in attacks/: each exits 0 only when its attack failed as the
security claim says (docs/threat-model.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from support.enclave_bundle import needs_worker

ATTACKS = Path(__file__).resolve().parents[1] / "attacks"
SCRIPTS = sorted(p for p in ATTACKS.glob("*.py") if not p.name.startswith("_"))


def test_there_are_attacks() -> None:
    assert len(SCRIPTS) >= 2


@needs_worker
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_attack_fails(script: Path) -> None:
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"{script.name}:\n{run.stdout}\n{run.stderr}"
    assert "the attack failed, as it should" in run.stdout
