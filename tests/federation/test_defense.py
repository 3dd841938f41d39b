"""Defences: screening, norm clipping and weighted robust aggregation (pure functions)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fgrpo.federation.defense import (
    norm_clip_factors,
    reference_norm,
    robust_update,
    scale_update,
    screen_update,
    update_norm,
    weighted_median,
    weighted_trimmed_mean,
)
from fgrpo.errors import FederationError

THETA = {"a": np.zeros((2, 3), dtype=np.float32), "b": np.ones(4, dtype=np.float32)}


def test_screen_update_names_each_problem():
    assert screen_update(THETA, {k: v + 1 for k, v in THETA.items()}) is None
    assert "missing ['b']" in screen_update(THETA, {"a": THETA["a"]})
    assert "unexpected ['c']" in screen_update(THETA, {**THETA, "c": np.zeros(1)})
    assert "wrong shape for 'a'" in screen_update(THETA, {**THETA, "a": np.zeros((3, 2), dtype=np.float32)})
    nan = {**THETA, "b": np.array([0, np.nan, 0, 0], dtype=np.float32)}
    assert "non-finite values" in screen_update(THETA, nan)
    inf = {**THETA, "b": np.array([0, np.inf, 0, 0], dtype=np.float32)}
    assert "non-finite values" in screen_update(THETA, inf)
    huge = {"x": np.full(4, 1e200)}
    assert "overflows" in screen_update({"x": np.zeros(4)}, huge)


def test_update_norm_and_scale_by_hand():
    arrays = {"a": np.full((2, 3), 1.0, dtype=np.float32), "b": np.ones(4, dtype=np.float32) + 2.0}
    # Δa = 1 on 6 entries, Δb = 2 on 4 entries: ‖Δ‖² = 6 + 16
    assert update_norm(THETA, arrays) == pytest.approx(np.sqrt(22))
    half = scale_update(THETA, arrays, 0.5)
    assert update_norm(THETA, half) == pytest.approx(np.sqrt(22) / 2)
    assert half["a"].dtype == np.float32


def test_norm_clip_factors_bound_outliers_to_a_multiple_of_the_lower_median():
    factors = norm_clip_factors([1.0, 2.0, 3.0, 100.0], multiple=2.0)  # lower median 2 → bound 4
    np.testing.assert_allclose(factors, [1, 1, 1, 0.04])
    np.testing.assert_allclose(norm_clip_factors([0.0, 0.0, 1.0], 3.0), [1, 1, 0])  # median 0: only zero updates pass
    assert norm_clip_factors([], 3.0).shape == (0,)


def test_reference_norm_is_the_lower_median_so_one_liar_is_never_the_reference():
    assert reference_norm([5.0]) == 5.0
    assert reference_norm([1.0, 20.0]) == 1.0  # K = 2: the smaller one, not their mean 10.5
    assert reference_norm([3.0, 1.0, 2.0]) == 2.0
    assert reference_norm([4.0, 1.0, 3.0, 2.0]) == 2.0  # sorted(norms)[(K − 1) // 2]
    # K = 2 (a liar sampled with one honest client): the liar is bounded by 1.5× the honest norm.
    np.testing.assert_allclose(norm_clip_factors([1.0, 20.0], 1.5), [1.0, 1.5 / 20.0])
    np.testing.assert_allclose(norm_clip_factors([7.0], 1.5), [1.0])  # K = 1: nothing to compare with


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.01, 10.0), min_size=2, max_size=9),
    st.floats(1.01, 5.0),
    st.floats(1.0, 1e6),
)
def test_one_liar_is_bounded_by_the_honest_norms_whatever_its_size(honest, multiple, blowup):
    """Any single update, however large, ends at most `multiple` × the largest honest norm (K ≥ 2)."""
    liar = max(honest) * blowup
    factors = norm_clip_factors([*honest, liar], multiple)
    assert factors[-1] * liar <= multiple * max(honest) * (1 + 1e-9)


def test_weighted_median_by_hand():
    values = np.array([[1.0], [2.0], [10.0]])
    assert weighted_median(values, [1, 1, 1])[0] == 2.0
    assert weighted_median(values, [0.1, 0.1, 0.8])[0] == 10.0  # a weight over ½ sets the median
    assert weighted_median(values, [0.5, 0.1, 0.4])[0] == 1.0  # lower median when exactly ½


def test_weighted_trimmed_mean_by_hand_and_against_scipy():
    values = np.array([[1.0], [2.0], [3.0], [100.0]])
    assert weighted_trimmed_mean(values, [1, 1, 1, 1], 0.25)[0] == pytest.approx(2.5)
    assert weighted_trimmed_mean(values, [1, 1, 1, 1], 0.0)[0] == pytest.approx(26.5)
    rng = np.random.default_rng(0)
    data = rng.normal(size=(10, 7))
    np.testing.assert_allclose(weighted_trimmed_mean(data, np.ones(10), 0.2), stats.trim_mean(data, 0.2, axis=0))
    with pytest.raises(FederationError, match="trim must be"):
        weighted_trimmed_mean(data, np.ones(10), 0.5)
    with pytest.raises(FederationError, match="finite non-negative weights"):
        weighted_median(data, np.full(10, np.nan))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda k: st.tuples(
            st.lists(st.lists(st.floats(-1e6, 1e6), min_size=3, max_size=3), min_size=k, max_size=k),
            st.lists(st.floats(0.01, 10), min_size=k, max_size=k),
            st.permutations(range(k)),
        )
    ),
    st.floats(0, 0.49),
)
def test_robust_aggregates_stay_in_range_and_ignore_order(problem, trim):
    rows, weights, perm = problem
    values, weights = np.array(rows), np.array(weights)
    for result in (weighted_median(values, weights), weighted_trimmed_mean(values, weights, trim)):
        assert np.all(result >= values.min(axis=0) - 1e-6) and np.all(result <= values.max(axis=0) + 1e-6)
    np.testing.assert_allclose(weighted_median(values[perm], weights[perm]), weighted_median(values, weights))
    np.testing.assert_allclose(
        weighted_trimmed_mean(values[perm], weights[perm], trim), weighted_trimmed_mean(values, weights, trim), rtol=1e-9, atol=1e-6
    )


def test_robust_update_ignores_one_scaled_liar_under_capped_weights():
    rng = np.random.default_rng(1)
    theta = {"w": np.zeros(50)}
    honest = [{"w": rng.normal(0, 0.1, 50)} for _ in range(3)]
    liar = {"w": honest[0]["w"] * 100}
    weights = [0.4, 0.2, 0.2, 0.2]  # the liar holds the cap, still below ½
    median = robust_update(theta, [liar, *honest], weights, aggregator="median")
    assert np.max(np.abs(median["w"])) <= np.max(np.abs(np.stack([h["w"] for h in honest]))) + 1e-12
    with pytest.raises(FederationError, match="unknown robust aggregator"):
        robust_update(theta, honest, [1, 1, 1], aggregator="krum")
