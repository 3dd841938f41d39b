"""FGRPO gain signals that must beat sampling noise (DESIGN.md, "FGRPO's gain must beat noise").

The paper-faithful relative gain (R − B)/max(|B|, δ) divides by the baseline's
size, not by how precisely R is known: a client whose mean reward is 0.35 from
a few dozen noisy rollouts can show a "gain" of 1 from noise alone. The gains
here divide by the standard error instead, so a gain is a t-statistic: how
many standard errors of improvement the client has shown. Clients report the
variance of their round's mean reward (estimated from per-prompt means; never
raw rewards), and all three gains are exactly invariant to multiplying a
client's rewards by c > 0 (R, B and their standard errors all scale by c).

- `standard_error_gain`: (R − B) / SE(R − B), with B the EMA baseline and
  SE² = Var(R) + Var(B) (the EMA's variance is tracked alongside it).
- `in_round_gain`: the improvement of the client's updated policy θ_k over the
  global θ_t on the same fresh prompts, measured by the client in its round,
  divided by its standard error. It does not depend on a history at all.
- `shrink_by_evidence`: multiplies any gain by t²/(1 + t²), where t is the
  improvement's t-statistic: with weak evidence (|t| ≪ 1) the gain goes to 0 and
  the weights to FedAvg's; with strong evidence it is kept.
"""

from __future__ import annotations

import math


def _t_statistic(difference: float, variance: float, delta: float, scale: float) -> float:
    """difference / sqrt(variance), with a floor δ·scale on the denominator (scale-free), 0 when nothing is known."""
    if not (math.isfinite(difference) and math.isfinite(variance)) or variance < 0:
        return 0.0
    denominator = max(math.sqrt(variance), delta * scale)
    if denominator == 0.0:
        return 0.0
    return difference / denominator


def standard_error_gain(
    reward_mean: float, reward_var: float, baseline: float | None, baseline_var: float, delta: float
) -> float:
    """g = (R − B) / max(sqrt(Var R + Var B), δ·max(|R|, |B|)); 0.0 for a client with no baseline yet.

    The floor δ·max(|R|, |B|) is relative, so it keeps exact scale invariance:
    it only matters when a round's rewards had no spread at all.
    """
    if baseline is None:
        return 0.0
    return _t_statistic(reward_mean - baseline, reward_var + baseline_var, delta, max(abs(reward_mean), abs(baseline)))


def in_round_gain(improvement: float, improvement_var: float, delta: float) -> float:
    """g = d̄ / max(SE(d̄), δ·|d̄|): the client's measured in-round improvement in standard errors."""
    return _t_statistic(improvement, improvement_var, delta, abs(improvement))


def update_baseline_var(baseline_var: float | None, reward_var: float, decay: float) -> float:
    """Variance of the EMA B ← βB + (1 − β)R for independent R's: V ← β²V + (1 − β)² Var R; first: Var R."""
    if baseline_var is None:
        return float(reward_var)
    return decay * decay * baseline_var + (1.0 - decay) ** 2 * reward_var


def shrink_by_evidence(gain: float, t_statistic: float) -> float:
    """gain · t²/(1 + t²): toward 0 (FedAvg's weights) when the improvement is within noise."""
    if not math.isfinite(t_statistic):
        return gain
    t2 = t_statistic * t_statistic
    return gain * t2 / (1.0 + t2)

