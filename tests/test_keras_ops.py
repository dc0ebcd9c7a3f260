"""Every supported Keras layer, lowered to the enclave program, matches Keras itself."""

from __future__ import annotations

import numpy as np
import pytest

from ennclave.adapters.keras import KerasAdapter
from ennclave.graph import find_cut_points
from ennclave.passes import optimize
from ennclave.reference import execute
from support.op_cases import CASES


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_matches_keras(case):
    model = CASES[case]()
    adapter = KerasAdapter.from_model(model)
    program = optimize(adapter.lower_private(find_cut_points(adapter.graph)[0]))
    x = (adapter.random_inputs(6, np.random.default_rng(0)) - 0.5) * 4  # both signs
    expected = np.asarray(model(x, training=False))
    got = execute(program, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)
    # The test must be able to fail: a perturbed weight changes the answer.
    if program.weights:
        key = max(program.weights, key=lambda k: program.weights[k].size)
        perturbed = program.weights[key].copy()
        perturbed.flat[0] += 0.5  # one element: a uniform shift can cancel (softmax)
        program.weights[key] = perturbed
        assert not np.allclose(execute(program, x), expected, atol=1e-5)
