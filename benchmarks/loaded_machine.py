"""Benchmark: local GRPO step time on a loaded machine vs idle, with fgrpo's default thread policy.

    python benchmarks/loaded_machine.py [--steps 10] [--warmup 2] [--prompts 8] [--generations 8] [--length 16] [--threads K]

The step runs in this process with the thread count fgrpo's policy picks for
one process (`fgrpo.core.threads.auto_threads`: the cores that no other
process keeps busy, or OMP_NUM_THREADS when set); `--threads` overrides it.
It is timed idle, then beside each load the script starts (and stops, by its
pid): a busy-loop process, and a second torch process with torch's default
thread count (one thread per core, as a run without a thread policy). Under
each load the policy looks at the machine after the load has run for 1 s, as
a run started then would, and the step is timed at the threads it picks and,
where that differs, at torch's default of one thread per core: the collapse
the policy avoids. Each load ends on its own after `--load-limit-s` seconds.
Each timing gets `--warmup` steps to settle. The last two lines give
loaded-to-idle median step time, one per load.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time

BUSY_LOOP = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    pass\n"
TORCH_LOAD = (
    "import sys, time, torch\nend = time.time() + float(sys.argv[1])\na = torch.randn(384, 384)\n"
    "while time.time() < end:\n    a = torch.tanh(a @ a)\n"
)


def start_load(code: str, limit_s: float, nice: int) -> subprocess.Popen:
    """A load process with torch's default threads (no thread budget in its environment)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    return subprocess.Popen(
        [sys.executable, "-c", code, str(limit_s)], env=env, preexec_fn=(lambda: os.nice(nice)) if nice else None
    )


def stop_load(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: fgrpo's policy)")
    parser.add_argument("--nice", type=int, default=0, help="niceness of the load processes (0: the same priority)")
    parser.add_argument("--load-limit-s", type=float, default=900.0, help="each load process ends by itself after this")
    args = parser.parse_args()

    from fgrpo.core.threads import apply_threads, auto_threads, available_cores

    from fgrpo.config import Config
    from fgrpo.core.learner import GRPOLearner
    from fgrpo.core.pipeline import build_reward, build_task_pool, load_policy

    config = Config.model_validate(
        {"grpo": {"num_generations": args.generations, "max_completion_length": args.length},
         "tasks": {"train_per_family": 200, "test_per_family": 10}}
    )
    model, tokenizer = load_policy(config.model, config.tasks, seed=0)
    learner = GRPOLearner(model, tokenizer, config.grpo, build_reward(config.tasks))
    train, _ = build_task_pool(config.tasks)
    random.Random(0).shuffle(train)

    import torch

    def median_step_s() -> float:
        times = []
        for i in range(args.warmup + args.steps):
            batch = [train[(i * args.prompts + j) % len(train)] for j in range(args.prompts)]
            torch.manual_seed(i)
            start = time.perf_counter()
            learner.step(batch)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    def timed(threads: int) -> float:
        apply_threads(threads)
        return median_step_s()

    cores = available_cores()
    idle_threads = apply_threads(auto_threads(1, args.threads or "auto"))
    rows = {"idle": (idle_threads, timed(idle_threads), None)}
    for name, code in (("busy loop", BUSY_LOOP), ("torch process", TORCH_LOAD)):
        load = start_load(code, args.load_limit_s, args.nice)
        try:
            time.sleep(1.0)  # the load is running before the policy looks at the machine, as for a run started now
            threads = auto_threads(1, args.threads or "auto")
            without_policy = timed(cores) if threads != cores else None  # torch's default: one thread per core
            rows[name] = (threads, timed(threads), without_policy)
        finally:
            stop_load(load)

    idle = rows["idle"][1]
    print(f"cores={cores} prompts={args.prompts} G={args.generations} max_len={args.length} load nice={args.nice}")
    print(f"{'load':<16}{'threads':>8}{'median step (s)':>16}{'loaded / idle':>15}{'at ' + str(cores) + ' threads':>14}")
    for name, (threads, seconds, without) in rows.items():
        other = "" if without is None else f"{without / idle:.2f}"
        print(f"{name:<16}{threads:>8}{seconds:>16.3f}{seconds / idle:>15.2f}{other:>14}")
    for name in ("busy loop", "torch process"):
        threads, seconds, without = rows[name]
        other = "" if without is None else f" (torch's default {cores} threads: {without / idle:.2f}x)"
        print(f"ratio: {name} loaded / idle step time = {seconds / idle:.2f}x at {threads} thread(s){other}")


if __name__ == "__main__":
    main()
