"""Benchmark: peak memory and round time of in-process simulations as the number of clients grows.

    python benchmarks/scale.py [--clients 4,100] [--sampled 4] [--rounds 2] [--local-steps 2]

Each client count runs in its own fresh process (so peak RSS is that run's
alone) on the shipped quickstart scenario with `num_clients` overridden and
the same number of clients sampled per round, so every run does the same
training work. Memory should grow with clients × (data + adapter), never with
clients × model. Prints a table and a final ratio line: peak RSS of the
largest run over the smallest.
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
from fgrpo.runtime import run_simulation
clients, sampled, rounds, local_steps, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
scenario = resources.files("fgrpo") / "scenarios" / "quickstart.toml"
overrides = {
    "federation": {"num_clients": clients, "fraction_train": sampled / clients, "min_train_clients": sampled,
                   "rounds": rounds, "local_steps": local_steps, "partition": {"scheme": "iid"}},
    "output": {"dir": out, "save_adapter": False},
}
config = load_config(str(scenario), overrides)
start = time.perf_counter()
summary = run_simulation(config, progress=False, overwrite=True)
wall = time.perf_counter() - start
rounds_s = [json.loads(l)["time/round_s"] for l in open(out + "/metrics.jsonl") if '"time/round_s"' in l]
print("RESULT " + json.dumps({"clients": clients, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                               "wall_s": wall, "round_s": sum(rounds_s) / len(rounds_s)}))
"""


def run_one(clients: int, sampled: int, rounds: int, local_steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "run")
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(clients), str(sampled), str(rounds), str(local_steps), out],
            capture_output=True,
            text=True,
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{clients} clients failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="4,100", help="Comma-separated client counts.")
    parser.add_argument("--sampled", type=int, default=4, help="Clients sampled per round (same in every run).")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=2)
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    if min(counts) < args.sampled:
        raise SystemExit(f"--sampled {args.sampled} is more than the smallest client count {min(counts)}")

    results = [run_one(n, args.sampled, args.rounds, args.local_steps) for n in counts]
    print(f"{'clients':>8} {'peak RSS (MB)':>14} {'mean round (s)':>15} {'wall (s)':>9}")
    for r in results:
        print(f"{r['clients']:>8} {r['peak_rss_mb']:>14.0f} {r['round_s']:>15.2f} {r['wall_s']:>9.1f}")
    small, large = results[0], results[-1]
    print(
        f"ratio: peak RSS {large['clients']} clients / {small['clients']} clients = "
        f"{large['peak_rss_mb'] / small['peak_rss_mb']:.2f}x ({args.sampled} sampled per round, {args.rounds} rounds)"
    )


if __name__ == "__main__":
    main()
