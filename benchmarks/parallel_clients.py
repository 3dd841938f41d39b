"""Benchmark: wall time of a quickstart-like federated run with 2 worker processes vs 1 (clients one after another).

    python benchmarks/parallel_clients.py [--rounds 3] [--local-steps 8] [--prompts 32] [--clients 4] [--workers 2]

The scenario is the shipped quickstart (`src/fgrpo/scenarios/quickstart.toml`:
4 owners, Dirichlet mixes of three families), shortened to `--rounds` rounds.
The same run goes twice in this process, first with `runtime.workers = 1`
(the clients one after another in this process, with the default thread
policy: every core) and then with `--workers` worker processes (the default
policy: cores // workers threads each). Both use the same seed. Each wall time
counts everything a user waits for, from the start of the run: starting the
workers, loading the model, the rounds and their evaluations. The tiny
model's warm start is built before either run, so neither pays for it. The
last line is the speed-up.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from importlib.resources import files
from pathlib import Path

from fgrpo.config import load_config
from fgrpo.core.pipeline import resolve_model_source
from fgrpo.deploy.runtime import execution_plan, run_simulation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=32, help="prompts per local step")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--method", default="fgrpo")
    args = parser.parse_args()

    scenario = Path(str(files("fgrpo") / "scenarios" / "quickstart.toml"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="fgrpo-parallel-") as tmp:
        for workers in (1, args.workers):
            overrides = {
                "federation": {"rounds": args.rounds, "local_steps": args.local_steps, "num_clients": args.clients,
                               "method": args.method},
                "training": {"prompts_per_step": args.prompts},
                "runtime": {"workers": workers},
                "output": {"dir": str(Path(tmp) / f"workers{workers}")},
            }
            config = load_config(scenario, overrides)
            resolve_model_source(config.model, config.tasks)  # the warm start is not part of either timing
            plan = execution_plan(config)
            start = time.perf_counter()
            summary = run_simulation(config, progress=False)
            rows.append((plan, time.perf_counter() - start, summary["final/acc_heldout"]))

    print(f"{args.method}, {args.clients} clients, {args.rounds} rounds × {args.local_steps} local steps × {args.prompts} prompts")
    print(f"{'workers':>8}{'threads':>9}{'wall (s)':>10}{'final acc':>11}")
    for (workers, threads), wall, accuracy in rows:
        print(f"{workers:>8}{threads:>9}{wall:>10.1f}{accuracy:>11.1%}")
    (one, _, _), (many, _, _) = rows[0], rows[1]
    print(f"ratio: {many[0]} workers × {many[1]} threads run the rounds {rows[0][1] / rows[1][1]:.2f}x faster than "
          f"1 worker × {one[1]} threads ({rows[0][1]:.1f} s vs {rows[1][1]:.1f} s)")


if __name__ == "__main__":
    main()
