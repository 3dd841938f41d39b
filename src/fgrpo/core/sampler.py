"""A lean decode loop for causal LMs: the tokens of transformers' `generate`, with less work per token.

Why: a GRPO rollout on a small model is many short completions, and `generate`
spends much of its time on work that does not change the tokens:
- every row runs until the last one finishes (GRPO completions finish at very
  different lengths, most long before `max_completion_length`);
- per-token bookkeeping (input preparation, cache positions, stopping criteria,
  logits-processor lists built for every option).

This loop runs the model's own forward with its own KV cache (`DynamicCache`)
and differs from `generate` only in what it skips:
- each prompt is prefilled once and its cache repeated for its G samples
  (`rollout.shared_prompt_cache`, as the `generate` path does);
- rows that finished are dropped from the batch and from the cache
  (`Cache.batch_select_indices`), so a step costs what its unfinished rows cost.

Same tokens as `generate`, and the same random numbers consumed: `generate`
samples with transformers' Temperature → TopK → TopP warpers (in that order),
a softmax, and one `torch.multinomial` over all N rows every step. This loop
applies the same warper classes to the unfinished rows, writes their
probabilities into an (N, V) tensor whose finished rows are a uniform
placeholder, and draws from it. torch draws one sample per row from one
exponential per element (its `num_samples=1` path, on every device), so a row's
draw depends on its own probabilities and the tensor's shape, not on the other
rows (`tests/core/test_sampler.py` checks that property and the tokens against
`generate`). The logits themselves come from a smaller batch, so they can differ
from `generate`'s in the last bit; a tie broken by that bit would change a
token, which the tests have not seen.

What it does not do, and `sampler_unsupported` sends to `generate` instead:
encoder-decoder models, models with their own `prepare_inputs_for_generation`
(recurrent and multimodal ones), prompt-learning peft adapters, caches without
`batch_select_indices`, beam search, and every generation option other than
temperature / top_k / top_p / max_new_tokens / EOS / pad (a checkpoint's
`generation_config.json` with e.g. `repetition_penalty = 1.05` falls back).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from fgrpo.core.prompt_cache import cache_argument, positions_from_mask, shared_prompt_cache

# Generation options this loop implements, or that do not change the tokens.
HANDLED_OPTIONS = frozenset(
    {
        "max_new_tokens", "max_length", "do_sample", "use_cache", "temperature", "top_k", "top_p",
        "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id",
        "output_attentions", "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate",
        "_from_model_config", "transformers_version",
    }
)
# Options whose value here means "off" in `generate` (anything else falls back).
NEUTRAL_OPTIONS = {
    "num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
    "length_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "min_length": 0,
    "min_new_tokens": 0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "diversity_penalty": 0.0,
    "num_beam_groups": 1, "early_stopping": False, "remove_invalid_values": False, "renormalize_logits": False,
    "guidance_scale": 1.0, "low_memory": False,
}


@dataclass
class SampledTokens:
    """What the loop returns for N = B·G rows (prompt k's samples at rows k·G … k·G+G−1)."""

    token_ids: torch.Tensor  # (N, T) pad after each row's first EOS; T ≤ max_new_tokens, as `generate` trims
    log_probs: torch.Tensor | None  # (N, T) log softmax(logits / temperature) of each token; 0 after EOS


def sampler_unsupported(model, options: dict) -> str | None:
    """Why the lean loop cannot reproduce `model.generate(**options)`, or None when it can.

    `options` are `generate`'s keyword arguments; they are merged into the
    model's `generation_config` as `generate` merges them.
    """
    from transformers import GenerationMixin

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    if type(base).prepare_inputs_for_generation is not GenerationMixin.prepare_inputs_for_generation:
        return f"{type(base).__name__} prepares its own generation inputs"
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return "a prompt-learning peft adapter"
    merged = copy.deepcopy(base.generation_config)
    merged.update(**options)
    for key, value in merged.to_diff_dict().items():
        if key not in HANDLED_OPTIONS and value is not None and NEUTRAL_OPTIONS.get(key, object()) != value:
            return f"generation option {key} = {value!r}"
    return None


def warpers(do_sample: bool, temperature: float | None, top_k: int | None, top_p: float | None):
    """transformers' own sampling warpers, built and ordered as `generate` builds them (none when greedy)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    chain = LogitsProcessorList()
    if not do_sample:
        return chain
    if temperature is not None and temperature != 1.0:
        chain.append(TemperatureLogitsWarper(temperature))
    if top_k is not None and top_k != 0:
        chain.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return chain


def sample(
    model,
    prompt_ids: torch.Tensor,  # (B, P) left-padded, one row per prompt
    prompt_mask: torch.Tensor,  # (B, P)
    num_generations: int,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None,
    pad_token_id: int | None,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    share_prompts: bool = True,
    return_log_probs: bool = False,
) -> SampledTokens:
    """G completions per prompt, token for token what `generate` returns for the repeated prompts.

    Call under `torch.inference_mode()` with the model in eval mode (dropout
    off), as `generate` runs; `rollout.generate` does both.
    """
    group = num_generations
    if share_prompts:
        last_logits, cache = shared_prompt_cache(model, prompt_ids, prompt_mask, group)  # (B, 1, V), cache of B·G rows
        logits = last_logits[:, -1].float().repeat_interleave(group, dim=0)  # (N, V)
    else:  # every row prefilled in full, as `generate` does on the repeated prompts
        prompt_ids = prompt_ids.repeat_interleave(group, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(group, dim=0)
        last_logits, cache = shared_prompt_cache(model, prompt_ids, prompt_mask, 1)
        logits = last_logits[:, -1].float()
    if not hasattr(cache, "batch_select_indices"):
        raise TypeError(f"the model's cache ({type(cache).__name__}) cannot drop rows; use the 'hf' sampler")
    num_rows, vocab = logits.shape
    device = logits.device
    attention_mask = prompt_mask.repeat_interleave(group, dim=0) if share_prompts else prompt_mask  # (n, P+t)
    position = positions_from_mask(attention_mask)[:, -1:]  # (n, 1) of each row's last token
    eos = torch.as_tensor([] if eos_token_id is None else eos_token_id, dtype=torch.long, device=device).reshape(-1)
    if pad_token_id is None:  # what `generate` pads with then (it warns)
        pad_token_id = int(eos[0]) if eos.numel() else 0
    chain = warpers(do_sample, temperature, top_k, top_p)
    token_ids = torch.full((num_rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    log_probs = torch.zeros(num_rows, max_new_tokens, device=device) if return_log_probs else None
    active = torch.arange(num_rows, device=device)  # (n,) rows still generating
    steps = 0
    for step in range(max_new_tokens):
        # 1. pick the next token of every unfinished row, consuming the RNG as `generate` does
        scores = chain(None, logits)  # (n, V); the warpers only read the scores
        if do_sample:
            probs = torch.softmax(scores, dim=-1)
            if active.numel() < num_rows:  # finished rows: a uniform placeholder, never read
                probs = probs.new_ones(num_rows, vocab).index_copy_(0, active, probs)
            next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
            next_tokens = next_tokens[active] if active.numel() < num_rows else next_tokens
        else:
            next_tokens = scores.argmax(dim=-1)
        token_ids[active, step] = next_tokens
        if log_probs is not None:
            step_log_probs = torch.log_softmax(logits / temperature, dim=-1)
            log_probs[active, step] = step_log_probs.gather(1, next_tokens[:, None]).squeeze(1)
        steps = step + 1
        # 2. drop the rows that just finished (`generate` keeps running them on padding)
        alive = ~torch.isin(next_tokens, eos)  # (n,)
        if step == max_new_tokens - 1 or not bool(alive.any()):
            break
        if not bool(alive.all()):
            keep = alive.nonzero().squeeze(1)
            active, next_tokens, attention_mask, position = active[keep], next_tokens[keep], attention_mask[keep], position[keep]
            cache.batch_select_indices(keep)
        # 3. one forward of the unfinished rows on their new token
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.size(0), 1)], dim=1)
        position = position + 1
        logits = model(
            input_ids=next_tokens[:, None],
            attention_mask=attention_mask,
            position_ids=position,
            use_cache=True,
            **{cache_argument(model): cache},
        ).logits[:, -1].float()  # (n, V)
    return SampledTokens(token_ids[:, :steps], log_probs[:, :steps] if log_probs is not None else None)
