"""The worker's fp32 kernel families (`ENNCLAVE_KERNEL`, enclave/src/ops/dense.rs
`Isa`), so that tests can run every op on each one this CPU has."""

from __future__ import annotations

from pathlib import Path

import pytest

from ennclave.runtime.worker import KERNEL_FAMILIES

KERNELS = list(KERNEL_FAMILIES)
# The /proc/cpuinfo flags each family needs (the worker checks the same with CPUID).
_NEEDS = {"avx512": {"avx512f"}, "avx2": {"avx2", "fma"}, "portable": set()}


def _flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next(
        (set(ln.split(":", 1)[1].split()) for ln in text.splitlines() if ln.startswith("flags")),
        set(),
    )


def available() -> list[str]:
    """The families this CPU can run, best first."""
    flags = _flags()
    return [k for k in KERNELS if _NEEDS[k] <= flags]


def best() -> str:
    return available()[0]


def use(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make workers started from now on run `kernel` (skip where the CPU lacks it: the
    worker would fall back to the next family down, and the test would repeat)."""
    if kernel not in available():
        pytest.skip(f"this CPU cannot run the {kernel} kernels")
    monkeypatch.delenv("ENNCLAVE_NO_AVX512", raising=False)
    monkeypatch.setenv("ENNCLAVE_KERNEL", kernel)
