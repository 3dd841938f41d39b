"""Benchmark: peak memory (RSS) of a GRPO step, fgrpo vs TRL's GRPOTrainer at the same batch, each arm in its own process.

    python benchmarks/step_memory.py [--model smollm2-135m] [--prompts 8] [--generations 8] [--length 48]
                                     [--micro-batch 8,16] [--trl plain,checkpointing] [--steps 2] [--threads 2]
                                     [--grid-prompts 2,4,8] [--grid-lengths 24,48] [--grid-micro-batch 0,8]

What: the peak resident set size of a process that loads the model and runs --steps GRPO steps (generation,
reward, loss, backward, AdamW) at one shape, on the same model, prompts and settings as `trl_step.py` (real
SmolLM2-135M-Instruct by default: chat prompts, fp32, LoRA r = 16, beta = 0, 64 sequences a step, 48 new tokens).

Why separate processes: peak RSS belongs to a process and only grows, so two arms in one process would both report
the larger. This script starts one child process per arm (itself, with --arm) and reads one RESULT line from each.
The arms at the main shape:
- TRL `GRPOTrainer` as `trl_step.py` sets it up (no gradient checkpointing; "plain") and with TRL's own default,
  gradient checkpointing on ("checkpointing"), both fp32;
- fgrpo without micro-batching (`grpo.micro_batch_size = 0`, the default) and with each size in --micro-batch
  (completions per forward/backward of the loss, whole prompt groups; the same gradient).
Then a grid of fgrpo's peak RSS against batch size (prompts x G sequences) and completion length, each point its own
process, once per --grid-micro-batch value (`--grid-prompts ''` skips the grid). A point already measured as a main
arm is not run again.

Each child also reports its RSS after loading the model (before any step, and before the TRL arm imports TRL) and its
median step time, for context. The last
lines are `ratio:` lines: fgrpo's peak RSS / TRL's at the same batch, one per fgrpo arm and TRL arm.
A step of the real model at the main shape takes about a minute (fgrpo) to two (TRL) on 2 threads; see README.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from bench_setup import add_shape_arguments, benchmark_config, current_rss_mb, fill_defaults, load, peak_rss_mb, step_batches

TRL_ARMS = ("plain", "checkpointing")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser, default_model="smollm2-135m")
    parser.set_defaults(steps=2, warmup=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every child (default: torch's)")
    parser.add_argument("--micro-batch", default="8,16", help="fgrpo arms' grpo.micro_batch_size besides 0 ('' = none)")
    parser.add_argument("--trl", default="plain,checkpointing",
                        help="TRL arms: plain (as trl_step.py) and/or checkpointing (TRL's default gradient checkpointing)")
    parser.add_argument("--grid-prompts", default="2,4,8", help="grid: prompts per step (x G sequences); '' = no grid")
    parser.add_argument("--grid-lengths", default="24,48", help="grid: max_completion_length values")
    parser.add_argument("--grid-micro-batch", default="0,8", help="grid: fgrpo's grpo.micro_batch_size values")
    # One arm in this process (what the parent starts); not for direct use.
    parser.add_argument("--arm", choices=("fgrpo", "trl"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--micro-batch-size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--trl-arm", choices=TRL_ARMS, default="plain", help=argparse.SUPPRESS)
    return fill_defaults(parser.parse_args())


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# ---- one arm, in a child process ---------------------------------------------------------------------------------

def run_arm(args: argparse.Namespace) -> dict:
    """Load, run --steps steps of one arm, and return its memory and timing."""
    import torch
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    micro = args.micro_batch_size if args.arm == "fgrpo" else 0
    config = benchmark_config(args.model, args.generations, args.length, micro)
    model, tokenizer, reward, prompt_format, train = load(config, args.seed)
    batches = step_batches(train, args.prompts, args.steps)
    loaded_mb = current_rss_mb()
    seconds: list[float] = []
    tokens: list[float] = []
    if args.arm == "fgrpo":
        from fgrpo.core.learner import GRPOLearner

        learner = GRPOLearner(model, tokenizer, config.grpo, reward, prompt_format=prompt_format)
        for i, batch in enumerate(batches):
            torch.manual_seed(args.seed + i)
            start = time.perf_counter()
            metrics = learner.step(batch)
            seconds.append(time.perf_counter() - start)
            tokens.append(metrics["train/completion_len"] * len(batch) * args.generations)
    else:
        # TRL is imported only here, so the fgrpo arm's memory holds none of it.
        from trl_step import StepTimer, build_trainer

        timer, token_counts = StepTimer(), []
        with tempfile.TemporaryDirectory() as out_dir:
            trainer = build_trainer(model, tokenizer, config.grpo, batches, prompt_format, args.seed, out_dir, reward,
                                    token_counts, timer, gradient_checkpointing=args.trl_arm == "checkpointing")
            if args.threads:
                torch.set_num_threads(args.threads)
            trainer.train()
        seconds, tokens = timer.seconds, [float(t) for t in token_counts]
    return {"arm": args.arm, "trl_arm": args.trl_arm if args.arm == "trl" else None, "micro_batch_size": micro,
            "prompts": args.prompts, "length": args.length, "loaded_mb": loaded_mb, "peak_mb": peak_rss_mb(),
            "step_s": statistics.median(seconds), "tokens": statistics.median(tokens), "threads": torch.get_num_threads()}


# ---- the parent: one child per arm -------------------------------------------------------------------------------

def child(args: argparse.Namespace, arm: str, prompts: int, length: int, micro: int = 0, trl_arm: str = "plain") -> dict:
    """Run one arm in a fresh Python process and return its RESULT."""
    command = [sys.executable, str(Path(__file__).resolve()), "--arm", arm, "--model", args.model,
               "--prompts", str(prompts), "--generations", str(args.generations), "--length", str(length),
               "--steps", str(args.steps), "--seed", str(args.seed), "--micro-batch-size", str(micro),
               "--trl-arm", trl_arm]
    if args.threads:
        command += ["--threads", str(args.threads)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"arm {arm} (B={prompts}, T={length}, micro={micro}, trl={trl_arm}) failed: exit {done.returncode}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = time.perf_counter() - start
    return result


def label(result: dict) -> str:
    if result["arm"] == "trl":
        return "TRL" + (" (gradient checkpointing)" if result["trl_arm"] == "checkpointing" else "")
    micro = result["micro_batch_size"]
    return "fgrpo" + (f" (micro_batch_size={micro})" if micro else "")


def main() -> int:
    args = parse_args()
    if args.arm:
        print("RESULT " + json.dumps(run_arm(args)), flush=True)
        return 0
    trl_arms = [a for a in args.trl.split(",") if a]
    unknown = set(trl_arms) - set(TRL_ARMS)
    if unknown:
        raise SystemExit(f"--trl: unknown arm(s) {sorted(unknown)}; choose from {list(TRL_ARMS)}")
    sequences = args.prompts * args.generations
    print(f"model={args.model} B={args.prompts} G={args.generations} ({sequences} sequences) T={args.length} "
          f"steps={args.steps} threads={args.threads or 'torch default'}; one process per arm")
    done: dict[tuple, dict] = {}  # (arm, trl_arm, micro, prompts, length) -> result

    def measure(arm: str, prompts: int, length: int, micro: int = 0, trl_arm: str = "plain") -> dict:
        key = (arm, trl_arm if arm == "trl" else None, micro, prompts, length)
        if key not in done:
            done[key] = child(args, arm, prompts, length, micro, trl_arm)
        return done[key]

    trl = [measure("trl", args.prompts, args.length, trl_arm=a) for a in trl_arms]
    ours = [measure("fgrpo", args.prompts, args.length, micro=m) for m in [0, *ints(args.micro_batch)]]
    print(f"\n{'at ' + str(sequences) + ' sequences x ' + str(args.length) + ' tokens':<42}{'RSS after load':>16}"
          f"{'peak RSS':>12}{'step (s)':>10}{'tokens/step':>13}{'process (s)':>13}")
    for r in trl + ours:
        print(f"{label(r):<42}{r['loaded_mb']:>13.0f} MB{r['peak_mb']:>9.0f} MB{r['step_s']:>10.1f}"
              f"{r['tokens']:>13.0f}{r['wall_s']:>13.0f}")

    grid_prompts, grid_lengths = ints(args.grid_prompts), ints(args.grid_lengths)
    for micro in ints(args.grid_micro_batch) if grid_prompts else []:
        print(f"\nfgrpo peak RSS (MB), grpo.micro_batch_size={micro}; rows: sequences (prompts x {args.generations}), "
              f"columns: max_completion_length")
        print(f"{'sequences':>10}" + "".join(f"{'T=' + str(t):>10}" for t in grid_lengths))
        for prompts in grid_prompts:
            cells = [measure("fgrpo", prompts, length, micro=micro)["peak_mb"] for length in grid_lengths]
            print(f"{prompts * args.generations:>10}" + "".join(f"{c:>10.0f}" for c in cells))

    print()
    for theirs in trl:
        for r in ours:
            print(f"ratio: {label(r)} / {label(theirs)} peak RSS = {r['peak_mb'] / theirs['peak_mb']:.2f}x "
                  f"({r['peak_mb']:.0f} MB vs {theirs['peak_mb']:.0f} MB; {sequences} sequences x {args.length} "
                  f"tokens, {args.model}, {args.steps} steps, separate processes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
