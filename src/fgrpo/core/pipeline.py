"""Build what a run needs from its config: the task pool, the policy, the reward.

Shared by `fgrpo train`, the federated ClientApp/ServerApp and the benchmarks,
so every entry point resolves a config the same way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from fgrpo.config import Config, ModelConfig, TasksConfig
from fgrpo.errors import ConfigError
from fgrpo.core.learner import GRPOLearner, seeded
from fgrpo.core.model import add_lora, enable_gradient_checkpointing, load_model_and_tokenizer
from fgrpo.data.rewards import OwnerRewards, WeightedReward, check_reward_options, resolve_reward_function
from fgrpo.data.sources import load_source
from fgrpo.data.tasks import (
    Example,
    FamilySpec,
    carve_validation,
    load_jsonl,
    make_splits,
    train_test_split,
    with_prompt_style,
)


def _carve_fraction(train: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """(train, validation): the first `fraction` of an already shuffled training part."""
    num_validation = round(len(train) * fraction)
    validation = train[:num_validation]
    carved = {ex.prompt for ex in validation}  # a row repeated in the file never lands on both sides
    return [ex for ex in train[num_validation:] if ex.prompt not in carved], validation


@dataclass(frozen=True)
class TaskSplits:
    """Three disjoint prompt sets: train, validation (carved from the training prompts) and held-out test.

    Scenarios and hyperparameters are chosen on `validation` (`evaluation.split`);
    `test` is for the numbers a run reports, so it never steers a choice.
    """

    train: list[Example]
    validation: list[Example]
    test: list[Example]

    def heldout(self, split: str) -> list[Example]:
        """The examples evaluation uses for `evaluation.split`."""
        if split != "validation":
            return self.test
        if not self.validation:
            raise ConfigError(
                "evaluation.split = 'validation', but the pool has no validation examples; set "
                "tasks.validation_per_family (families) or validation_fraction (files, sources) above 0"
            )
        return self.validation


def build_task_splits(tasks: TasksConfig) -> TaskSplits:
    """Train / validation / test examples: synthetic families, JSONL files, then dataset sources."""
    specs = [FamilySpec(f.name, f.difficulty, tuple(f.reward_scale), f.weight) for f in tasks.families]
    train, test = make_splits(specs, tasks.train_per_family, tasks.test_per_family, tasks.seed) if specs else ([], [])
    train, validation = carve_validation(train, tasks.validation_per_family, tasks.seed)
    for file in tasks.files:
        examples = load_jsonl(file.path, file.prompt_key, file.answer_key, file.family, tuple(file.reward_scale))
        file_train, file_test = train_test_split(examples, file.test_fraction, tasks.seed)
        file_train, file_validation = _carve_fraction(file_train, file.validation_fraction)
        train, validation, test = train + file_train, validation + file_validation, test + file_test
    for source in tasks.sources:
        source_train, source_test = train_test_split(load_source(source), source.test_fraction, tasks.seed)
        source_train, source_validation = _carve_fraction(source_train, source.validation_fraction)
        train, validation, test = train + source_train, validation + source_validation, test + source_test
    style = "compact" if tasks.prompt_style == "auto" else tasks.prompt_style  # Config resolves 'auto'
    return TaskSplits(*(with_prompt_style(part, style) for part in (train, validation, test)))


def build_task_pool(tasks: TasksConfig) -> tuple[list[Example], list[Example]]:
    """(train, held-out test) examples; the validation prompts are in neither (see `build_task_splits`)."""
    splits = build_task_splits(tasks)
    return splits.train, splits.test


def build_reward(tasks: TasksConfig, max_completion_length: int | None = None, key: str = "tasks.rewards") -> WeightedReward:
    """The weighted reward; `kwargs` are bound to each function, and length_penalty
    defaults its budget to the rollouts' max_completion_length. A function that
    cannot be resolved is a ConfigError naming `key[i].name`."""
    terms = []
    for i, reward in enumerate(tasks.rewards):
        try:
            fn = resolve_reward_function(reward.name)
        except ConfigError as error:
            raise ConfigError(f"{key}[{i}].name: {error}") from None
        try:
            check_reward_options(fn, reward.kwargs)
        except ConfigError as error:
            raise ConfigError(f"{key}[{i}].kwargs: {error}") from None
        kwargs = dict(reward.kwargs)
        if reward.name == "length_penalty" and max_completion_length is not None:
            kwargs.setdefault("max_length", max_completion_length)
        if kwargs:
            fn = functools.update_wrapper(functools.partial(fn, **kwargs), fn)
        terms.append((reward.name if not kwargs else fn, reward.weight))
    return WeightedReward(terms)


def build_owner_rewards(config: Config) -> OwnerRewards:
    """Every owner's reward functions, keyed by owner name (a centralized run pools the owners' examples)."""
    from fgrpo.data.node_spec import owner_name, owner_tasks

    return OwnerRewards(
        {
            owner_name(owner, k): build_reward(
                owner_tasks(config.tasks, owner, k),
                config.grpo.max_completion_length,
                f"federation.clients[{k}].rewards" if owner.rewards else "tasks.rewards",
            )
            for k, owner in enumerate(config.federation.clients)
        }
    )


def resolve_model_source(model: ModelConfig, tasks: TasksConfig) -> str:
    """'tiny' becomes the cached warm-started checkpoint; a packaged model or a .gguf file its cached folder."""
    if model.source != "tiny":
        from fgrpo.core.packaged_models import resolve_model_source as resolve_packaged

        return resolve_packaged(model.source)
    from fgrpo.core.warmstart import warm_started_tiny_model_dir

    return str(warm_started_tiny_model_dir(model.warm_start, tasks.families))


def load_policy(model: ModelConfig, tasks: TasksConfig, seed: int):
    """The trainable policy (LoRA-wrapped unless lora.enabled = false) and its tokenizer."""
    base, tokenizer = load_model_and_tokenizer(
        resolve_model_source(model, tasks), model.dtype, model.device, model.quantization
    )
    if model.quantization != "none":
        from peft import prepare_model_for_kbit_training

        # Casts norms to fp32 and freezes the quantized base, as QLoRA does.
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=model.gradient_checkpointing)
    if model.gradient_checkpointing:
        enable_gradient_checkpointing(base)
    if model.lora.enabled:
        with seeded(seed):  # LoRA's A matrices are random: same seed, same adapter init
            policy = add_lora(
                base, model.lora.rank, model.lora.alpha, model.lora.dropout, model.lora.target_modules
            )
    else:
        policy = base.requires_grad_(True)
    return policy, tokenizer


def build_learner(config: Config, seed: int) -> GRPOLearner:
    """Policy, tokenizer, chat template, rollout backend and reward, wired into one learner."""
    from fgrpo.core.chat import prompt_format

    model, tokenizer = load_policy(config.model, config.tasks, seed)
    generate_fn = None  # the learner's default: rollout.generate with grpo.sampler
    if config.model.generation_backend == "vllm":
        from fgrpo.core.vllm_backend import VLLMGenerator

        generate_fn = VLLMGenerator(config.model, resolve_model_source(config.model, config.tasks))
    return GRPOLearner(
        model,
        tokenizer,
        config.grpo,
        build_reward(config.tasks, config.grpo.max_completion_length),
        prompt_format=prompt_format(tokenizer, config.model.chat_template, config.model.system_prompt),
        generate_fn=generate_fn,
    )
