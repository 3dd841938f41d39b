"""Heterogeneous LoRA ranks (HetLoRA, Cho et al. 2024): owners with smaller machines train smaller adapters.

The server holds the adapter at the largest rank R (`model.lora.rank`). An
owner of rank r < R (`[[federation.clients]] lora_rank = r`) trains the first r
rank components: it receives θ_t truncated to them and uploads only them
(A[:r, :], B[:, :r]). Because every owner runs the same peft model with
scaling alpha / R, the components r..R held at zero (both A's rows and B's
columns, whose gradients are then zero too) make it exactly a rank-r adapter.

Aggregation is rank-wise: rank component j of the new adapter is the weighted
average over the clients that have component j, with the strategy's weights
renormalised over them:

    θ_{t+1}[j] = θ_t[j] + Σ_{k: r_k > j} w_k Δ_k[j] / Σ_{k: r_k > j} w_k

The server gets there without a rank-aware strategy: `pad_to_full` fills a
rank-r upload's missing components with θ_t's (a zero update), any weighted
average strategy (FedAvg, FedProx, FGRPO, reward-weighted) aggregates as usual
to θ_t + Σ_k w_k Δ_k, and `rankwise_correction` divides component j's step by
its coverage W_j = Σ_{k: r_k > j} w_k. With equal ranks W_j = 1 and nothing
changes. Strategies with server-side state of their own (FedAdam, FedYogi,
FedAdagrad, FedAvgM's momentum) are not weighted averages and refuse mixed ranks.

Array names follow peft: `lora_A` / `lora_embedding_A` hold the rank on axis 0
(shape (r, in)), `lora_B` / `lora_embedding_B` on axis 1 (shape (out, r)).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def rank_axis(name: str) -> int | None:
    """0 for a LoRA A matrix, 1 for a B matrix, None for any other array (kept whole)."""
    if "lora_A" in name or "lora_embedding_A" in name:
        return 0
    if "lora_B" in name or "lora_embedding_B" in name:
        return 1
    return None


def full_rank(arrays: Mapping[str, np.ndarray]) -> int | None:
    """R: the rank of the adapter `arrays` hold (None when it holds no LoRA matrix)."""
    for name, value in arrays.items():
        axis = rank_axis(name)
        if axis is not None and np.ndim(value) == 2:
            return int(np.shape(value)[axis])
    return None


def truncate(arrays: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """The first `rank` components: A (R, in) -> (r, in), B (out, R) -> (out, r); other arrays unchanged."""
    out = {}
    for name, value in arrays.items():
        axis = rank_axis(name)
        out[name] = value if axis is None else np.ascontiguousarray(value[:rank] if axis == 0 else value[:, :rank])
    return out


def truncated_shapes(arrays: Mapping[str, np.ndarray], rank: int) -> dict[str, tuple[int, ...]]:
    """The shapes a rank-`rank` upload must have against the server's full-rank `arrays`."""
    return {name: np.shape(value) for name, value in truncate(arrays, rank).items()}


def pad_to_full(low: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A rank-r upload back at rank R: components r..R taken from `reference` (θ_t: a zero update there)."""
    out = {}
    for name, ref in reference.items():
        value, axis = np.asarray(low[name]), rank_axis(name)
        if axis is None or np.shape(value) == np.shape(ref):
            out[name] = value
            continue
        full = np.array(ref, dtype=value.dtype, copy=True)  # (R, in) or (out, R)
        r = value.shape[axis]
        if axis == 0:
            full[:r] = value
        else:
            full[:, :r] = value
        out[name] = full
    return out


def zero_beyond(arrays: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """Full-rank arrays with components rank..R set to 0: a rank-`rank` adapter in the rank-R model."""
    out = {}
    for name, value in arrays.items():
        axis = rank_axis(name)
        if axis is None:
            out[name] = value
            continue
        kept = np.array(value, copy=True)
        if axis == 0:
            kept[rank:] = 0
        else:
            kept[:, rank:] = 0
        out[name] = kept
    return out


def rank_problem(
    declared: int, arrays: Mapping[str, np.ndarray] | None, current: Mapping[str, np.ndarray], allow_lower: bool
) -> str | None:
    """Why an upload that declares rank `declared` cannot be read against θ_t = `current`, or None.

    A peer's upload is accepted only in the exact shape of its declared rank:
    1 <= r <= R, and every array the shape of θ_t truncated to r (`arrays` None:
    an encoded upload, whose shapes the codec's decoder checks).
    """
    rank = full_rank(current)
    if rank is None:
        return None  # no LoRA matrices (full fine-tuning): screen_update checks the shapes
    if not 1 <= declared <= rank:
        return f"'lora-rank' must be an integer in [1, {rank}] (the server's model.lora.rank), got {declared}"
    if declared < rank and not allow_lower:
        return f"lora-rank {declared} < {rank}, but this method cannot aggregate mixed LoRA ranks"
    if arrays is None:
        return None
    missing, extra = sorted(set(current) - set(arrays)), sorted(set(arrays) - set(current))
    if missing or extra:
        return f"wrong arrays: missing {missing[:3]}, unexpected {extra[:3]}"
    for name, shape in truncated_shapes(current, declared).items():
        if np.shape(arrays[name]) != shape:
            return f"wrong shape for '{name}': {np.shape(arrays[name])}, expected {shape} at lora-rank {declared}"
    return None


def rank_coverage(ranks: Sequence[int], weights: Sequence[float], rank: int) -> np.ndarray:
    """W (R,): W_j = Σ_{k: r_k > j} w_k, the weight of the clients that train component j."""
    ranks_arr = np.asarray(ranks)[:, None]  # (K, 1)
    has = ranks_arr > np.arange(rank)[None, :]  # (K, R)
    return (np.asarray(weights, dtype=np.float64)[:, None] * has).sum(axis=0)


def rankwise_correction(
    current: Mapping[str, np.ndarray],  # θ_t at rank R
    aggregate: Mapping[str, np.ndarray],  # θ_t + Σ_k w_k Δ_k over the padded uploads
    ranks: Sequence[int],  # (K,) each aggregated client's rank
    weights: Sequence[float],  # (K,) the strategy's weights, Σ = 1
) -> dict[str, np.ndarray]:
    """Component j's step divided by its coverage W_j (components no client trained keep θ_t)."""
    rank = full_rank(current)
    if rank is None:
        return dict(aggregate)
    coverage = rank_coverage(ranks, weights, rank)  # (R,)
    scale = np.divide(1.0, coverage, out=np.zeros_like(coverage), where=coverage > 0)  # (R,)
    out = {}
    for name, theta in current.items():
        axis = rank_axis(name)
        if axis is None:
            out[name] = aggregate[name]
            continue
        theta64 = np.asarray(theta, dtype=np.float64)
        step = np.asarray(aggregate[name], dtype=np.float64) - theta64  # (R, in) or (out, R)
        factor = scale[:, None] if axis == 0 else scale[None, :]
        out[name] = (theta64 + step * factor).astype(np.asarray(aggregate[name]).dtype)
    return out


def rankwise_average(
    current: Mapping[str, np.ndarray],
    uploads: Sequence[Mapping[str, np.ndarray]],  # each at its own rank
    ranks: Sequence[int],
    weights: Sequence[float],
) -> dict[str, np.ndarray]:
    """The definition, component by component (the reference `rankwise_correction` is tested against)."""
    rank = full_rank(current)
    out = {}
    for name, theta in current.items():
        axis = rank_axis(name)
        if axis is None:
            out[name] = sum(w * np.asarray(u[name], np.float64) for u, w in zip(uploads, weights)) / sum(weights)
            continue
        result = np.asarray(theta, dtype=np.float64).copy()
        for j in range(rank):
            having = [(u, w) for u, r, w in zip(uploads, ranks, weights) if r > j]
            if not having:
                continue
            total = sum(w for _, w in having)
            take = (lambda a: np.asarray(a, np.float64)[j]) if axis == 0 else (lambda a: np.asarray(a, np.float64)[:, j])
            value = sum(w * take(u[name]) for u, w in having) / total
            if axis == 0:
                result[j] = value
            else:
                result[:, j] = value
        out[name] = result
    return out
