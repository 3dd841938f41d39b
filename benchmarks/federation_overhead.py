"""Benchmark: what federation costs on top of the same GRPO work done centrally.

    python benchmarks/federation_overhead.py [--clients 4] [--local-steps 5] [--rounds 3] [--repeats 2] [--method fgrpo]

Both runs use the shipped quickstart scenario with an IID partition (so the
two see the same mix of prompts) and the same total rollouts: the federated run
has N clients × E local steps per round, the centralized run does N·E steps
per round on the pooled data (fgrpo's `centralized` method). The global model
is evaluated before round 1 and after the last round only, and evaluation is
left out of both times: it scores the same held-out set either way.

The federated round is split into its measured parts (logged in
metrics.jsonl): the clients' GRPO steps, serialising messages and node contexts
through Flower's wire format, and screening + aggregation on the server. The
rest ("client glue") is loading the adapter into the model, a fresh optimizer,
and reading the adapter back out. Runs alternate centralized / federated, in one
process after a warm-up run; medians over `--repeats`. The last line is the
wall-time ratio federated / centralized.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from importlib import resources
from pathlib import Path

from fgrpo.config import load_config
from fgrpo.deploy.runtime import run_simulation


def job(method: str, out: Path, clients: int, local_steps: int, rounds: int):
    scenario = resources.files("fgrpo") / "scenarios" / "quickstart.toml"
    return load_config(
        str(scenario),
        {
            "federation": {
                "method": method,
                "num_clients": clients,
                "min_train_clients": clients,
                "rounds": rounds,
                "local_steps": local_steps,
                "eval_every": 10**6,
                "partition": {"scheme": "iid"},
            },
            # Clients one after another, as the centralized run's steps: this measures federation's plumbing
            # at equal work (benchmarks/parallel_clients.py measures running them at once).
            "runtime": {"workers": 1},
            "output": {"dir": str(out), "save_adapter": False},
        },
    )


def timed_run(method: str, out: Path, clients: int, local_steps: int, rounds: int) -> dict[str, float]:
    """Sum over training rounds of each measured part of a round (evaluation excluded)."""
    run_simulation(job(method, out, clients, local_steps, rounds), progress=False, overwrite=True)
    rounds_ = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "round" and r["round"] > 0]
    total = {key: sum(r[f"time/{key}"] for r in rounds_) for key in ("round_s", "eval_s", "client_train_s", "aggregate_s", "wire_s")}
    total["wall_s"] = total["round_s"] - total["eval_s"]
    total["glue_s"] = total["wall_s"] - total["client_train_s"] - total["aggregate_s"] - total["wire_s"]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--method", default="fgrpo", help="The federated method to time (any but centralized/local).")
    args = parser.parse_args()

    results: dict[str, list[dict[str, float]]] = {"centralized": [], args.method: []}
    with tempfile.TemporaryDirectory() as tmp:
        timed_run(args.method, Path(tmp) / "warmup", 2, 1, 1)  # model build, caches, first-call costs
        for repeat in range(args.repeats):
            for method in results:
                results[method].append(timed_run(method, Path(tmp) / f"{method}{repeat}", args.clients, args.local_steps, args.rounds))

    def median(method: str, key: str) -> float:
        return statistics.median(r[key] for r in results[method])

    steps = args.clients * args.local_steps * args.rounds
    print(f"{args.clients} clients × {args.local_steps} local steps × {args.rounds} rounds = {steps} GRPO steps per run; median of {args.repeats}")
    print(f"{'seconds (sum over rounds)':<34}{'centralized':>12}{args.method:>12}")
    labels = {
        "wall_s": "wall, evaluation excluded",
        "client_train_s": "  GRPO steps",
        "wire_s": "  (de)serialisation",
        "aggregate_s": "  screening + aggregation",
        "glue_s": "  client glue (adapter in/out)",
    }
    for key, label in labels.items():
        print(f"{label:<34}{median('centralized', key):>12.3f}{median(args.method, key):>12.3f}")
    fed_wall = median(args.method, "wall_s")
    share = (median(args.method, "wire_s") + median(args.method, "aggregate_s")) / fed_wall
    outside = 1 - median(args.method, "client_train_s") / fed_wall
    print(f"{args.method}: aggregation + (de)serialisation = {100 * share:.2f}% of a round; everything but GRPO steps = {100 * outside:.2f}%")
    # The two runs train different models, so their GRPO steps take different times (completion
    # lengths differ); this second figure keeps only the time spent outside GRPO steps.
    central_wall = median("centralized", "wall_s")
    extra = (fed_wall - median(args.method, "client_train_s")) - (central_wall - median("centralized", "client_train_s"))
    print(f"same GRPO step time, only the time outside steps differing: {1 + extra / central_wall:.3f}x")
    print(f"ratio: federated / centralized wall time at equal rollouts = {fed_wall / central_wall:.3f}x")


if __name__ == "__main__":
    main()
