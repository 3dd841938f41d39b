"""Benchmark: the rollout sampler alone, transformers' `generate` vs fgrpo's lean decode loop, in one process.

    python benchmarks/sampler.py [--reps 20] [--warmup 2] [--prompts 32] [--generations 8] [--length 8] [--threads K]
    python benchmarks/sampler.py --model smollm2-135m [--reps 5] [--warmup 1] [--prompts 8] [--generations 8] [--length 48]

What: wall time of `rollout.generate` (B prompts × G samples, up to T new tokens, the warm-started tiny policy with
LoRA, prompts drawn as `fgrpo train` draws them) with `sampler="hf"` and with `sampler="auto"` (the lean loop,
`fgrpo.core.sampler`). The defaults are the quickstart's shape (32 prompts, G = 8, T = 8); `--prompts 8 --length 16`
is `trl_step.py`'s. `--model smollm2-135m` samples from the real SmolLM2-135M-Instruct (LoRA r = 16, fp32) at its
49,152-token vocabulary, with the built-in families asked in words through its chat template, at issue 26's shape
(8 prompts x 8, up to 48 new tokens) unless the shape options say otherwise.

How: the two samplers alternate on the same prompts with the same seed for every repetition, so load on a shared
machine hits both alike; each repetition also checks that they returned the same tokens (exits 1 if not). Warm-up
repetitions are excluded and medians reported; the last line is the speed-up. CPU time (`time.process_time`) is
reported beside wall time: at 1 thread it is much less sensitive to other processes on a loaded machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

from bench_setup import benchmark_config, load
from fgrpo.core.rollout import generate

SAMPLERS = ("hf", "auto")
# Per model: (reps, warmup, prompts, generations, length) unless the command line says otherwise.
DEFAULTS = {"tiny": (20, 2, 32, 8, 8), "smollm2-135m": (5, 1, 8, 8, 48)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(DEFAULTS), default="tiny",
                        help="tiny (built-in) or smollm2-135m (real, chat prompts; cached under $FGRPO_CACHE)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--generations", type=int, default=None)
    parser.add_argument("--length", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    for key, value in zip(("reps", "warmup", "prompts", "generations", "length"), DEFAULTS[args.model]):
        if getattr(args, key) is None:
            setattr(args, key, value)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = benchmark_config(args.model, args.generations, args.length)
    model, tokenizer, _, prompt_format, train = load(config, seed=0)  # the pool shuffled with seed 0, as before
    seconds: dict[str, list[float]] = {name: [] for name in SAMPLERS}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in SAMPLERS}
    tokens: list[int] = []
    same = 0  # repetitions where both samplers returned the same tokens
    for rep in range(args.warmup + args.reps):
        prompts = prompt_format.render(tokenizer, [train[(rep * args.prompts + j) % len(train)].prompt
                                                   for j in range(args.prompts)])
        out = {}
        for name in SAMPLERS if rep % 2 == 0 else reversed(SAMPLERS):  # alternate which goes first
            torch.manual_seed(rep)
            start, cpu_start = time.perf_counter(), time.process_time()
            out[name] = generate(model, tokenizer, prompts, args.generations, args.length, args.temperature,
                                 add_special_tokens=prompt_format.add_special_tokens, sampler=name)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if rep >= args.warmup:
                seconds[name].append(time.perf_counter() - start)
                cpu_seconds[name].append(time.process_time() - cpu_start)
        same += torch.equal(out["hf"].completion_ids, out["auto"].completion_ids)
        if rep >= args.warmup:
            tokens.append(out["auto"].num_completion_tokens)

    median = {name: statistics.median(values) for name, values in seconds.items()}
    cpu = {name: statistics.median(values) for name, values in cpu_seconds.items()}
    device = next(model.parameters()).device
    print(f"model={args.model} vocabulary={len(tokenizer)} device={device} threads={torch.get_num_threads()} B={args.prompts} G={args.generations} T={args.length} "
          f"reps={args.reps} (median completion tokens per call {statistics.median(tokens):.0f})")
    print(f"{'median per call':<28}{'generate':>12}{'lean loop':>12}")
    print(f"{'time (ms)':<28}{1000 * median['hf']:>12.1f}{1000 * median['auto']:>12.1f}")
    print(f"{'CPU time (ms)':<28}{1000 * cpu['hf']:>12.1f}{1000 * cpu['auto']:>12.1f}")
    total = args.warmup + args.reps
    print(f"same tokens in every repetition: {same == total} ({same} of {total})")
    print(f"ratio: lean loop / generate speed = {median['hf'] / median['auto']:.2f}x wall time, "
          f"{cpu['hf'] / cpu['auto']:.2f}x CPU time (median of {args.reps}, interleaved; {args.model})")
    return 0 if same == total else 1


if __name__ == "__main__":
    sys.exit(main())
