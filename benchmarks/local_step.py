"""Benchmark: one local GRPO step (rollout + reward + loss + backward + optimizer) on the tiny model, with and without prompt sharing.

    python benchmarks/local_step.py [--steps 20] [--warmup 3] [--prompts 8] [--generations 8] [--length 16] [--threads K]

`grpo.share_prompt_prefix` (on by default) prefills and scores each prompt once
for its G completions and repeats the KV cache, instead of running the prompt
G times (see `rollout.shared_prompt_logits`). Two learners with the same
weights, one with and one without, alternate steps on the same prompts in one
process; warm-up steps are excluded and medians reported. The last line is the
speed-up in completion tokens/s. `benchmarks/trl_step.py` compares with TRL.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch

from fgrpo.config import Config
from fgrpo.core.learner import GRPOLearner
from fgrpo.core.pipeline import build_reward, build_task_pool, load_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    learners = {}
    for share in (True, False):
        config = Config.model_validate(
            {
                "grpo": {"num_generations": args.generations, "max_completion_length": args.length, "share_prompt_prefix": share},
                "tasks": {"train_per_family": 200, "test_per_family": 10},
            }
        )
        model, tokenizer = load_policy(config.model, config.tasks, seed=0)
        learners[share] = GRPOLearner(copy.deepcopy(model), tokenizer, config.grpo, build_reward(config.tasks))
    train, _ = build_task_pool(config.tasks)
    random.Random(0).shuffle(train)  # mixed families per batch, as training samples them
    rows: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
    for i in range(args.warmup + args.steps):
        batch = [train[(i * args.prompts + j) % len(train)] for j in range(args.prompts)]
        for share, learner in learners.items():
            torch.manual_seed(i)
            start = time.perf_counter()
            metrics = learner.step(batch)
            elapsed = time.perf_counter() - start
            if i >= args.warmup:
                tokens = metrics["train/completion_len"] * args.prompts * args.generations
                rows[share].append((elapsed, metrics["train/generation_s"], tokens))

    def median(share: bool, column: int) -> float:
        return statistics.median(r[column] for r in rows[share])

    device = next(learners[True].model.parameters()).device
    print(f"device={device} threads={torch.get_num_threads()} prompts={args.prompts} G={args.generations} max_len={args.length}")
    print(f"{'median per step':<28}{'shared':>12}{'full':>12}")
    for label, column in (("step time (s)", 0), ("  generation (s)", 1), ("completion tokens / step", 2)):
        print(f"{label:<28}{median(True, column):>12.4f}{median(False, column):>12.4f}")
    speed = {share: median(share, 2) / median(share, 0) for share in rows}
    print(f"{'completion tokens / s':<28}{speed[True]:>12.0f}{speed[False]:>12.0f}")
    print(f"ratio: prompt sharing speeds a local GRPO step up {speed[True] / speed[False]:.2f}x ({speed[True]:.0f} completion tokens/s)")


if __name__ == "__main__":
    main()
