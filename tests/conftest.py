"""Shared pytest fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
try:  # not installed (development checkout): use the source tree
    import ennclave  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))


@pytest.fixture
def enclave_bundle(tmp_path):
    """A sealed 2-layer dense bundle (public=None) with its key in a tmp keystore."""
    from support.enclave_bundle import write_bundle

    return write_bundle(tmp_path / "bundle", tmp_path / "keystore.json")


@pytest.fixture
def make_enclave_bundle(tmp_path):
    """Factory: make_enclave_bundle(name, policy=..., seed=...) -> enclave_bundle.Bundle."""
    from support.enclave_bundle import write_bundle

    def make(name: str = "b", **kw):
        return write_bundle(tmp_path / name, tmp_path / "keystore.json", **kw)

    return make
