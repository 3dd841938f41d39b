"""Benchmark: peak memory and round time of in-process simulations as the number of clients grows.

    python benchmarks/scale.py [--clients 10,100,1000] [--sampled 10] [--rounds 3] [--local-steps 2]

Each client count runs in its own fresh process (so peak RSS is that run's
alone) on the shipped quickstart scenario with `num_clients` overridden, an
IID partition, and the same number of clients sampled per round. The task pool
is the same in every run and large enough that every sampled client fills
whole batches (`prompts_per_step` × clients ≤ train examples), so every run
does the same training work. Memory should grow with clients × (data +
context), never with clients × model.

The global model is evaluated before round 1 and after the last round only.
Evaluation always covers the same pooled held-out set, split across all
clients, so with more clients it runs as more, smaller generate calls: its time
is printed apart from the training rounds'. Prints a table and a final ratio
line: peak RSS of the largest run over the smallest.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from importlib import resources
from fgrpo.config import load_config
from fgrpo.deploy.runtime import run_simulation
clients, sampled, rounds, local_steps, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
train_per_family, test_per_family = int(sys.argv[6]), int(sys.argv[7])
scenario = resources.files("fgrpo") / "scenarios" / "quickstart.toml"
overrides = {
    "tasks": {"train_per_family": train_per_family, "test_per_family": test_per_family},
    "federation": {"num_clients": clients, "fraction_train": sampled / clients, "min_train_clients": sampled,
                   "rounds": rounds, "local_steps": local_steps, "partition": {"scheme": "iid"}, "eval_every": 10**6},
    "output": {"dir": out, "save_adapter": False},
}
config = load_config(str(scenario), overrides)
start = time.perf_counter()
summary = run_simulation(config, progress=False, overwrite=True)
wall = time.perf_counter() - start
records = [json.loads(l) for l in open(out + "/metrics.jsonl")]
rounds_ = [r for r in records if r["kind"] == "round" and r["round"] > 0]
train_s = sorted(r["time/round_s"] - r["time/eval_s"] for r in rounds_)
print("RESULT " + json.dumps({"clients": clients, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                               "wall_s": wall, "round_s": train_s[len(train_s) // 2], "eval_s": rounds_[-1]["time/eval_s"],
                               "sampled": rounds_[-1]["clients/sampled"]}))
"""


def run_one(clients: int, sampled: int, rounds: int, local_steps: int, train_per_family: int, test_per_family: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "run")
        args = [clients, sampled, rounds, local_steps, out, train_per_family, test_per_family]
        done = subprocess.run(
            [sys.executable, "-c", CHILD, *map(str, args)],
            capture_output=True,
            text=True,
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{clients} clients failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,100,1000", help="Comma-separated client counts.")
    parser.add_argument("--sampled", type=int, default=10, help="Clients sampled per round (same in every run).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=2)
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    if min(counts) < args.sampled:
        raise SystemExit(f"--sampled {args.sampled} is more than the smallest client count {min(counts)}")

    families, prompts_per_step = 3, 32  # the quickstart scenario's
    train_per_family = -(-max(counts) * prompts_per_step // families)  # every client fills its batches
    test_per_family = -(-max(counts) // families)  # at least one held-out example per client
    results = [run_one(n, args.sampled, args.rounds, args.local_steps, train_per_family, test_per_family) for n in counts]
    print(f"train pool {families * train_per_family}, held-out {families * test_per_family}, {args.sampled} sampled per round")
    print(f"{'clients':>8} {'peak RSS (MB)':>14} {'train round (s)':>16} {'final eval (s)':>15} {'wall (s)':>9}")
    for r in results:
        assert r["sampled"] == args.sampled, r
        print(f"{r['clients']:>8} {r['peak_rss_mb']:>14.0f} {r['round_s']:>16.2f} {r['eval_s']:>15.2f} {r['wall_s']:>9.1f}")
    small, large = results[0], results[-1]
    print(
        f"ratio: peak RSS {large['clients']} clients / {small['clients']} clients = "
        f"{large['peak_rss_mb'] / small['peak_rss_mb']:.2f}x ({args.sampled} sampled per round, {args.rounds} rounds)"
    )


if __name__ == "__main__":
    main()
