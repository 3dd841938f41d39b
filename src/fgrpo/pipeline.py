"""Build what a run needs from its config: the task pool, the policy, the reward.

Shared by `fgrpo train`, the federated ClientApp/ServerApp and the benchmarks,
so every entry point resolves a config the same way.
"""

from __future__ import annotations

import random

from .config import ModelConfig, TasksConfig
from .learner import seeded
from .model import add_lora, load_model_and_tokenizer
from .rewards import WeightedReward, resolve_reward_function
from .tasks import Example, FamilySpec, load_jsonl, make_splits


def build_task_pool(tasks: TasksConfig) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples: synthetic families plus any JSONL files."""
    specs = [FamilySpec(f.name, f.difficulty, tuple(f.reward_scale), f.weight) for f in tasks.families]
    train, test = make_splits(specs, tasks.train_per_family, tasks.test_per_family, tasks.seed) if specs else ([], [])
    for file in tasks.files:
        examples = load_jsonl(file.path, file.prompt_key, file.answer_key, file.family, tuple(file.reward_scale))
        random.Random(tasks.seed).shuffle(examples)
        num_test = max(1, round(len(examples) * file.test_fraction)) if len(examples) > 1 else 0
        test += examples[:num_test]
        train += examples[num_test:]
    return train, test


def build_reward(tasks: TasksConfig) -> WeightedReward:
    return WeightedReward([(resolve_reward_function(r.name), r.weight) for r in tasks.rewards])


def resolve_model_source(model: ModelConfig, tasks: TasksConfig) -> str:
    """'tiny' becomes the cached warm-started checkpoint (built on first use)."""
    if model.source != "tiny":
        return model.source
    from .warmstart import warm_started_tiny_model_dir

    return str(warm_started_tiny_model_dir(model.warm_start, tasks.families))


def load_policy(model: ModelConfig, tasks: TasksConfig, seed: int):
    """The trainable policy (LoRA-wrapped unless lora.enabled = false) and its tokenizer."""
    base, tokenizer = load_model_and_tokenizer(resolve_model_source(model, tasks), model.dtype, model.device)
    if model.lora.enabled:
        with seeded(seed):  # LoRA's A matrices are random: same seed, same adapter init
            policy = add_lora(
                base, model.lora.rank, model.lora.alpha, model.lora.dropout, model.lora.target_modules
            )
    else:
        policy = base.requires_grad_(True)
    return policy, tokenizer
