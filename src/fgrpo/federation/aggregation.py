"""FGRPO's aggregation math as pure numpy functions: gains → weights → update.

No Flower here: `fgrpo.federation.strategies` wraps these in Flower strategies.
Every function is tested against hand-computed values and properties
(weights sum to 1, scale invariance of the gains, τ → ∞ gives FedAvg).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fgrpo.errors import ConfigError, FederationError

GAINS = ("relative", "zscore", "standard_error", "in_round")
# ±inf gains are replaced by ±MAX_GAIN: still "huge" next to any real gain, but finite.
MAX_GAIN = 1e300
# Logits are clipped to ±_LOGIT_LIMIT so differences of two of them stay finite.
_LOGIT_LIMIT = np.finfo(np.float64).max / 8


# --------------------------------------------------------------------------- gains


@dataclass
class RunningStats:
    """Welford's running mean / variance of one client's past mean rewards."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0  # Σ (x − mean)², updated in a numerically stable way

    def update(self, value: float) -> None:
        self.count += 1
        diff = value - self.mean
        self.mean += diff / self.count
        self.m2 += diff * (value - self.mean)

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof = 1); 0.0 with fewer than two values."""
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0


def relative_gain(reward_mean: float, baseline: float | None, delta: float) -> float:
    """g = (R − B) / max(|B|, δ); 0.0 when the client has no baseline yet.

    Invariant to multiplying R and B by c > 0 as long as |B| ≥ δ and c|B| ≥ δ.
    """
    if baseline is None:
        return 0.0
    return (reward_mean - baseline) / max(abs(baseline), delta)


def zscore_gain(reward_mean: float, history: RunningStats | None, delta: float) -> float:
    """g = (R − μ) / (σ + δ) with μ, σ the running mean and sample std of past R.

    Needs at least two past values: with one, σ = 0 and g = (R − μ)/δ would be an
    artefact of δ alone, so the gain is 0.0 (neutral) until a spread is known.
    Scaling R and its history by c > 0 changes g only through δ (relative
    change ≈ δ/σ), so it is scale invariant for σ ≫ δ.
    """
    if history is None or history.count < 2:
        return 0.0
    return (reward_mean - history.mean) / (history.std + delta)


def update_baseline(baseline: float | None, reward_mean: float, decay: float) -> float:
    """EMA B ← βB + (1 − β)R; the first observation initialises B = R."""
    if baseline is None:
        return float(reward_mean)
    return decay * baseline + (1.0 - decay) * reward_mean


# --------------------------------------------------------------------------- weights


def _prior(num_examples: np.ndarray, size_prior: bool) -> np.ndarray:
    """p_k = n_k / Σ n (exactly as FedAvg computes it), or uniform."""
    k = len(num_examples)
    total = float(np.sum(num_examples))
    if not size_prior or total <= 0:
        return np.full(k, 1.0 / k)
    return np.array([float(n) / total for n in num_examples])


def _clip_to_bounds(logits: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The weights w_k = clip(c · exp(ℓ_k), lo, hi) with c chosen so that Σ w = 1.

    logits (K,) -> weights (K,). This is the fixed point of clip-and-redistribute:
    a client over the cap is set to `hi` and its excess goes to the others in
    proportion to their weights (the same for the floor). Σ_k clip(c·exp(ℓ_k))
    grows with c, and the set of capped clients (a top set in ℓ) and of floored
    ones (a bottom set) changes only at "events" c = hi/exp(ℓ_k), lo/exp(ℓ_k).
    We walk the events in order until the sum reaches 1, then share what the
    bounded clients leave among the free ones ∝ exp(ℓ_k). Only differences of
    logits enter, so huge gains lose no precision.
    """
    k = len(logits)
    order = np.argsort(-logits, kind="stable")
    ell = logits[order]  # (K,), descending
    log_hi = math.log(hi)
    log_lo = math.log(lo) if lo > 0 else -math.inf
    n_cap, n_floor = 0, (k if lo > 0 else 0)  # c → 0: everyone floored (or free when lo = 0)
    while True:
        mid = ell[n_cap : k - n_floor]
        # The next event: cap the largest free client, or free the largest floored one.
        cap_at = log_hi - ell[n_cap] if n_cap < k - n_floor else math.inf
        unfloor_at = log_lo - ell[k - n_floor] if n_floor > 0 else math.inf
        if cap_at == unfloor_at == math.inf:
            break
        if cap_at <= unfloor_at:
            bound, anchor = log_hi, ell[n_cap]
        else:
            bound, anchor = log_lo, ell[k - n_floor]
        # Σ w at the event (log c + ℓ_k = bound + ℓ_k − ℓ_anchor for the free clients).
        free = np.clip(np.exp(np.minimum(bound + (mid - anchor), log_hi)), lo, hi)
        if n_cap * hi + n_floor * lo + free.sum() >= 1.0:
            break
        if cap_at <= unfloor_at:
            n_cap += 1
        else:
            n_floor -= 1
    weights = np.empty(k)
    weights[:n_cap] = hi
    weights[k - n_floor :] = lo
    mid = ell[n_cap : k - n_floor]
    if len(mid):
        share = np.exp(mid - mid.max())
        weights[n_cap : k - n_floor] = (1.0 - n_cap * hi - n_floor * lo) * share / share.sum()
    result = np.empty(k)
    result[order] = np.clip(weights, lo, hi)
    return result


AUTO = "auto"


def auto_weight_cap(k: int) -> float:
    """w_max = "auto" for a round that aggregates K clients: max(1/K, min(½, 1.5/K)).

    Why: FGRPO's weights come from statistics the clients report about
    themselves, so a liar with a huge fake gain would take all the weight
    under a cap of 1. This cap keeps any one client below half of the round
    (so it never holds a majority) and below 1.5× its equal share (so with many
    clients a liar's pull shrinks like 1/K), while leaving honest gains room
    to tilt the average. K = 1: 1. K = 2: ½, so both weights are ½ and FGRPO
    reduces to equal weights (a cap below ½ is infeasible with two clients).
    K ≥ 3: 1.5/K (½ at K = 3, 0.375 at K = 4).
    """
    if k < 1:
        raise ValueError(f"auto_weight_cap: need K >= 1 clients, got {k}")
    return max(1.0 / k, min(0.5, 1.5 / k))


def weight_cap(w_max: float | str, k: int) -> float:
    """The numeric cap of a round with K clients: `w_max` itself, or `auto_weight_cap(K)` for "auto"."""
    if w_max == AUTO:
        return auto_weight_cap(k)
    if isinstance(w_max, str):
        raise ValueError(f"w_max must be a number in (0, 1] or {AUTO!r}, got {w_max!r}")
    return float(w_max)


def aggregation_weights(
    gains: Sequence[float] | np.ndarray,
    num_examples: Sequence[float] | np.ndarray,
    temperature: float = 1.0,
    w_min: float = 0.0,
    w_max: float | str = 1.0,
    size_prior: bool = True,
    max_tilt: float | None = None,
) -> np.ndarray:
    """FGRPO weights w_k ∝ p_k · exp(g_k / τ), bounded to [w_min, w_max], Σ w = 1.

    gains (K,), num_examples (K,) -> weights (K,). `w_max = "auto"` is
    `auto_weight_cap(K)` (the FGRPO strategy's and the config's default; this
    pure function defaults to no cap, 1.0, so the math can be tested alone).
    - p_k = n_k / Σn (size_prior) or 1/K; computed as log p_k + g_k/τ and
      normalised by log-sum-exp, so huge gains do not overflow.
    - τ = inf returns p exactly (FedAvg's sample-size weights) when p is within
      the bounds.
    - Bounds by clip-and-redistribute (see `_clip_to_bounds`); a client never
      ends above w_max. If the bounds are infeasible (K·w_max < 1 or
      K·w_min > 1) the effective bounds are max(w_max, 1/K) and min(w_min, 1/K).
    - Non-finite gains: NaN counts as 0 (no evidence of progress), ±inf as
      ±MAX_GAIN, so the weights stay finite and sum to 1.
    - max_tilt = c ≥ 1 (None: no bound) bounds each tilt exp(g_k/τ) to [1/c, c]:
      whatever gain a client reports, its weight relative to its prior moves by
      at most c² against any other client's. Why: a liar's fake gain otherwise
      buys the whole cap w_max, however small its data share.
    """
    gains = np.asarray(gains, dtype=np.float64).reshape(-1)  # (K,)
    num_examples = np.asarray(num_examples, dtype=np.float64).reshape(-1)  # (K,)
    k = len(gains)
    if k == 0:
        return np.zeros(0)
    if len(num_examples) != k:
        raise ValueError(f"aggregation_weights: {k} gains but {len(num_examples)} num_examples")
    if np.any(~np.isfinite(num_examples)) or np.any(num_examples < 0):
        raise ValueError(f"aggregation_weights: num_examples must be finite and >= 0, got {num_examples.tolist()}")
    if not temperature > 0:
        raise ValueError(f"aggregation_weights: temperature must be > 0, got {temperature}")
    if max_tilt is not None and not (math.isfinite(max_tilt) and max_tilt >= 1):
        raise ValueError(f"aggregation_weights: max_tilt must be a finite number >= 1, got {max_tilt}")
    lo, hi = min(w_min, 1.0 / k), max(weight_cap(w_max, k), 1.0 / k)

    prior = _prior(num_examples, size_prior)  # (K,)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        if math.isinf(temperature):
            scaled = np.zeros(k)
        else:
            gains = np.nan_to_num(gains, nan=0.0, posinf=MAX_GAIN, neginf=-MAX_GAIN)
            limit = _LOGIT_LIMIT if max_tilt is None else min(_LOGIT_LIMIT, math.log(max_tilt))  # tilt in [1/c, c]
            scaled = np.clip(gains / temperature, -limit, limit)
        logits = np.clip(np.log(prior) + scaled, -_LOGIT_LIMIT, _LOGIT_LIMIT)  # (K,)
    if math.isinf(temperature):
        weights = prior  # exactly FedAvg's n_k / Σn, no exp/log round trip
    else:
        weights = np.exp(logits - logits.max())
        weights = weights / weights.sum()
    if np.all(weights >= lo) and np.all(weights <= hi):
        return weights
    return _clip_to_bounds(logits, lo, hi)


def reward_weighted_weights(reward_means: Sequence[float] | np.ndarray) -> np.ndarray:
    """The naive scheme: w_k ∝ max(R_k, 0), uniform if every R_k ≤ 0.

    reward_means (K,) -> (K,). NaN counts as 0; clients reporting +inf share
    the whole weight equally.
    """
    rewards = np.asarray(reward_means, dtype=np.float64).reshape(-1)
    k = len(rewards)
    if k == 0:
        return np.zeros(0)
    if np.any(np.isposinf(rewards)):
        top = np.isposinf(rewards).astype(np.float64)
        return top / top.sum()
    positive = np.where(np.isfinite(rewards) & (rewards > 0), rewards, 0.0)
    if positive.max() <= 0:
        return np.full(k, 1.0 / k)
    positive = positive / positive.max()  # avoid overflow of Σ for huge rewards
    return positive / positive.sum()


def weighted_update(
    current: dict[str, np.ndarray],
    client_arrays: Sequence[dict[str, np.ndarray]],
    weights: Sequence[float] | np.ndarray,
    server_lr: float = 1.0,
) -> dict[str, np.ndarray]:
    """θ_{t+1} = θ_t + η Σ_k w_k (θ_k − θ_t), array by array.

    Accumulates in float64; floating arrays keep θ_t's dtype. Every client must
    send exactly θ_t's keys and shapes.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if len(client_arrays) != len(weights):
        raise FederationError(f"weighted_update: {len(client_arrays)} clients but {len(weights)} weights")
    for i, arrays in enumerate(client_arrays):
        if set(arrays) != set(current):
            missing, extra = sorted(set(current) - set(arrays)), sorted(set(arrays) - set(current))
            raise FederationError(f"client #{i} sent arrays with missing keys {missing} / unexpected keys {extra}")
        for key, value in arrays.items():
            if np.shape(value) != np.shape(current[key]):
                raise FederationError(
                    f"client #{i} sent array '{key}' of shape {np.shape(value)}, expected {np.shape(current[key])}"
                )
    updated = {}
    for key, theta in current.items():
        theta64 = np.asarray(theta, dtype=np.float64)
        step = np.zeros_like(theta64)
        for w, arrays in zip(weights, client_arrays):
            step += w * (np.asarray(arrays[key], dtype=np.float64) - theta64)
        new = theta64 + server_lr * step
        updated[key] = new.astype(theta.dtype) if np.issubdtype(theta.dtype, np.floating) else new
    return updated
