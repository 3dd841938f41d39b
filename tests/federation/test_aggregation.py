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


def test_max_tilt_by_hand():
    # Four equal owners, the liar (0) reports a huge gain, the others 0: exp(g/τ) is bounded to c = 1.5.
    weights = aggregation_weights([1e9, 0.0, 0.0, 0.0], [1, 1, 1, 1], temperature=0.7, max_tilt=1.5)
    assert weights == pytest.approx([1.5 / 4.5, 1 / 4.5, 1 / 4.5, 1 / 4.5])
    # Gains inside ±τ·ln c are left alone: the same weights as without the bound.
    small = [0.1, -0.1, 0.05, 0.0]
    assert aggregation_weights(small, [3, 1, 2, 2], 0.7, max_tilt=1.5) == pytest.approx(
        aggregation_weights(small, [3, 1, 2, 2], 0.7)
    )


@settings(max_examples=200, deadline=None)
@given(
    gains=st.lists(st.floats(-1e12, 1e12, allow_nan=False), min_size=2, max_size=8),
    c=st.floats(1.0, 10.0),
    data=st.data(),
)
def test_max_tilt_bounds_each_weight_against_its_prior(gains, c, data):
    k = len(gains)
    sizes = np.array(data.draw(st.lists(st.integers(1, 1000), min_size=k, max_size=k)), dtype=float)
    weights = aggregation_weights(gains, sizes, temperature=0.7, max_tilt=c)
    assert weights.sum() == pytest.approx(1.0) and np.all(weights >= 0)
    ratio = weights / (sizes / sizes.sum())  # (K,) each weight over its FedAvg weight
    assert ratio.max() <= c * c * ratio.min() * (1 + 1e-9)  # a reported gain moves a client by at most c² vs another
    # τ = inf is FedAvg whatever the bound.
    assert aggregation_weights(gains, sizes, math.inf, max_tilt=c) == pytest.approx(sizes / sizes.sum())
    # c = 1 is FedAvg too: no gain tilts anyone.
    assert aggregation_weights(gains, sizes, 0.7, max_tilt=1.0) == pytest.approx(sizes / sizes.sum())


@pytest.mark.parametrize("bad", [0.5, math.inf, math.nan, -1.0])
def test_max_tilt_below_one_or_not_finite_is_refused(bad):
    with pytest.raises(ValueError, match="max_tilt"):
        aggregation_weights([0.0, 1.0], [1, 1], max_tilt=bad)
