"""Wall time of the same federated job in-process vs on Flower (SuperLink + SuperNodes on 127.0.0.1).

    python benchmarks/flower_overhead.py [--model tiny|qwen2.5-0.5b] [--rounds 2,20] [--clients 2] [--local-steps 1]

Same config, seed and clients in both runtimes. Each time is measured from the
runner's side: `run_simulation` for the in-process run, `flwr run … --stream`
until the ServerApp finishes for Flower (SuperLink/SuperNode start-up not
included). `--model qwen2.5-0.5b` runs a local checkpoint with Qwen2.5-0.5B's
published shapes and random weights (`real_shapes.py`); the global model is
then evaluated once, after the last round (each Flower message pays the
ClientApp's start-up, see `clientapp_startup.py`, so an evaluation every round
would double the Flower side's cost for no information here). One `ratio:`
line per round count: Flower / in-process.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fgrpo.deploy import flower as deploy
from fgrpo.config import config_from_dict
from fgrpo.core.pipeline import resolve_model_source
from fgrpo.deploy.runtime import node_configs, quiet_flower_logs, run_simulation
from real_shapes import QWEN25, save_random_checkpoint


def job(out: Path, rounds: int, clients: int, local_steps: int, source: str = "tiny"):
    families = ["add", "sort", "reverse", "sub"]
    model = {"source": source, "lora": {"rank": 4, "alpha": 8}}
    if source == "tiny":
        model["warm_start"] = {"steps": 30, "batch_size": 32}
    return config_from_dict({
        "model": model,
        "tasks": {
            "families": [{"name": families[i % len(families)], "difficulty": 1} for i in range(clients)],
            "train_per_family": 40, "test_per_family": 4,
        },
        "grpo": {"num_generations": 4, "max_completion_length": 4},
        "training": {"prompts_per_step": 2},
        "federation": {
            "num_clients": clients, "rounds": rounds, "local_steps": local_steps, "min_train_clients": clients,
            "eval_every": 1 if source == "tiny" else rounds,
        },
        "output": {"dir": str(out)},
    })


def compare(tmp: Path, rounds: int, clients: int, local_steps: int, source: str) -> None:
    """One job on both runtimes; prints both wall times and the `ratio:` line."""
    config = job(tmp / f"sim-{rounds}", rounds, clients, local_steps, source)
    resolve_model_source(config.model, config.tasks)  # warm start once, outside both timings

    started = time.perf_counter()
    run_simulation(config, progress=False)
    in_process = time.perf_counter() - started

    with deploy.LocalFederation(node_configs(config), tmp / f"flower-{rounds}") as federation:
        flower = federation.run(config, tmp / f"flower-run-{rounds}")

    def train_time(run: str) -> float:
        records = [json.loads(line) for line in (tmp / run / "metrics.jsonl").read_text().splitlines()]
        return sum(r.get("client/train_s", 0.0) for r in records if r["kind"] == "client")

    print(f"{'runtime':<12} {'wall s':>8} {'client train s':>15}")
    print(f"{'in-process':<12} {in_process:>8.1f} {train_time(f'sim-{rounds}'):>15.1f}")
    print(f"{'flower':<12} {flower:>8.1f} {train_time(f'flower-run-{rounds}'):>15.1f}")
    print(f"ratio: flower / in-process wall time = {flower / in_process:.2f}x "
          f"({Path(source).name}, {clients} clients, {rounds} rounds, {local_steps} local steps)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", *sorted(QWEN25)], default="tiny")
    parser.add_argument("--rounds", default="2", help="comma-separated round counts, e.g. 2,20")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=1)
    args = parser.parse_args()
    quiet_flower_logs()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = "tiny" if args.model == "tiny" else str(save_random_checkpoint(args.model, tmp / args.model))
        for rounds in (int(r) for r in args.rounds.split(",")):
            compare(tmp, rounds, args.clients, args.local_steps, source)

if __name__ == "__main__":
    main()
