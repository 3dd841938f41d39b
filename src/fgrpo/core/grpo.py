"""GRPO math as small pure tensor functions: advantages, log-probs, the clipped loss.

Everything here follows TRL's `GRPOTrainer` (v1.16) definitions so that users
coming from TRL get the same numbers, and so tests can compare against TRL on
identical tensors. Shapes use N = B*G completions (B prompts, G generations
each) and T = completion length.

Notation (TRL's): ε_low = `epsilon`, ε_high = `epsilon_high`, β = `beta`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")
ScaleRewards = Literal["group", "batch", "none"]
MultiObjectiveAggregation = Literal["sum_then_normalize", "normalize_then_sum"]

# TRL adds this to the std before dividing, so a group with identical rewards
# gets advantage 0 rather than 0/0.
STD_EPS = 1e-4


def unbiased_std(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected standard deviation (TRL's `nanstd` without NaNs)."""
    if dim is None:
        return x.std(unbiased=True) if x.numel() > 1 else torch.zeros((), dtype=x.dtype)
    return x.std(dim=dim, unbiased=True) if x.size(dim) > 1 else torch.zeros_like(x.select(dim, 0))


def group_advantages(
    rewards: torch.Tensor,  # (B*G,) rewards, the G completions of a prompt contiguous
    num_generations: int,
    scale_rewards: ScaleRewards = "group",
) -> torch.Tensor:  # (B*G,)
    """Group-relative advantages: reward minus its group's mean, optionally / std.

    `scale_rewards`: "group" divides by each group's std (GRPO), "batch" by the
    std of the whole batch (more robust with few generations), "none" does not
    scale (Dr. GRPO: std scaling biases towards too-easy/too-hard prompts).
    """
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    grouped = rewards.view(-1, num_generations)  # (B, G)
    mean = grouped.mean(dim=1).repeat_interleave(num_generations)  # (B*G,)
    advantages = rewards - mean
    if scale_rewards == "group":
        std = unbiased_std(grouped, dim=1).repeat_interleave(num_generations)  # (B*G,)
        advantages = advantages / (std + STD_EPS)
    elif scale_rewards == "batch":
        advantages = advantages / (unbiased_std(rewards) + STD_EPS)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', not {scale_rewards!r}")
    return advantages


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Bessel-corrected std ignoring NaNs; NaN where fewer than two values count (TRL's `trl.trainer.utils.nanstd`)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = torch.sqrt(variance * correction)
    if keepdim:
        return std
    return std.squeeze(dim) if dim is not None else std.squeeze()


def normalize_then_sum_advantages(
    rewards_per_func: torch.Tensor,  # (B*G, K) each reward function's reward, NaN where it does not apply
    weights: torch.Tensor,  # (K,)
    num_generations: int,
) -> torch.Tensor:  # (B*G,)
    """Advantages of TRL's `multi_objective_aggregation = "normalize_then_sum"` (GDPO, arXiv 2601.05242).

    Each reward function is normalised within each group first, r̂_k = (r_k − mean_g r_k) / (std_g r_k + 1e-4),
    so a function with a wide range cannot drown one with a narrow range; then Σ_k w_k r̂_k (NaN terms skipped) is
    normalised over the whole batch. `scale_rewards` does not apply, as in TRL. Re-derived from TRL 1.16's
    `GRPOTrainer._generate_and_score_completions`, which has no separate function for it; the tests run that
    block of TRL's source on the same tensors.
    """
    num_rows, num_funcs = rewards_per_func.shape
    if num_rows % num_generations:
        raise ValueError(f"{num_rows} rewards do not split into groups of {num_generations}")
    grouped = rewards_per_func.view(-1, num_generations, num_funcs)  # (B, G, K)
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)  # (B, 1, K)
    std_k = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
    normalized = ((grouped - mean_k) / (std_k + STD_EPS)).view(-1, num_funcs)  # (B*G, K)
    rewards = (normalized * weights.to(normalized).unsqueeze(0)).nansum(dim=1)  # (B*G,)
    std = nanstd(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    return (rewards - torch.nanmean(rewards)) / (std + STD_EPS)


# Elements of float32 logits converted at a time in `token_log_probs` (64 MB).
LOG_PROB_CHUNK_ELEMENTS = 2**24


def token_log_probs(
    logits: torch.Tensor,  # (N, T, V) logits that predict each completion token
    token_ids: torch.Tensor,  # (N, T)
    temperature: float = 1.0,
) -> torch.Tensor:  # (N, T)
    """Log-probability of each sampled token under the (temperature-scaled) policy.

    The logits are divided by the sampling temperature, as TRL does, so that the
    ratio compares the distribution the tokens were actually drawn from.

    log p = z_token − logsumexp(z), computed a chunk of sequences at a time:
    no (N, T, V) log-softmax is ever built, and at most LOG_PROB_CHUNK_ELEMENTS
    of float32 logits exist at once beyond what autograd keeps. With a 150k-token
    vocabulary those copies are the largest tensors of a step (TRL's
    `selective_log_softmax` avoids them the same way). Small vocabularies run in one chunk.
    """
    num_rows, length, vocab = logits.shape
    rows_per_chunk = max(1, LOG_PROB_CHUNK_ELEMENTS // max(1, length * vocab))
    chunks = []
    for start in range(0, num_rows, rows_per_chunk):
        chunk = logits[start : start + rows_per_chunk].float() / temperature  # (n, T, V)
        ids = token_ids[start : start + rows_per_chunk].unsqueeze(-1)  # (n, T, 1)
        chunks.append(chunk.gather(-1, ids).squeeze(-1) - torch.logsumexp(chunk, dim=-1))  # (n, T)
    return torch.cat(chunks, dim=0)


def token_entropies(
    logits: torch.Tensor,  # (N, T, V) logits that predict each completion token
    temperature: float = 1.0,
) -> torch.Tensor:  # (N, T), no grad
    """Entropy (nats) of the temperature-scaled next-token distribution at each completion position.

    Only `high_entropy_mask` reads it (a token selection, no gradient), so it runs
    without autograd, a chunk of sequences at a time as `token_log_probs` does.
    Equals TRL's `entropy_from_logits(logits / temperature)`.
    """
    num_rows, length, vocab = logits.shape
    rows_per_chunk = max(1, LOG_PROB_CHUNK_ELEMENTS // max(1, length * vocab))
    chunks = []
    with torch.no_grad():
        for start in range(0, num_rows, rows_per_chunk):
            log_p = torch.log_softmax(logits[start : start + rows_per_chunk].float() / temperature, dim=-1)  # (n, T, V)
            chunks.append(-(log_p.exp() * log_p).sum(-1))  # (n, T)
    return torch.cat(chunks, dim=0)


def high_entropy_mask(
    entropies: torch.Tensor,  # (N, T)
    mask: torch.Tensor,  # (N, T) 1 on completion tokens
    top_entropy_quantile: float,
) -> torch.Tensor:  # (N, T) bool
    """The completion tokens whose entropy is in the batch's top ρ quantile (TRL's `top_entropy_quantile`).

    "Beyond the 80/20 rule" (Wang et al. 2025): the policy gradient of the few
    high-entropy "forking" tokens carries most of RLVR's gain. The threshold is
    the (1 − ρ) quantile of the entropies of the masked tokens (torch.quantile,
    linear interpolation); ρ = 0 keeps the highest-entropy token(s) only, ρ = 1
    every token. Same result as TRL 1.16's `GRPOTrainer.get_high_entropy_mask`
    on one process.
    """
    kept = entropies[mask.bool()].float()
    if kept.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    threshold = torch.quantile(kept, 1.0 - top_entropy_quantile)
    return ((entropies * mask.to(entropies.dtype)) >= threshold) & mask.bool()


def truncated_completions(
    completion_ids: torch.Tensor,  # (N, T)
    completion_mask: torch.Tensor,  # (N, T) 1 up to and including the first EOS
    stop_token_ids: list[int],  # EOS token(s) and the pad token
) -> torch.Tensor:  # (N,) bool
    """Completions cut off by max_completion_length: their last kept token is no stop token.

    TRL's `mask_truncated_completions` test (`ids[-1] not in eos_and_pad`), on
    padded tensors: the last kept token is the one before the mask's first 0.
    An empty completion counts as finished.
    """
    lengths = completion_mask.sum(dim=1).long()  # (N,)
    last = completion_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)  # (N,)
    stops = torch.as_tensor(stop_token_ids, device=completion_ids.device)
    return (lengths > 0) & ~torch.isin(last, stops)


def completion_mask_after_eos(
    completion_ids: torch.Tensor,  # (N, T)
    eos_token_id: int,
) -> torch.Tensor:  # (N, T) int, 1 up to and including the first EOS
    """Mask that keeps each completion's tokens up to and including its first EOS."""
    is_eos = completion_ids == eos_token_id  # (N, T)
    seq_len = completion_ids.size(1)
    first_eos = torch.full((completion_ids.size(0),), seq_len, dtype=torch.long, device=completion_ids.device)
    has_eos = is_eos.any(dim=1)
    first_eos[has_eos] = is_eos.int().argmax(dim=1)[has_eos]
    positions = torch.arange(seq_len, device=completion_ids.device).expand_as(completion_ids)  # (N, T)
    return (positions <= first_eos.unsqueeze(1)).int()


def kl_k3(
    log_probs: torch.Tensor,  # (N, T) policy
    ref_log_probs: torch.Tensor,  # (N, T) reference
) -> torch.Tensor:  # (N, T)
    """Per-token KL(π‖π_ref) estimate k3 = exp(r) − r − 1, r = log π_ref − log π (≥ 0)."""
    delta = ref_log_probs - log_probs
    return torch.exp(delta) - delta - 1


@dataclass
class LossOutput:
    """The scalar loss to backpropagate and detached statistics to log."""

    loss: torch.Tensor  # () with grad
    kl: float  # mean per-token KL over completion tokens (0 when β = 0)
    clip_fraction: float  # share of completion tokens in a clipped region
    clip_low_fraction: float
    clip_high_fraction: float


def aggregate_token_loss(
    per_token_loss: torch.Tensor,  # (N, T)
    mask: torch.Tensor,  # (N, T)
    loss_type: LossType,
    max_completion_length: int,
    num_items_in_batch: float | None = None,
) -> torch.Tensor:  # ()
    """Reduce per-token losses to a scalar, exactly as TRL's loss types do.

    - grpo: mean over each sequence's tokens, then mean over sequences
      (short completions weigh more per token: the length bias Dr. GRPO removes);
    - bnpo: mean over all completion tokens of the batch;
    - dr_grpo: sum / (N · max_completion_length), a constant normaliser;
    - dapo: sum / tokens in the whole generation batch (`num_items_in_batch`;
      equals bnpo when the batch is not split into micro-batches).
    """
    mask = mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return masked.sum() / (per_token_loss.size(0) * max_completion_length)
    if loss_type == "dapo":
        normaliser = mask.sum() if num_items_in_batch is None else torch.tensor(float(num_items_in_batch))
        return masked.sum() / normaliser.clamp(min=1.0)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")


def grpo_loss(
    log_probs: torch.Tensor,  # (N, T) current policy, with grad
    old_log_probs: torch.Tensor | None,  # (N, T) policy that sampled; None = log_probs.detach()
    advantages: torch.Tensor,  # (N,)
    mask: torch.Tensor,  # (N, T) 1 on completion tokens
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_log_probs: torch.Tensor | None = None,  # (N, T), required when beta > 0
    loss_type: LossType = "dapo",
    max_completion_length: int = 16,
    num_items_in_batch: float | None = None,
    importance_sampling_level: Literal["token", "sequence"] = "token",
    delta: float | None = None,
    entropy_mask: torch.Tensor | None = None,  # (N, T) bool: only these tokens' policy term counts
) -> LossOutput:
    """The clipped policy-ratio objective of GRPO with an optional k3 KL penalty.

    per-token loss = −min(min(ρ, δ)·A, clip(ρ, 1−ε_low, 1+ε_high)·A) + β·KL,
    ρ = exp(log π − log π_old) per token, or (GSPO, importance_sampling_level =
    "sequence") one ρ per completion: exp of the mean log-ratio over its tokens.
    δ (`delta`, None = off) caps the unclipped ratio too: two-sided clipping, as
    TRL's `delta`. `entropy_mask` (top_entropy_quantile < 1, `high_entropy_mask`)
    zeroes the policy term of the other tokens; their KL term stays and the
    normaliser still counts them, as in TRL. With one optimisation pass per
    batch (num_iterations = 1) ρ ≡ 1 and only the gradient of ρ matters. Matches TRL 1.16's
    `GRPOTrainer._compute_loss` (tests/core/test_grpo.py).
    """
    if old_log_probs is None:
        old_log_probs = log_probs.detach()
    adv = advantages.unsqueeze(1)  # (N, 1)
    log_ratio = log_probs - old_log_probs  # (N, T)
    if importance_sampling_level == "sequence":
        mask_f = mask.to(log_ratio.dtype)
        log_ratio = ((log_ratio * mask_f).sum(-1) / mask_f.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (N, 1)
    elif importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    ratio = torch.exp(log_ratio).expand_as(log_probs)  # (N, T)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    unclipped_ratio = ratio if delta is None else torch.clamp(ratio, max=delta)
    per_token_loss = -torch.min(unclipped_ratio * adv, clipped_ratio * adv)  # (N, T)
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask

    kl_mean = 0.0
    if beta != 0.0:
        if ref_log_probs is None:
            raise ValueError("beta > 0 needs ref_log_probs")
        per_token_kl = kl_k3(log_probs, ref_log_probs)  # (N, T)
        per_token_loss = per_token_loss + beta * per_token_kl
        kl_mean = masked_mean(per_token_kl.detach(), mask)

    loss = aggregate_token_loss(per_token_loss, mask, loss_type, max_completion_length, num_items_in_batch)

    with torch.no_grad():
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).float()
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).float()
        return LossOutput(
            loss=loss,
            kl=kl_mean,
            clip_fraction=masked_mean(torch.maximum(low, high), mask),
            clip_low_fraction=masked_mean(low, mask),
            clip_high_fraction=masked_mean(high, mask),
        )


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of `values` (N, T) over positions where `mask` (N, T) is 1."""
    mask = mask.to(values.dtype)
    return float((values * mask).sum() / mask.sum().clamp(min=1.0))
