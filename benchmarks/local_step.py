"""Benchmark: one local GRPO step (rollout + reward + loss + backward + optimizer) on the tiny model.

    python benchmarks/local_step.py [--steps 20] [--prompts 8] [--generations 8] [--length 8]

Prints a table of per-step medians and a final line with completion tokens/s.
Warm-up steps are excluded; the median of the measured steps is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fgrpo.config import Config
from fgrpo.learner import GRPOLearner
from fgrpo.pipeline import build_reward, build_task_pool, load_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--length", type=int, default=8)
    args = parser.parse_args()

    config = Config.model_validate(
        {
            "grpo": {"num_generations": args.generations, "max_completion_length": args.length},
            "tasks": {"train_per_family": 200, "test_per_family": 10},
        }
    )
    train, _ = build_task_pool(config.tasks)
    model, tokenizer = load_policy(config.model, config.tasks, seed=0)
    learner = GRPOLearner(model, tokenizer, config.grpo, build_reward(config.tasks))
    torch.manual_seed(0)
    rows = []
    for i in range(args.warmup + args.steps):
        batch = [train[(i * args.prompts + j) % len(train)] for j in range(args.prompts)]
        start = time.perf_counter()
        metrics = learner.step(batch)
        elapsed = time.perf_counter() - start
        if i >= args.warmup:
            tokens = metrics["train/completion_len"] * args.prompts * args.generations
            rows.append((elapsed, metrics["train/generation_s"], tokens))
    step_s = statistics.median(r[0] for r in rows)
    gen_s = statistics.median(r[1] for r in rows)
    tokens = statistics.median(r[2] for r in rows)
    device = next(model.parameters()).device
    print(f"device={device} threads={torch.get_num_threads()} prompts={args.prompts} G={args.generations} max_len={args.length}")
    print(f"{'metric':<28}{'median':>12}")
    print(f"{'step time (s)':<28}{step_s:>12.4f}")
    print(f"{'  generation (s)':<28}{gen_s:>12.4f}")
    print(f"{'  reward+loss+update (s)':<28}{step_s - gen_s:>12.4f}")
    print(f"{'completion tokens / step':<28}{tokens:>12.1f}")
    print(f"local GRPO step: {tokens / step_s:.0f} completion tokens/s ({args.prompts * args.generations} completions/step)")


if __name__ == "__main__":
    main()
