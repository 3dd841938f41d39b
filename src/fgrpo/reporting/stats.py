"""Paired comparisons of two methods over the same seeds: the statistics a reviewer accepts.

Two methods run with the same seed share the task pool, the partition, the
initial adapter and the sampled clients, so seed-to-seed variation largely
cancels in their per-seed difference. The comparison is therefore made on the
paired differences d_s = A_s − B_s: their mean, a 95% bootstrap confidence
interval (scipy's BCa, percentile where BCa is undefined), and a paired
t-test's two-sided p-value. The verdict is said in words, and "no significant
difference" whenever the interval covers 0 or the t-test does not reject at the
same level: with 3–5 seeds a bootstrap interval only sees the few differences
it resamples and comes out too narrow (3 seeds at +0.3, +0.7, +2.3 points give
a BCa interval above 0 but p = 0.29), so a claim needs both.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

NO_DIFFERENCE = "no significant difference"


@dataclass(frozen=True)
class PairedComparison:
    """Method A against reference B on the seeds both ran."""

    seeds: tuple[int, ...]
    differences: tuple[float, ...]  # (S,) A_s − B_s, in seed order
    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    confidence: float

    @property
    def verdict(self) -> str:
        """'better' / 'worse' when the CI excludes 0 and the paired t-test agrees, else 'no significant difference'."""
        if len(self.seeds) < 2 or not (math.isfinite(self.ci_low) and math.isfinite(self.ci_high)):
            return "too few seeds to tell"
        if not self.p_value < 1.0 - self.confidence:
            return NO_DIFFERENCE
        if self.ci_low > 0:
            return "better"
        if self.ci_high < 0:
            return "worse"
        return NO_DIFFERENCE


def bootstrap_ci(
    differences: np.ndarray, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """CI of the mean of `differences` (S,) by bootstrap; (nan, nan) for S < 2.

    BCa corrects the percentile interval's bias and skew; it is undefined when
    every resample has the same mean (e.g. identical differences), where the
    interval is the point itself.
    """
    from scipy.stats import bootstrap

    differences = np.asarray(differences, dtype=np.float64)
    if len(differences) < 2:
        return math.nan, math.nan
    if np.ptp(differences) == 0:
        value = float(differences[0])
        return value, value
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns when BCa degenerates; we fall back below
            result = bootstrap(
                (differences,),
                np.mean,
                confidence_level=confidence,
                n_resamples=n_resamples,
                method=method,
                random_state=np.random.default_rng(seed),
            )
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            return low, high
    return math.nan, math.nan


def paired_t_pvalue(differences: np.ndarray) -> float:
    """Two-sided p-value of a paired t-test (one-sample t on the differences); nan for S < 2."""
    from scipy.stats import ttest_1samp

    differences = np.asarray(differences, dtype=np.float64)
    if len(differences) < 2:
        return math.nan
    if np.ptp(differences) == 0:
        return 1.0 if differences[0] == 0 else 0.0
    return float(ttest_1samp(differences, 0.0).pvalue)


def paired_comparison(
    values: dict[int, float], reference: dict[int, float], confidence: float = 0.95, n_resamples: int = 10_000
) -> PairedComparison:
    """Compare per-seed values {seed: A_s} with {seed: B_s} on the seeds both have (finite in both)."""
    seeds = tuple(
        sorted(
            s
            for s in set(values) & set(reference)
            if values[s] is not None and reference[s] is not None and math.isfinite(values[s]) and math.isfinite(reference[s])
        )
    )
    differences = np.array([values[s] - reference[s] for s in seeds], dtype=np.float64)  # (S,)
    low, high = bootstrap_ci(differences, confidence, n_resamples)
    return PairedComparison(
        seeds=seeds,
        differences=tuple(float(d) for d in differences),
        mean=float(differences.mean()) if len(differences) else math.nan,
        ci_low=low,
        ci_high=high,
        p_value=paired_t_pvalue(differences),
        confidence=confidence,
    )
