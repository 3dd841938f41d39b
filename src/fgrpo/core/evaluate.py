"""Held-out evaluation: greedy accuracy per task family, and pass@k."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from math import comb

import numpy as np
import torch

from fgrpo.core.rollout import Rollouts, generate
from fgrpo.data.tasks import Example, is_correct


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al., 2021): 1 − C(n−c, k) / C(n, k)."""
    if k > num_samples:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {num_samples}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def accuracy_by_family(examples: list[Example], correct: list[bool]) -> dict[str, float]:
    by_family: dict[str, list[bool]] = defaultdict(list)
    for example, ok in zip(examples, correct):
        by_family[example.family].append(ok)
    return {family: float(np.mean(values)) for family, values in sorted(by_family.items())}


@torch.inference_mode()
def evaluate(
    model,
    tokenizer,
    examples: list[Example],
    max_completion_length: int,
    *,
    pass_k: int = 0,
    temperature: float = 1.0,
    batch_size: int = 256,
    prefix: str = "eval",
    sample: Callable[..., Rollouts] | None = None,
) -> dict[str, float]:
    """Greedy accuracy (overall and per family) and, if pass_k > 0, sampled pass@k.

    Accuracy is the mean over examples, so families weigh by their held-out size.
    `sample(prompts, n, max_len, temperature, greedy=...)` renders and rolls out
    prompts (a learner's `sample`: chat template and backend); by default the
    raw prompts go through HF generate.
    """
    if not examples:
        return {}
    if sample is None:

        def sample(prompts, n, max_len, temperature=1.0, greedy=False):
            return generate(model, tokenizer, prompts, n, max_len, temperature, greedy=greedy)

    correct: list[bool] = []
    for batch in _batches(examples, batch_size):
        rollouts = sample([ex.prompt for ex in batch], 1, max_completion_length, greedy=True)
        correct.extend(is_correct(ex, text) for ex, text in zip(batch, rollouts.completions))
    metrics = {f"{prefix}/acc_heldout": float(np.mean(correct))}
    metrics.update({f"{prefix}/acc/{family}": acc for family, acc in accuracy_by_family(examples, correct).items()})
    if pass_k > 0:
        scores = []
        for batch in _batches(examples, max(1, batch_size // pass_k)):
            rollouts = sample([ex.prompt for ex in batch], pass_k, max_completion_length, temperature)
            for i, ex in enumerate(batch):
                hits = sum(is_correct(ex, text) for text in rollouts.completions[i * pass_k : (i + 1) * pass_k])
                scores.append(pass_at_k(pass_k, hits, pass_k))
        metrics[f"{prefix}/pass@{pass_k}"] = float(np.mean(scores))
    return metrics
