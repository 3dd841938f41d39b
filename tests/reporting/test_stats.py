"""Paired seed-by-seed comparisons: bootstrap CIs, the paired t-test and the verdict in words."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fgrpo.reporting.stats import NO_DIFFERENCE, bootstrap_ci, paired_comparison, paired_t_pvalue


def test_a_consistent_gain_is_better_and_a_consistent_loss_worse():
    reference = {s: 0.40 + 0.05 * s for s in range(5)}  # large seed-to-seed spread ...
    better = {s: v + 0.03 + 0.002 * (-1) ** s for s, v in reference.items()}  # ... that pairing removes
    result = paired_comparison(better, reference)
    assert result.verdict == "better" and result.ci_low > 0 and result.p_value < 0.01
    assert math.isclose(result.mean, 0.03 + 0.002 / 5, abs_tol=1e-12)
    assert paired_comparison(reference, better).verdict == "worse"


def test_noise_around_zero_is_no_significant_difference():
    rng = np.random.default_rng(3)
    reference = {s: float(x) for s, x in enumerate(rng.uniform(0.3, 0.5, 6))}
    noisy = {s: v + float(d) for (s, v), d in zip(reference.items(), [0.02, -0.03, 0.01, -0.02, 0.03, -0.01])}
    result = paired_comparison(noisy, reference)
    assert result.ci_low < 0 < result.ci_high
    assert result.verdict == NO_DIFFERENCE


def test_a_narrow_bootstrap_interval_from_three_seeds_is_not_a_claim_without_the_t_test():
    reference = {0: 0.60, 1: 0.62, 2: 0.64}
    values = {0: 0.603, 1: 0.627, 2: 0.663}  # +0.3, +0.7, +2.3 points
    result = paired_comparison(values, reference)
    assert result.ci_low > 0 and result.p_value > 0.05  # the interval alone would say "better"
    assert result.verdict == NO_DIFFERENCE


def test_only_seeds_both_methods_ran_are_paired_and_non_finite_ones_are_dropped():
    result = paired_comparison({0: 0.5, 1: 0.6, 2: float("nan"), 3: 0.9}, {0: 0.4, 1: 0.5, 2: 0.3, 4: 0.1})
    assert result.seeds == (0, 1)
    assert result.differences == pytest.approx((0.1, 0.1))


def test_one_seed_gives_no_interval_and_says_so():
    result = paired_comparison({0: 0.5}, {0: 0.4})
    assert math.isnan(result.ci_low) and result.verdict == "too few seeds to tell"
    assert math.isnan(paired_t_pvalue(np.array([0.1])))


def test_identical_differences_give_a_point_interval():
    assert bootstrap_ci(np.array([0.02, 0.02, 0.02])) == (0.02, 0.02)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-1, 1, allow_nan=False), min_size=2, max_size=12))
def test_the_interval_is_ordered_and_holds_the_mean_for_any_differences(diffs):
    low, high = bootstrap_ci(np.array(diffs), n_resamples=2000)
    mean = float(np.mean(diffs))
    assert low <= high
    assert low - 1e-9 <= mean <= high + 1e-9 or np.ptp(diffs) < 1e-12


def test_the_ci_is_reproducible():
    diffs = np.array([0.01, 0.04, -0.02, 0.03, 0.05])
    assert bootstrap_ci(diffs) == bootstrap_ci(diffs)
