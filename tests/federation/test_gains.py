"""FGRPO's noise-aware gains: t-statistics of improvement, scale invariant, neutral without evidence."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fgrpo.core.learner import mean_variance
from fgrpo.federation.gains import (
    in_round_gain,
    shrink_by_evidence,
    standard_error_gain,
    update_baseline_var,
)

finite = st.floats(-1e3, 1e3, allow_nan=False)
positive = st.floats(1e-6, 1e3)


def test_the_measured_failure_noise_no_longer_looks_like_a_gain():
    # Round 2 of the v0.1 quickstart: mean reward 0.35 against a baseline of ~0.18 from a noisy first round.
    # The relative gain was 0.98; measured in standard errors (SE of each mean ≈ 0.1) it is about 1.2, not huge,
    # and with shrinkage it is smaller still.
    se_gain = standard_error_gain(0.35, 0.1**2, 0.177, 0.1**2, 1e-3)
    assert 1.0 < se_gain < 1.5
    assert shrink_by_evidence(se_gain, se_gain) < se_gain


@settings(max_examples=200, deadline=None)
@given(finite, positive, finite, positive, st.floats(1e-3, 1e3))
def test_standard_error_gain_is_exactly_scale_invariant(r, var_r, b, var_b, c):
    g = standard_error_gain(r, var_r, b, var_b, 1e-3)
    scaled = standard_error_gain(c * r, c * c * var_r, c * b, c * c * var_b, 1e-3)
    assert math.isclose(g, scaled, rel_tol=1e-6, abs_tol=1e-9)


@settings(max_examples=200, deadline=None)
@given(finite, positive, st.floats(1e-3, 1e3))
def test_in_round_gain_is_exactly_scale_invariant(d, var, c):
    assert math.isclose(in_round_gain(d, var, 1e-3), in_round_gain(c * d, c * c * var, 1e-3), rel_tol=1e-6, abs_tol=1e-9)


def test_no_history_or_no_information_is_neutral():
    assert standard_error_gain(0.7, 0.01, None, 0.0, 1e-3) == 0.0
    assert standard_error_gain(0.0, 0.0, 0.0, 0.0, 1e-3) == 0.0  # all-zero rewards: nothing is known
    assert in_round_gain(0.0, 0.0, 1e-3) == 0.0
    assert in_round_gain(float("nan"), 0.1, 1e-3) == 0.0
    assert standard_error_gain(0.5, float("inf"), 0.1, 0.0, 1e-3) == 0.0


def test_without_spread_the_relative_floor_bounds_the_gain():
    # Every rollout got the same reward in both rounds: the gain is (R − B)/(δ·max|R|,|B|), finite and signed.
    g = standard_error_gain(1.0, 0.0, 0.5, 0.0, 1e-3)
    assert g == (1.0 - 0.5) / (1e-3 * 1.0)


def test_baseline_variance_follows_the_ema():
    v = update_baseline_var(None, 0.04, 0.5)
    assert v == 0.04
    assert math.isclose(update_baseline_var(v, 0.04, 0.5), 0.25 * 0.04 + 0.25 * 0.04)
    # Simulated: the EMA of iid draws has the variance the recursion predicts.
    rng = np.random.default_rng(0)
    draws = rng.normal(size=(20000, 30))
    ema = draws[:, 0].copy()
    var = update_baseline_var(None, 1.0, 0.7)
    for t in range(1, 30):
        ema = 0.7 * ema + 0.3 * draws[:, t]
        var = update_baseline_var(var, 1.0, 0.7)
    assert math.isclose(ema.var(), var, rel_tol=0.05)


def test_shrinkage_keeps_strong_evidence_and_removes_weak():
    assert math.isclose(shrink_by_evidence(5.0, 5.0), 5.0 * 25 / 26)
    assert abs(shrink_by_evidence(0.2, 0.2)) < 0.01
    assert shrink_by_evidence(-3.0, -3.0) < 0


def test_mean_variance_is_the_squared_standard_error():
    values = [0.1, 0.4, 0.2, 0.9]
    assert math.isclose(mean_variance(values), np.var(values, ddof=1) / 4)
    assert mean_variance([0.5]) == 0.0
