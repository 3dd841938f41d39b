"""One GRPO step, in order: sample → reward → advantage → loss → step → log.

`GRPOLearner` owns the policy's optimizer and nothing else; the centralized
trainer and every federated client call the same `step`, so all methods are
compared on the same local algorithm.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fgrpo.core.chat import RAW, PromptFormat
from fgrpo.config import GRPOConfig
from fgrpo.core.grpo import (
    group_advantages,
    normalize_then_sum_advantages,
    grpo_loss,
    high_entropy_mask,
    token_entropies,
    token_log_probs,
    truncated_completions,
)
from fgrpo.core.model import trainable_parameters
from fgrpo.data.rewards import OwnerRewards, WeightedReward, compute_rewards
from fgrpo.core.rollout import Rollouts, completion_log_probs, completion_logits, generate
from fgrpo.data.tasks import Example
from fgrpo.errors import TrainingError


@dataclass
class ProximalTerm:
    """FedProx: μ/2 · ‖θ − θ_anchor‖² added to the loss (θ = trainable weights)."""

    mu: float
    anchor: dict[str, torch.Tensor]  # name -> tensor on the model's device


class GRPOLearner:
    """Runs GRPO steps on a (peft or plain) causal LM."""

    def __init__(
        self,
        model,
        tokenizer,
        grpo: GRPOConfig,
        reward: WeightedReward | OwnerRewards,
        prompt_format: PromptFormat = RAW,
        generate_fn: Callable[..., Rollouts] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.config = grpo
        self.reward = reward
        self.prompt_format = prompt_format
        # Default backend: transformers models, decoded by the sampler `grpo.sampler` names.
        self.generate_fn = generate_fn or functools.partial(generate, sampler=grpo.sampler)
        self.is_peft = hasattr(model, "disable_adapter")
        self.reference = None
        if grpo.beta > 0 and not self.is_peft:
            # Full fine-tuning needs a frozen copy for the KL term; with LoRA the
            # base model with adapters disabled *is* the reference (no copy).
            import copy

            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        # Sharing a prompt's pass across its G completions needs a KV cache in the
        # training forward, which gradient checkpointing turns off.
        checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        self.share_prompts = grpo.share_prompt_prefix and not checkpointing
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps_taken = 0  # GRPO steps of this learner, for error messages
        self.step_context = ""  # what the steps count in, e.g. " of this local round"
        self.reset_optimizer()

    def reset_optimizer(self) -> None:
        """Fresh AdamW state (clients start each round from the global weights)."""
        params = list(trainable_parameters(self.model).values())
        options = {"lr": self.config.learning_rate, "weight_decay": self.config.weight_decay}
        try:  # one fused kernel for all tensors (4x faster than the per-tensor loop on LoRA-sized params)
            self.optimizer = torch.optim.AdamW(params, fused=True, **options)
        except (RuntimeError, ValueError):  # a device or dtype without a fused AdamW
            self.optimizer = torch.optim.AdamW(params, **options)

    def optimizer_state_arrays(self) -> dict[str, np.ndarray]:
        """AdamW's moments and step count as named float32 arrays ("<param>/exp_avg", ...), to keep between rounds."""
        arrays: dict[str, np.ndarray] = {}
        for name, param in trainable_parameters(self.model).items():
            for key, value in self.optimizer.state.get(param, {}).items():
                arrays[f"{name}/{key}"] = value.detach().to("cpu", torch.float32).numpy().copy()
        return arrays

    def load_optimizer_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore what `optimizer_state_arrays` returned (onto a fresh optimizer); params it lacks start fresh."""
        for name, param in trainable_parameters(self.model).items():
            state = {
                key: torch.as_tensor(arrays[f"{name}/{key}"]).to(param.device, param.dtype if key != "step" else torch.float32)
                for key in ("step", "exp_avg", "exp_avg_sq")
                if f"{name}/{key}" in arrays
            }
            if len(state) == 3:
                self.optimizer.state[param] = state

    def sample(
        self,
        prompts: list[str],
        num_generations: int,
        max_completion_length: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        greedy: bool = False,
    ) -> Rollouts:
        """Render task prompts (chat template) and roll them out with the configured backend."""
        try:
            return self._generate(prompts, num_generations, max_completion_length, temperature, top_p, greedy)
        except RuntimeError as error:
            if "probability tensor contains" not in str(error):  # torch.multinomial on NaN/Inf probabilities
                raise
            raise TrainingError(
                f"sampling at GRPO step {self.steps_taken + 1}{self.step_context}: the policy's next-token probabilities are NaN or Inf, "
                f"so its weights diverged; likely cause: grpo.learning_rate = {self.config.learning_rate:g} too high, "
                f"{self._lora_scale_text()}or rewards too large for it (tasks.*.reward_scale, reward weights, "
                "grpo.scale_rewards = 'none'). Lower them and run again"
            ) from None

    def _lora_scale_text(self) -> str:
        """'model.lora.alpha / rank = 64 / 16 = 4 too large, ' for a LoRA policy: LoRA multiplies every update by
        that scale, so a large one diverges like a large learning rate and must be named beside it."""
        lora = (getattr(self.model, "peft_config", None) or {}).get("default")
        alpha, rank = getattr(lora, "lora_alpha", None), getattr(lora, "r", None)
        if not alpha or not rank:
            return ""
        return f"model.lora.alpha / rank = {alpha:g} / {rank} = {alpha / rank:g} too large, "

    def _generate(self, prompts, num_generations, max_completion_length, temperature, top_p, greedy) -> Rollouts:
        return self.generate_fn(
            self.model,
            self.tokenizer,
            self.prompt_format.render(self.tokenizer, prompts),
            num_generations,
            max_completion_length,
            temperature=temperature,
            top_p=top_p,
            greedy=greedy,
            add_special_tokens=self.prompt_format.add_special_tokens,
            share_prompts=self.config.share_prompt_prefix,
        )

    def _stop_token_ids(self) -> list[int]:
        """Tokens that end a completion (EOS, and pad as TRL counts it); any other last token means truncated."""
        ids = [self.tokenizer.eos_token_id, self.tokenizer.pad_token_id]
        return sorted({int(i) for i in ids if i is not None})

    @torch.inference_mode()
    def _reference_log_probs(self, rollouts) -> torch.Tensor:
        if self.reference is not None:
            return completion_log_probs(self.reference, rollouts, self.config.temperature, self.share_prompts)
        with self.model.disable_adapter():
            return completion_log_probs(self.model, rollouts, self.config.temperature, self.share_prompts)

    def _rollout(self, examples: list[Example]) -> Rollouts:
        """G sampled completions per prompt from the current policy, with the rollout settings."""
        cfg = self.config
        prompts = [ex.prompt for ex in examples]
        return self.sample(prompts, cfg.num_generations, cfg.max_completion_length, cfg.temperature, cfg.top_p)

    def _score(self, examples: list[Example], rollouts: Rollouts):
        """(examples repeated G times to align with the completions, their rewards)."""
        grouped_examples = [ex for ex in examples for _ in range(self.config.num_generations)]
        completion_ids = [row[mask.bool()].tolist() for row, mask in zip(rollouts.completion_ids, rollouts.completion_mask)]
        scored = compute_rewards(grouped_examples, rollouts.completions, self.reward, completion_ids=completion_ids)
        return grouped_examples, scored

    def _micro_batches(self, rollouts: Rollouts, loss_mask: torch.Tensor):
        """((start, stop), loss share, token share) per micro-batch of whole prompt groups.

        The loss of the whole batch is Σ share · loss(micro-batch): for per-token normalisers (bnpo; dapo
        gets the batch's token count instead) the share is the micro-batch's part of the loss tokens, for
        per-sequence ones (grpo, dr_grpo) its part of the rows. The token share weighs the KL and clip
        metrics, which are token means. The top-entropy mask needs a quantile over the whole batch, so
        it keeps one micro-batch.
        """
        rows, group = rollouts.completion_ids.size(0), rollouts.num_generations
        size = self.config.micro_batch_size
        if size <= 0 or size >= rows or self.config.top_entropy_quantile < 1.0:
            yield (0, rows), 1.0, 1.0
            return
        step = max(1, size // group) * group
        tokens = loss_mask.sum(1)  # (N,)
        total_tokens = float(tokens.sum().clamp(min=1.0))
        for begin in range(0, rows, step):
            end = min(begin + step, rows)
            token_share = float(tokens[begin:end].sum()) / total_tokens
            if self.config.loss_type == "bnpo":
                share = token_share
            elif self.config.loss_type == "dapo":
                share = 1.0  # normalised by the whole batch's tokens (num_items_in_batch)
            else:
                share = (end - begin) / rows
            yield (begin, end), share, token_share

    def _micro_batch_loss(self, rollouts: Rollouts, rows: tuple[int, int], advantages, loss_mask, old_log_probs, ref_log_probs):
        """The GRPO loss of rows `rows` of the batch, with their logits only in memory."""
        cfg = self.config
        begin, end = rows
        chunk = rollouts.rows(begin, end)
        mask = loss_mask[begin:end]
        logits = completion_logits(self.model, chunk, self.share_prompts)  # (n, T, V)
        log_probs = token_log_probs(logits, chunk.completion_ids, cfg.temperature)  # (n, T)
        entropy_mask = None
        if cfg.top_entropy_quantile < 1.0:
            entropy_mask = high_entropy_mask(token_entropies(logits, cfg.temperature), mask, cfg.top_entropy_quantile)
        del logits
        return grpo_loss(
            log_probs,
            None if old_log_probs is None else old_log_probs[begin:end],
            advantages[begin:end],
            mask,
            epsilon_low=cfg.epsilon,
            epsilon_high=cfg.effective_epsilon_high,
            beta=cfg.beta,
            ref_log_probs=None if ref_log_probs is None else ref_log_probs[begin:end],
            loss_type=cfg.loss_type,
            max_completion_length=cfg.max_completion_length,
            importance_sampling_level=cfg.importance_sampling_level,
            delta=cfg.delta,
            entropy_mask=entropy_mask,
            num_items_in_batch=float(loss_mask.sum()) if cfg.loss_type == "dapo" else None,
        )

    @torch.inference_mode()
    def prompt_rewards(self, examples: list[Example]) -> np.ndarray:
        """(B,) mean reward of G fresh samples per prompt from the current policy; no training.

        FGRPO's in-round gain compares this for θ_t and θ_k on the same prompts.
        """
        _, scored = self._score(examples, self._rollout(examples))
        return np.asarray(scored.rewards, dtype=np.float64).reshape(-1, self.config.num_generations).mean(axis=1)

    def step(self, examples: list[Example], proximal: ProximalTerm | None = None) -> dict[str, float]:
        """One GRPO step on a batch of prompts; returns metrics (train/… names)."""
        cfg = self.config
        start = time.perf_counter()
        # 1. sample G completions per prompt
        rollouts = self._rollout(examples)
        generation_s = time.perf_counter() - start
        # 2. reward each completion (examples repeated G times to align)
        grouped_examples, scored = self._score(examples, rollouts)
        rewards = torch.as_tensor(scored.rewards, dtype=torch.float32, device=rollouts.completion_ids.device)
        # 3. group-relative advantages
        if cfg.multi_objective_aggregation == "normalize_then_sum":  # each reward function normalised in its group
            per_func = torch.as_tensor(scored.term_rewards, dtype=torch.float32, device=rewards.device)  # (N, K)
            advantages = normalize_then_sum_advantages(per_func, torch.as_tensor(scored.term_weights), cfg.num_generations)
        else:
            advantages = group_advantages(rewards, cfg.num_generations, cfg.scale_rewards)  # (N,)
        # 4. log-probs that stay fixed over the batch's iterations
        old_log_probs = None
        if cfg.num_iterations > 1:
            with torch.inference_mode():
                old_log_probs = completion_log_probs(self.model, rollouts, cfg.temperature, self.share_prompts).clone()
        ref_log_probs = self._reference_log_probs(rollouts).clone() if cfg.beta > 0 else None
        # the loss mask: completion tokens, minus truncated completions (TRL's mask_truncated_completions)
        truncated = truncated_completions(rollouts.completion_ids, rollouts.completion_mask, self._stop_token_ids())  # (N,)
        loss_mask = rollouts.completion_mask
        if cfg.mask_truncated_completions:
            loss_mask = loss_mask * (~truncated).unsqueeze(1).to(loss_mask.dtype)  # (N, T)
        # 5. optimise (generation restored the mode it found; switching modes walks every module)
        if not self.model.training:
            self.model.train()
        totals: dict[str, float] = defaultdict(float)
        for _ in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            loss_value, kl, clip_fraction = 0.0, 0.0, 0.0
            for rows, share, token_share in self._micro_batches(rollouts, loss_mask):
                out = self._micro_batch_loss(rollouts, rows, advantages, loss_mask, old_log_probs, ref_log_probs)
                (out.loss * share).backward()  # the one-batch loss is the share-weighted sum of these
                loss_value += float(out.loss.detach()) * share
                kl += out.kl * token_share
                clip_fraction += out.clip_fraction * token_share
            if proximal is not None and proximal.mu > 0:
                penalty = proximal_penalty(self.model, proximal)
                penalty.backward()
                loss_value += float(penalty.detach())
            grad_norm = torch.nn.utils.clip_grad_norm_(list(trainable_parameters(self.model).values()), cfg.max_grad_norm)
            self.optimizer.step()
            totals["loss"] += loss_value / cfg.num_iterations
            totals["kl"] += kl / cfg.num_iterations
            totals["clip_frac"] += clip_fraction / cfg.num_iterations
            totals["grad_norm"] += float(grad_norm) / cfg.num_iterations
        elapsed = time.perf_counter() - start
        # 6. log
        prompt_means = scored.rewards.reshape(-1, cfg.num_generations).mean(axis=1)  # (B,) prompts are the iid units
        metrics = {
            "train/reward_mean": float(scored.rewards.mean()),
            "train/reward_std": float(scored.rewards.std()),
            "train/reward_mean_var": mean_variance(prompt_means),
            "train/accuracy": float(np.mean(scored.correct)),
            "train/completion_len": float(rollouts.completion_mask.sum(1).float().mean()),
            "train/truncated_frac": float(truncated.float().mean()),  # TRL's completions/clipped_ratio
            "train/tokens_per_s": rollouts.num_completion_tokens / max(elapsed, 1e-9),
            "train/generation_s": generation_s,
            "train/step_s": elapsed,
            "train/frac_zero_std_groups": float(
                (scored.rewards.reshape(-1, cfg.num_generations).std(axis=1) == 0).mean()
            ),
        }
        metrics.update({f"train/{k}": v for k, v in totals.items()})
        families = np.array([ex.family for ex in grouped_examples])
        for family in sorted(set(families)):
            metrics[f"train/reward/{family}"] = float(scored.rewards[families == family].mean())
        self.steps_taken += 1
        return metrics


def mean_variance(values: np.ndarray) -> float:
    """Squared standard error of the mean of `values` (B,): s²/B with ddof = 1; 0.0 for B < 2."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.var(ddof=1) / len(values)) if len(values) > 1 else 0.0


def proximal_penalty(model, proximal: ProximalTerm) -> torch.Tensor:
    """μ/2 Σ ‖θ − θ_anchor‖² over the trainable weights."""
    total = torch.zeros((), device=next(model.parameters()).device)
    for name, param in trainable_parameters(model).items():
        total = total + (param - proximal.anchor[name]).pow(2).sum()
    return 0.5 * proximal.mu * total


@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch's global RNG for a block, restoring the previous state after."""
    state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
