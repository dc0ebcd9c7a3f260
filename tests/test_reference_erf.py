"""The numpy reference's vectorised erf and erfc against Python's math.erf/erfc on a
dense grid, the split point, tiny and huge arguments and the special values."""

from __future__ import annotations

import math

import numpy as np

from ennclave.reference import _ERF_SPLIT, _erf, _erfc, apply_activation


def _grid() -> np.ndarray:
    s = _ERF_SPLIT
    near = np.nextafter(s, [0, np.inf])
    return np.concatenate(
        [np.linspace(-12, 12, 400_001), [0.0, -0.0, 5e-324, 1e-300, 1e-8, s, -s, *near, 27.0]]
    )


def test_erf_matches_math_erf() -> None:
    x = _grid()
    want = np.array([math.erf(v) for v in x])
    got = _erf(x)
    assert np.abs(got - want).max() <= 2e-15
    tiny = np.abs(x) < 1e-6  # erf(x) ≈ 2x/√π: relative accuracy there too
    np.testing.assert_allclose(got[tiny], want[tiny], rtol=1e-15, atol=0)
    np.testing.assert_array_equal(_erf(np.array([np.inf, -np.inf])), [1.0, -1.0])
    assert np.isnan(_erf(np.array([np.nan]))).all()


def test_erfc_matches_math_erfc_relatively() -> None:
    x = _grid()
    want = np.array([math.erfc(v) for v in x])
    got = _erfc(x)
    pos = want > 0
    assert (np.abs(got - want)[pos] / want[pos]).max() <= 1e-12
    np.testing.assert_array_equal(_erfc(np.array([np.inf, -np.inf])), [0.0, 2.0])


def test_exact_gelu_uses_it() -> None:
    x = np.linspace(-6, 6, 1001)
    want = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    got = apply_activation(x, {"fn": "gelu"})
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-15)
