"""Rollouts: sample G completions per prompt with the KV cache, and score tokens.

Generation and scoring use the same left-padded layout and the same position
ids, so the log-probs computed here describe the distribution the tokens were
sampled from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fgrpo.core.grpo import completion_mask_after_eos, token_log_probs
from fgrpo.core.prompt_cache import cache_argument, positions_from_mask, shared_prompt_cache
from fgrpo.core.sampler import sample as lean_sample
from fgrpo.core.sampler import sampler_unsupported


@dataclass
class Rollouts:
    """A batch of completions; the G completions of a prompt are contiguous."""

    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor  # (N, P)
    completion_ids: torch.Tensor  # (N, T)
    completion_mask: torch.Tensor  # (N, T) 1 up to and including the first EOS
    completions: list[str]  # N decoded completions, EOS and padding stripped
    num_generations: int = 1  # G: rows k·G … k·G+G−1 share one prompt (lets scoring run the prompt once)

    @property
    def num_completion_tokens(self) -> int:
        return int(self.completion_mask.sum())

    def rows(self, start: int, stop: int) -> "Rollouts":
        """Rows start..stop−1 (whole groups of G when both are multiples of G), padding kept as it is."""
        return Rollouts(
            self.prompt_ids[start:stop],
            self.prompt_mask[start:stop],
            self.completion_ids[start:stop],
            self.completion_mask[start:stop],
            self.completions[start:stop],
            self.num_generations,
        )


def encode_prompts(
    tokenizer, prompts: list[str], device: torch.device, add_special_tokens: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad a list of prompts: (ids (B, P), mask (B, P)).

    `add_special_tokens=False` for chat-templated text, which holds its own BOS.
    """
    encoded = tokenizer(
        prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=add_special_tokens
    )
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


def generate(
    model,
    tokenizer,
    prompts: list[str],
    num_generations: int,
    max_completion_length: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    add_special_tokens: bool = True,
    share_prompts: bool = True,
    sampler: str = "auto",
) -> Rollouts:
    """Sample `num_generations` completions for every prompt (greedy: argmax decoding).

    This is the rollout interface every backend implements (see `vllm_backend`).
    `sampler="auto"` decodes with fgrpo's lean loop (`sampler.sample`: the tokens
    of `generate`, finished rows dropped) when `sampler.sampler_unsupported` finds
    nothing it cannot reproduce, else with transformers' `generate`; "hf" always
    uses `generate`. With `share_prompts`, each prompt is prefilled once and its
    KV cache repeated for its G samples instead of prefilled G times.
    """
    device = next(model.parameters()).device
    unique_ids, unique_mask = encode_prompts(tokenizer, prompts, device, add_special_tokens)  # (B, P)
    prompt_ids = unique_ids.repeat_interleave(num_generations, dim=0)  # (B*G, P)
    prompt_mask = unique_mask.repeat_interleave(num_generations, dim=0)
    options = {
        "max_new_tokens": max_completion_length,
        "do_sample": not greedy,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "use_cache": True,
        **({} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}),
    }
    lean = sampler == "auto" and sampler_unsupported(model, options) is None
    was_training = model.training
    model.eval()
    with torch.inference_mode():  # no autograd bookkeeping at all while sampling
        if lean:
            completion_ids = lean_sample(
                model, unique_ids, unique_mask, num_generations, max_completion_length,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=not greedy,
                temperature=temperature, top_k=0, top_p=top_p, share_prompts=share_prompts,
            ).token_ids
        else:
            completion_ids = hf_generate(model, prompt_ids, prompt_mask, unique_ids, unique_mask, num_generations, options, share_prompts)
    model.train(was_training)
    # A normal tensor again (an inference tensor cannot be saved for the backward of the loss forward).
    completion_ids = completion_ids.clone()  # (N, T), T <= max_completion_length
    completion_mask = completion_mask_after_eos(completion_ids, tokenizer.eos_token_id)
    # Tokens after the first EOS are padding; zero them so decoding ignores them.
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask, completions, num_generations)


def hf_generate(model, prompt_ids, prompt_mask, unique_ids, unique_mask, group: int, options: dict, share_prompts: bool):
    """transformers' `generate` on the repeated prompts (B*G, P): the completion ids (B*G, T)."""
    prefilled = {}
    if share_prompts and group > 1 and unique_ids.size(1) > 1:
        prefilled = {cache_argument(model): prefill_shared_prompts(model, unique_ids, unique_mask, group)}
    output = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **options, **prefilled)
    return output[:, prompt_ids.size(1) :]


def prefill_shared_prompts(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group: int):
    """KV cache of every prompt but its last token, run once per prompt and repeated G times: (B, P) -> cache (B*G, P−1).

    `generate` sees the cache covers P−1 of the P prompt tokens and runs only the
    last one, so sampling starts from the same state as a full prefill of B*G rows.
    """
    return shared_prompt_cache(model, prompt_ids[:, :-1], prompt_mask[:, :-1], group)[1]


def completion_log_probs(
    model, rollouts: Rollouts, temperature: float = 1.0, share_prompts: bool = True
) -> torch.Tensor:  # (N, T)
    """Per-token log-probs of the completions under `model` (grad flows if enabled).

    With G > 1 completions per prompt the prompt is run once, not G times
    (`shared_prompt_logits`); `share_prompts=False` runs all N rows in full
    (needed under gradient checkpointing, which cannot use a KV cache while training).
    """
    return token_log_probs(completion_logits(model, rollouts, share_prompts), rollouts.completion_ids, temperature)


def completion_logits(model, rollouts: Rollouts, share_prompts: bool = True) -> torch.Tensor:  # (N, T, V)
    """The logits that predict each completion token (see `completion_log_probs` for `share_prompts`).

    Callers that need more than log-probs from one forward (the token entropies
    of grpo.top_entropy_quantile) start here.
    """
    if share_prompts and rollouts.num_generations > 1:
        return shared_prompt_logits(model, rollouts)
    return full_logits(model, rollouts)


def full_logits(model, rollouts: Rollouts) -> torch.Tensor:  # (N, T, V)
    """Logits that predict each completion token, from one forward over prompt + completion."""
    input_ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], dim=1)  # (N, P+T)
    attention_mask = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], dim=1)
    position_ids = positions_from_mask(attention_mask)
    num_completion = rollouts.completion_ids.size(1)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=num_completion + 1,
        use_cache=False,
    ).logits  # (N, T+1, V)
    return logits[:, :-1, :]  # position i predicts completion token i


def shared_prompt_logits(model, rollouts: Rollouts) -> torch.Tensor:  # (N, T, V)
    """The same logits as `full_logits`, running each of the B = N/G prompts once.

    The prompt pass fills a KV cache for B rows; the cache is repeated G times
    and the completions attend to it. Gradients flow back through the repeated
    cache into the single prompt pass, so the loss and its gradient are those of
    the full forward (up to float rounding), at B·P + N·T tokens instead of N·(P+T).
    """
    group = rollouts.num_generations
    prompt_ids, prompt_mask = rollouts.prompt_ids[::group], rollouts.prompt_mask[::group]  # (B, P)
    last_logits, cache = shared_prompt_cache(model, prompt_ids, prompt_mask, group)
    first = last_logits.repeat_interleave(group, dim=0)  # (N, 1, V) predicts completion token 0
    attention_mask = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], dim=1)  # (N, P+T)
    position_ids = positions_from_mask(attention_mask)[:, prompt_ids.size(1) :]  # (N, T)
    rest = model(
        input_ids=rollouts.completion_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        **{cache_argument(model): cache},
    ).logits  # (N, T, V)
    return torch.cat([first, rest[:, :-1, :]], dim=1)
