"""Server-side defences: reject broken updates, bound oversized ones, aggregate robustly.

FGRPO's weights come from statistics the clients report, so a client can lie
about its gain to win weight, and send a scaled-up update to dominate the
average. The defences here bound what a liar can do:

- `screen_update`: an update with the wrong keys or shapes, or NaN/Inf, is
  excluded (a faulty client must not poison the round);
- `norm_clip_factors`: an update whose norm is far above the round's lower
  median is scaled down to `multiple × lower median` (or rejected); on by
  default (`federation.defense.norm_clip = 1.5`);
- `weighted_median` / `weighted_trimmed_mean`: coordinate-wise robust
  aggregation that still honours the strategy's weights (FGRPO's default cap,
  at most ½, keeps any single client from holding a majority).

All functions are pure and work on {name: array} dicts of one adapter.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fgrpo.errors import FederationError
from fgrpo.federation.wire import scale_update  # noqa: F401  (θ + s·(θ_k − θ) has one home: the wire contract)

ROBUST_AGGREGATORS = ("none", "median", "trimmed_mean")


def screen_update(current: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> str | None:
    """Why `arrays` cannot be aggregated against θ_t = `current`, or None if it can."""
    missing, extra = sorted(set(current) - set(arrays)), sorted(set(arrays) - set(current))
    if missing or extra:
        return f"wrong arrays: missing {missing[:3]}, unexpected {extra[:3]}"
    for key, theta in current.items():
        value = arrays[key]
        if np.shape(value) != np.shape(theta):
            return f"wrong shape for '{key}': {np.shape(value)}, expected {np.shape(theta)}"
        if np.issubdtype(np.asarray(value).dtype, np.floating) and not np.all(np.isfinite(value)):
            return f"non-finite values (NaN/Inf) in '{key}'"
    if not np.isfinite(update_norm(current, arrays)):
        return "update norm overflows float64"
    return None


def update_norm(current: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> float:
    """‖θ_k − θ_t‖₂ over all arrays (float64)."""
    total = 0.0
    for key, theta in current.items():
        diff = np.asarray(arrays[key], dtype=np.float64) - np.asarray(theta, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            total += float(np.sum(diff * diff))
    return float(np.sqrt(total))


def reference_norm(norms: Sequence[float] | np.ndarray) -> float:
    """The round's reference norm: the lower median, sorted(norms)[(K − 1) // 2].

    Why the lower one: with K clients a single outlier is never the reference
    (for K = 2 it is the smaller norm, so a liar in a round with one honest
    client, e.g. under partial participation, is measured against the honest
    one; np.median would average them and let the liar pull the bound up).
    """
    ordered = np.sort(np.asarray(norms, dtype=np.float64))
    return float(ordered[(len(ordered) - 1) // 2])


def norm_clip_factors(norms: Sequence[float] | np.ndarray, multiple: float) -> np.ndarray:
    """Scale factor per update so that none exceeds `multiple` × the round's lower-median norm.

    norms: (K,) → factors (K,) in (0, 1]. With K = 1 nothing is clipped (the
    reference is the update itself); with K = 2 the larger update is bounded
    by `multiple` × the smaller one.
    """
    norms = np.asarray(norms, dtype=np.float64)
    if norms.size == 0:
        return norms
    bound = multiple * reference_norm(norms)
    with np.errstate(divide="ignore", invalid="ignore"):
        factors = np.where(norms > bound, bound / norms, 1.0)
    return np.nan_to_num(factors, nan=1.0, posinf=1.0, neginf=1.0)


def _normalised(weights: Sequence[float] | np.ndarray, k: int) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (k,) or not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise FederationError(f"robust aggregation needs {k} finite non-negative weights with a positive sum, got {weights}")
    return weights / weights.sum()


def weighted_median(values: np.ndarray, weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """Coordinate-wise weighted median.

    values: (K, ...) one row per client; weights: (K,) → (...). The lower
    weighted median: the smallest value whose cumulative weight reaches ½.
    """
    values = np.asarray(values, dtype=np.float64)
    w = _normalised(weights, values.shape[0])
    flat = values.reshape(values.shape[0], -1)  # (K, N)
    order = np.argsort(flat, axis=0, kind="stable")  # (K, N)
    sorted_values = np.take_along_axis(flat, order, axis=0)
    cumulative = np.cumsum(w[order], axis=0)  # (K, N)
    index = np.argmax(cumulative >= 0.5 - 1e-12, axis=0)  # (N,)
    return np.take_along_axis(sorted_values, index[None, :], axis=0)[0].reshape(values.shape[1:])


def weighted_trimmed_mean(values: np.ndarray, weights: Sequence[float] | np.ndarray, trim: float) -> np.ndarray:
    """Coordinate-wise weighted mean after cutting `trim` of the weight mass from each end.

    values: (K, ...); weights: (K,); trim in [0, ½) → (...). With equal
    weights and trim = j/K this is the usual trimmed mean dropping j per side;
    trim = 0 is the weighted mean.
    """
    if not 0 <= trim < 0.5:
        raise FederationError(f"trim must be in [0, 0.5), got {trim}")
    values = np.asarray(values, dtype=np.float64)
    w = _normalised(weights, values.shape[0])
    flat = values.reshape(values.shape[0], -1)  # (K, N)
    order = np.argsort(flat, axis=0, kind="stable")
    sorted_values = np.take_along_axis(flat, order, axis=0)
    sorted_w = w[order]  # (K, N)
    upper = np.cumsum(sorted_w, axis=0)
    lower = upper - sorted_w
    kept = np.clip(np.minimum(upper, 1 - trim) - np.maximum(lower, trim), 0.0, None)  # mass kept per entry
    mean = np.sum(kept * sorted_values, axis=0) / np.sum(kept, axis=0)
    return mean.reshape(values.shape[1:])


def robust_update(
    current: dict[str, np.ndarray],
    client_arrays: Sequence[dict[str, np.ndarray]],
    weights: Sequence[float] | np.ndarray,
    *,
    aggregator: str,
    trim_fraction: float = 0.2,
    server_lr: float = 1.0,
) -> dict[str, np.ndarray]:
    """θ_t + η · robust_k(θ_k − θ_t) with the strategy's weights, array by array."""
    if aggregator not in ("median", "trimmed_mean"):
        raise FederationError(f"unknown robust aggregator {aggregator!r}; choose from {', '.join(ROBUST_AGGREGATORS)}")
    updated = {}
    for key, theta in current.items():
        theta64 = np.asarray(theta, dtype=np.float64)
        deltas = np.stack([np.asarray(arrays[key], dtype=np.float64) - theta64 for arrays in client_arrays])  # (K, ...)
        if aggregator == "median":
            step = weighted_median(deltas, weights)
        else:
            step = weighted_trimmed_mean(deltas, weights, trim_fraction)
        new = theta64 + server_lr * step
        updated[key] = new.astype(theta.dtype) if np.issubdtype(theta.dtype, np.floating) else new
    return updated
