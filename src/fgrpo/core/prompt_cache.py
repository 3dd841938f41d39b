"""The KV cache of left-padded prompts: their position ids, one prefill per prompt shared by its G rows,
and the forward's cache keyword.

Sampling (`rollout`, `sampler`) and scoring (`rollout.shared_prompt_logits`) build
the same layout from these, so the log-probs of a completion describe the
distribution it was sampled from.
"""

from __future__ import annotations

import functools
import inspect

import torch


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:  # (rows, L) -> (rows, L)
    """Position ids of a left-padded layout: 0 at each row's first real token (what `generate` derives)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def shared_prompt_cache(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group: int):
    """Run B prompts once and repeat their KV cache G times: (B, P) -> (last logits (B, 1, V), cache of B*G rows).

    Row k·G+j of the cache is prompt k, the layout of `Rollouts`. Under autograd the
    repeat is differentiable, so gradients of all G rows flow into the one prompt pass.
    """
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=positions_from_mask(prompt_mask),
        logits_to_keep=1,  # left padding: the last position is every prompt's last token
        use_cache=True,
    )
    cache = getattr(out, "cache", None) or out.past_key_values
    if group > 1:
        cache.batch_repeat_interleave(group)
    return out.logits, cache


@functools.lru_cache(maxsize=16)
def _forward_takes_cache(forward_type: type) -> bool:
    return "cache" in inspect.signature(forward_type.forward).parameters


def cache_argument(model) -> str:
    """The forward's KV-cache keyword: 'cache' in recent transformers, 'past_key_values' before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if _forward_takes_cache(type(base)) else "past_key_values"
