"""fgrpo.federation.aggregation's default weight cap (w_max = "auto"); the rest of the weight math is tested in test_strategies."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fgrpo.federation.aggregation import aggregation_weights, auto_weight_cap, weight_cap


def test_auto_weight_cap_by_hand():
    assert auto_weight_cap(1) == 1.0  # alone: all the weight
    assert auto_weight_cap(2) == 0.5  # a cap below ½ is infeasible: both get ½
    assert auto_weight_cap(3) == 0.5  # min(½, 1.5/3)
    assert auto_weight_cap(4) == pytest.approx(0.375)  # 1.5/4
    assert auto_weight_cap(10) == pytest.approx(0.15)
    with pytest.raises(ValueError, match="K >= 1"):
        auto_weight_cap(0)


def test_weight_cap_keeps_a_number_and_refuses_other_words():
    assert weight_cap("auto", 4) == pytest.approx(0.375)
    assert weight_cap(0.7, 4) == 0.7
    with pytest.raises(ValueError, match="'auto'"):
        weight_cap("max", 4)


@settings(max_examples=200, deadline=None)
@given(
    k=st.integers(1, 40),
    liar_gain=st.floats(-1e300, 1e300),
    data=st.data(),
)
def test_auto_cap_bounds_any_client_whatever_it_reports(k, liar_gain, data):
    """Under "auto" no client gets more than ½ (K ≥ 2) nor 1.5× an equal share; weights still sum to 1."""
    gains = data.draw(st.lists(st.floats(-10, 10), min_size=k - 1, max_size=k - 1)) + [liar_gain]
    sizes = data.draw(st.lists(st.integers(1, 1000), min_size=k, max_size=k))
    w = aggregation_weights(gains, sizes, 1.0, 0.0, "auto")
    assert math.isclose(w.sum(), 1.0, rel_tol=1e-9)
    assert w.max() <= auto_weight_cap(k) + 1e-12
    if k >= 2:
        assert w.max() <= 0.5 + 1e-12 and w.max() <= max(1.5 / k, 1 / k) + 1e-12


def test_two_clients_under_auto_get_equal_weights_whatever_their_gains_or_sizes():
    np.testing.assert_allclose(aggregation_weights([50.0, 0.0], [1, 99], 1.0, 0.0, "auto"), [0.5, 0.5])
    np.testing.assert_allclose(aggregation_weights([0.0, 0.0], [10, 30], math.inf, 0.0, "auto"), [0.5, 0.5])
    np.testing.assert_allclose(aggregation_weights([50.0, 0.0], [1, 99], 1.0, 0.0, 1.0), [1.0, 0.0], atol=1e-12)  # uncapped
