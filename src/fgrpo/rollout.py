"""Rollouts: sample G completions per prompt with the KV cache, and score tokens.

Generation and scoring use the same left-padded layout and the same position
ids, so the log-probs computed here describe the distribution the tokens were
sampled from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grpo import completion_mask_after_eos, token_log_probs


@dataclass
class Rollouts:
    """A batch of completions; the G completions of a prompt are contiguous."""

    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor  # (N, P)
    completion_ids: torch.Tensor  # (N, T)
    completion_mask: torch.Tensor  # (N, T) 1 up to and including the first EOS
    completions: list[str]  # N decoded completions, EOS and padding stripped

    @property
    def num_completion_tokens(self) -> int:
        return int(self.completion_mask.sum())


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
) -> Rollouts:
    """Sample `num_generations` completions for every prompt (greedy: argmax decoding).

    This is the rollout interface every backend implements (see `vllm_backend`).
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device, add_special_tokens)
    prompt_ids = prompt_ids.repeat_interleave(num_generations, dim=0)  # (B*G, P)
    prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0)
    was_training = model.training
    model.eval()
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
    with torch.inference_mode():  # no autograd bookkeeping at all while sampling
        output = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=max_completion_length,
            do_sample=not greedy,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
            **sampling,
        )
    model.train(was_training)
    # A normal tensor again (an inference tensor cannot be saved for the backward of the loss forward).
    completion_ids = output[:, prompt_ids.size(1) :].clone()  # (N, T), T <= max_completion_length
    completion_mask = completion_mask_after_eos(completion_ids, tokenizer.eos_token_id)
    # Tokens after the first EOS are padding; zero them so decoding ignores them.
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask, completions)


def completion_log_probs(model, rollouts: Rollouts, temperature: float = 1.0) -> torch.Tensor:  # (N, T)
    """Per-token log-probs of the completions under `model` (grad flows if enabled)."""
    input_ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], dim=1)  # (N, P+T)
    attention_mask = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], dim=1)
    # Same position ids as generate() derives from the left-padded mask.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    num_completion = rollouts.completion_ids.size(1)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=num_completion + 1,
        use_cache=False,
    ).logits  # (N, T+1, V)
    logits = logits[:, :-1, :]  # position i predicts completion token i
    return token_log_probs(logits, rollouts.completion_ids, temperature)
