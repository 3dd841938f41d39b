"""Benchmark: fgrpo's local GRPO step vs TRL's GRPOTrainer step, same model and same work, in one process.

    python benchmarks/trl_step.py [--steps 20] [--warmup 3] [--prompts 8] [--generations 8] [--length 16] [--threads 1,2]
    python benchmarks/trl_step.py --model smollm2-135m [--steps 3] [--warmup 1] [--prompts 8] [--generations 8]
                                  [--length 48] [--micro-batch-size 0] [--samplers auto] [--threads 2]

`--model tiny` (the default) is the project's warm-started tiny Llama with compact prompts; `--model smollm2-135m`
is the real SmolLM2-135M-Instruct (49,152-token vocabulary) with the built-in families asked in words through its
chat template (TRL gets the same prompts as conversations and renders them with the same template), float32,
LoRA r = 16, beta = 0, at issue 26's shape: 64 sequences a step (8 prompts x 8), 48 new tokens. A shape option left
out takes the model's default (bench_setup.DEFAULTS). A real-model step takes about a minute (fgrpo) to two (TRL)
on 2 CPU threads, hence fewer steps by default; `--samplers auto,hf` adds fgrpo with transformers' `generate`.

What: completion tokens/s of one local GRPO step (sample G completions per prompt, reward, group advantages,
clipped loss, backward, grad clip, AdamW step) for (a) `fgrpo.core.learner.GRPOLearner.step` and (b) `trl.GRPOTrainer`.
Both start from the same weights (TRL trains a deep copy of fgrpo's LoRA-wrapped model), see the same
prompts in the same order, and use the same G, max_completion_length, temperature/top_p, loss settings (fgrpo's
GRPOConfig: loss_type, beta, epsilon, scale_rewards, num_iterations, learning_rate, weight_decay, max_grad_norm)
and the same reward (fgrpo's WeightedReward wrapped as a TRL reward function; the dataset carries each row's index
into the examples, so the reward sees fgrpo's own Example, answer style and all).

Why: every fgrpo client runs its own GRPO step instead of a Trainer; this measures what that costs or saves
against TRL, and checks that the two losses agree on identical tensors.

TRL is set up so that one optimizer step does the same work as fgrpo's: per_device_train_batch_size = B*G,
gradient_accumulation_steps = steps_per_generation = num_iterations = 1 (one generation per step, so TRL skips
the old-policy forward), beta = 0 (fgrpo's default: no reference forward), constant LR, no eval, saving or
logging. The task pool is shuffled once with --seed (mixed families per batch, as `fgrpo train` samples) and both
sides walk it in the same order (TRL's shuffle_dataset off). Turned off because fgrpo does not do them: TRL's
default gradient checkpointing (recomputes activations in backward) and its default bf16 autocast (both sides run
the model in the dtype fgrpo loads: fp32 on CPU, bf16 weights with fp32 LoRA on CUDA). Left as TRL does them (its
own cost or gain): the fused LM head that also computes every token's entropy (without Triton, i.e. on CPU, it
scores all prompt+completion positions), per-step metrics with host syncs, and its default fused AdamW.

fgrpo runs once per sampler in --samplers (default: both for tiny, the lean loop only for smollm2-135m), as
learners on the same weights that alternate steps with the same seed (so they sample the same tokens): with
`grpo.sampler = "auto"` (the lean decode loop, `fgrpo.core.sampler`) and with "hf" (transformers' `generate`, what
fgrpo used before). `--micro-batch-size M` sets fgrpo's `grpo.micro_batch_size` (the loss in micro-batches of whole
prompt groups: same gradient, less memory; `step_memory.py` measures the memory). `--threads 1,2` repeats the whole comparison (fresh copies of the same weights)
at each thread count in the same process, with one `ratio:` line per sampler and thread count.

Timing (wall time, and CPU time beside it: at 1 thread the CPU time is much less sensitive to other processes on a
loaded machine): fgrpo, `learner.step`; TRL, on_step_begin -> on_step_end of a TrainerCallback (generation
through optimizer step). Completion tokens count up to and including the first EOS on both sides (TRL's are
counted in the reward function from `completion_ids`). Warm-up steps are excluded; medians are reported.
On a busy machine pass --threads <= the idle cores: OpenMP threads sharing a loaded core can slow a step 100x.

Loss check: on one batch of fgrpo rollouts, fgrpo's `grpo_loss` and TRL's `GRPOTrainer._compute_loss` (the trainer
built here, its forward replaced by fgrpo's log-probs, as tests/test_grpo.py does) on identical tensors; prints the
max |difference| of the loss and of the LoRA gradients and exits 1 above 1e-5. The batch is the first with reward
spread; when none has any (a real model's first steps often have none), its advantages are seeded random numbers,
so the gradients compared are not zero, and the line says so.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings

import torch
import transformers
import trl
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import GRPOConfig as TRLConfig
from trl import GRPOTrainer

from bench_setup import add_shape_arguments, benchmark_config, fill_defaults, load, step_batches
from fgrpo.core.chat import PromptFormat
from fgrpo.core.grpo import group_advantages, grpo_loss
from fgrpo.core.learner import GRPOLearner
from fgrpo.core.model import trainable_parameters
from fgrpo.data.rewards import compute_rewards
from fgrpo.core.rollout import completion_log_probs
from fgrpo.data.tasks import Example

TOLERANCE = 1e-5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    parser.add_argument("--threads", default=None,
                        help="torch threads, or a comma-separated list run one after another (default: torch's)")
    parser.add_argument("--samplers", default=None,
                        help="fgrpo's grpo.sampler values to run, comma-separated (default: auto,hf for tiny, auto otherwise)")
    parser.add_argument("--micro-batch-size", type=int, default=0, help="fgrpo's grpo.micro_batch_size (0 = one batch)")
    args = fill_defaults(parser.parse_args())
    args.samplers = (args.samplers or ("auto,hf" if args.model == "tiny" else "auto")).split(",")
    return args


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fgrpo_reward_for_trl(reward, examples: list[Example], token_counts: list[int]):
    """fgrpo's reward (functions, weights, reward_scale) as a TRL reward function; records tokens per call.

    The dataset's `index` column points into `examples`, so the reward sees fgrpo's own Example (its answer style
    and checker included). Conversational completions arrive as [{"role": "assistant", "content": text}].
    """

    def fgrpo_reward(prompts, completions, index, completion_ids, **kwargs):
        token_counts.append(sum(len(ids) for ids in completion_ids))
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rows = [examples[i] for i in index]
        return compute_rewards(rows, texts, reward, completion_ids=completion_ids).rewards.tolist()

    return fgrpo_reward


def trl_rows(examples: list[Example], prompt_format: PromptFormat) -> list[dict]:
    """TRL's dataset rows: conversations when fgrpo renders a chat template (TRL then applies the same template),
    else the raw prompt; each row carries its index into `examples` for the reward."""
    if prompt_format.template is None:
        return [{"prompt": prompt_format.render(None, [ex.prompt])[0], "index": i} for i, ex in enumerate(examples)]
    return [{"prompt": prompt_format.messages(ex.prompt), "index": i} for i, ex in enumerate(examples)]


class StepTimer(TrainerCallback):
    """Seconds of each optimizer step (generation included) of a Trainer."""

    def __init__(self):
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        sync()
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        self.seconds.append(time.perf_counter() - self.start)
        self.cpu_seconds.append(time.process_time() - self.cpu_start)


def without_stale_gguf_marker(model):
    """`model` without the GGUF quantizer that a converted GGUF folder's config.json still names.

    The cached SmolLM2-135M folder holds plain fp32 weights (fgrpo dequantized the GGUF once), but its config.json
    keeps `quantization_config = {"quant_method": "gguf"}`, so transformers attaches a GGUF quantizer on load and
    TRL's Trainer refuses to train a "GGUF-quantized" model. The weights are not quantized: drop the marker.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(base.config, "quantization_config", None), "quant_method", None) == "gguf":
        base.hf_quantizer = None
        base.is_quantized = False
        del base.config.quantization_config
    return model


def build_trainer(model, tokenizer, grpo, batches, prompt_format, seed, out_dir, reward, token_counts, timer,
                  gradient_checkpointing: bool = False) -> GRPOTrainer:
    """TRL's GRPOTrainer doing fgrpo's step: B*G completions per optimizer step, same loss and sampling.

    `gradient_checkpointing=True` is TRL's own default (recompute activations in backward), for memory comparisons.
    """
    examples = [ex for batch in batches for ex in batch]
    on_cuda = torch.cuda.is_available()
    config = TRLConfig(
        # one generation of B*G completions and one optimizer step per step
        per_device_train_batch_size=len(batches[0]) * grpo.num_generations, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=grpo.num_iterations, max_steps=len(batches), shuffle_dataset=False,
        # sampling
        num_generations=grpo.num_generations, max_completion_length=grpo.max_completion_length,
        temperature=grpo.temperature, top_p=grpo.top_p, top_k=0, seed=seed,
        # loss and optimizer (fgrpo keeps its learning rate constant)
        beta=grpo.beta, epsilon=grpo.epsilon, epsilon_high=grpo.epsilon_high, loss_type=grpo.loss_type,
        scale_rewards=grpo.scale_rewards, learning_rate=grpo.learning_rate, weight_decay=grpo.weight_decay,
        max_grad_norm=grpo.max_grad_norm, lr_scheduler_type="constant",
        # what fgrpo does not do: activation recomputation, autocast, eval, saving, logging
        gradient_checkpointing=gradient_checkpointing, bf16=False, fp16=False, use_cpu=not on_cuda, dataloader_pin_memory=on_cuda,
        output_dir=out_dir, report_to="none", logging_steps=10**9, save_strategy="no", eval_strategy="no",
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=without_stale_gguf_marker(model), reward_funcs=fgrpo_reward_for_trl(reward, examples, token_counts), args=config,
                          train_dataset=Dataset.from_list(trl_rows(examples, prompt_format)),
                          processing_class=tokenizer, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # no end-of-training metrics dump
    return trainer


def run_fgrpo(learners: dict[str, GRPOLearner], batches, num_completions: int, seed: int) -> dict[str, list[tuple]]:
    """(seconds, completion tokens, CPU seconds) of each `learner.step`, the learners alternating on each batch."""
    rows: dict[str, list[tuple]] = {name: [] for name in learners}
    for i, batch in enumerate(batches):
        order = list(learners) if i % 2 == 0 else list(reversed(learners))  # neither always runs first
        for name in order:
            torch.manual_seed(seed + i)
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            metrics = learners[name].step(batch)
            sync()
            rows[name].append((time.perf_counter() - start, metrics["train/completion_len"] * num_completions,
                               time.process_time() - cpu_start))
    return rows


def run_trl(trainer: GRPOTrainer, timer: StepTimer, token_counts: list[int]) -> list[tuple]:
    """(seconds, completion tokens, CPU seconds) of each TRL optimizer step."""
    trainer.train()
    if len(timer.seconds) != len(token_counts):
        raise RuntimeError(f"{len(timer.seconds)} timed TRL steps but {len(token_counts)} reward calls")
    return list(zip(timer.seconds, map(float, token_counts), timer.cpu_seconds))


def rollout_with_signal(learner: GRPOLearner, batches, grpo):
    """fgrpo rollouts and advantages of the first batch where some group's rewards differ; else the last batch's
    rollouts with seeded random advantages (a real model often starts with no reward spread, and zero advantages
    would make the check compare zero gradients), and whether they are synthetic."""
    for batch in batches:
        rollouts = learner.sample([ex.prompt for ex in batch], grpo.num_generations, grpo.max_completion_length,
                                  grpo.temperature, grpo.top_p)
        grouped = [ex for ex in batch for _ in range(grpo.num_generations)]
        ids = [row[m.bool()].tolist() for row, m in zip(rollouts.completion_ids, rollouts.completion_mask)]
        scored = compute_rewards(grouped, rollouts.completions, learner.reward, completion_ids=ids)
        rewards = torch.as_tensor(scored.rewards, dtype=torch.float32, device=rollouts.completion_ids.device)
        advantages = group_advantages(rewards, grpo.num_generations, grpo.scale_rewards)
        if advantages.abs().max() > 0:
            return rollouts, advantages, False
    generator = torch.Generator().manual_seed(0)
    advantages = torch.randn(advantages.shape, generator=generator).to(advantages.device)
    return rollouts, advantages, True


def loss_check(learner: GRPOLearner, trainer: GRPOTrainer, batches, grpo) -> tuple[float, float, float, float, bool]:
    """|fgrpo - TRL| of the loss and LoRA grads on fgrpo rollouts; fgrpo's max |grad|; the forwards' |logp diff|;
    whether the advantages were synthetic (no batch had reward spread)."""
    rollouts, advantages, synthetic = rollout_with_signal(learner, batches, grpo)
    mask = rollouts.completion_mask
    learner.model.train()
    log_probs = completion_log_probs(learner.model, rollouts, grpo.temperature)  # (N, T), with grad
    ours = grpo_loss(log_probs, None, advantages, mask, epsilon_low=grpo.epsilon,
                     epsilon_high=grpo.effective_epsilon_high, beta=grpo.beta, loss_type=grpo.loss_type,
                     max_completion_length=grpo.max_completion_length).loss
    params = list(trainable_parameters(learner.model).values())
    our_grads = torch.autograd.grad(ours, params, retain_graph=True)
    inputs = {"prompt_ids": rollouts.prompt_ids, "prompt_mask": rollouts.prompt_mask,
              "completion_ids": rollouts.completion_ids, "completion_mask": mask,
              "advantages": advantages, "num_items_in_batch": mask.sum()}
    # TRL's own forward on the same tensors (its model is an untrained copy of fgrpo's), for information.
    with torch.no_grad():
        input_ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], 1)
        attention = torch.cat([rollouts.prompt_mask, mask], 1)
        trl_log_probs, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention, mask.size(1))
    logp_diff = float(((trl_log_probs - log_probs.detach()) * mask).abs().max())
    # TRL's loss on fgrpo's log-probs: replace the trainer's forward, as tests/test_grpo.py does.
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (log_probs, torch.zeros_like(log_probs), None)
    trainer.current_gradient_accumulation_steps = 1  # what train() sets with gradient_accumulation_steps = 1
    trainer.model.train()
    try:
        theirs = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    finally:
        del trainer._get_per_token_logps_and_entropies
        trainer._metrics["train"].clear()
    their_grads = torch.autograd.grad(theirs, params)
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(our_grads, their_grads))
    grad_max = max(float(g.abs().max()) for g in our_grads)
    return float((ours - theirs).abs()), grad_diff, grad_max, logp_diff, synthetic


def medians(rows: list[tuple]) -> tuple[float, float, float, float]:
    """(step s, completion tokens/step, tokens/s, tokens per CPU second), each the median over the measured steps."""
    return (statistics.median(s for s, _, _ in rows), statistics.median(t for _, t, _ in rows),
            statistics.median(t / s for s, t, _ in rows), statistics.median(t / c for _, t, c in rows))


def compare(model, tokenizer, grpo, reward, prompt_format, batches, args, threads: int, check_loss: bool):
    """One fgrpo-vs-TRL comparison at `threads` torch threads, on fresh copies of `model`; loss check if asked."""
    torch.set_num_threads(threads)
    learners = {sampler: GRPOLearner(copy.deepcopy(model), tokenizer, grpo.model_copy(update={"sampler": sampler}), reward,
                                     prompt_format=prompt_format)
                for sampler in args.samplers}
    token_counts: list[int] = []
    timer = StepTimer()
    check = None
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = build_trainer(copy.deepcopy(model), tokenizer, grpo, batches, prompt_format, args.seed, out_dir,
                                reward, token_counts, timer)
        if check_loss:
            checker = GRPOLearner(copy.deepcopy(model), tokenizer, grpo, reward, prompt_format=prompt_format)
            check = loss_check(checker, trainer, batches, grpo)
            del checker
        torch.set_num_threads(threads)
        fgrpo_rows = run_fgrpo(learners, batches, args.prompts * args.generations, args.seed)
        torch.set_num_threads(threads)
        trl_rows = run_trl(trainer, timer, token_counts)
    if torch.get_num_threads() != threads:
        print(f"warning: torch threads changed to {torch.get_num_threads()} during the run")
    return {name: medians(rows[args.warmup:]) for name, rows in fgrpo_rows.items()}, medians(trl_rows[args.warmup:]), check


SAMPLER_LABELS = {"auto": "lean sampler", "hf": "generate"}


def main() -> int:
    args = parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    config = benchmark_config(args.model, args.generations, args.length, args.micro_batch_size)
    grpo = config.grpo
    model, tokenizer, reward, prompt_format, train = load(config, args.seed)
    batches = step_batches(train, args.prompts, args.warmup + args.steps)
    device = next(model.parameters()).device
    print(f"model={args.model} device={device} threads={args.threads or thread_counts[0]} B={args.prompts} "
          f"G={args.generations} T={args.length} micro_batch_size={args.micro_batch_size} "
          f"chat_template={prompt_format.template is not None} steps={args.steps} warmup={args.warmup} "
          f"torch={torch.__version__} transformers={transformers.__version__} trl={trl.__version__}")

    results = {}
    check = None
    columns = [f"fgrpo ({SAMPLER_LABELS[name]})" for name in args.samplers] + ["TRL"]
    for k, threads in enumerate(thread_counts):
        ours, theirs, first_check = compare(model, tokenizer, grpo, reward, prompt_format, batches, args, threads,
                                            check_loss=k == 0)
        check = check or first_check
        results[threads] = (ours, theirs)
        print(f"\n{threads} thread(s), median per step" + "".join(f"{c:>22}" for c in columns))
        for i, name in enumerate(("step time (s)", "completion tokens/step", "completion tokens/s",
                                  "tokens per CPU second")):
            values = [ours[sampler][i] for sampler in args.samplers] + [theirs[i]]
            print(f"{name:<33}" + "".join(f"{v:>22.4g}" for v in values))
    loss_diff, grad_diff, grad_max, logp_diff, synthetic = check
    print(f"\ninfo: TRL's own forward (fused LM head) vs fgrpo's, same weights and tokens: "
          f"max |logp diff| = {logp_diff:.1e}")
    print(f"loss check: |fgrpo - TRL| = {loss_diff:.1e} (loss), {grad_diff:.1e} (max grad; "
          f"fgrpo's max |grad| = {grad_max:.1e}"
          f"{'; no batch had reward spread, so on seeded random advantages' if synthetic else ''})")
    for threads, (ours, theirs) in results.items():
        for sampler in args.samplers:
            print(f"ratio: fgrpo ({SAMPLER_LABELS[sampler]}) / TRL completion tokens/s at {threads} thread(s) = "
                  f"{ours[sampler][2] / theirs[2]:.2f}x ({ours[sampler][3] / theirs[3]:.2f}x in CPU time; median of "
                  f"{args.steps} steps each, {args.warmup} warm-up excluded; {args.model})")
    return 0 if max(loss_diff, grad_diff) <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
