"""Wall time of the same federated job in-process vs on Flower (SuperLink + SuperNodes on 127.0.0.1).

    python benchmarks/flower_overhead.py [--rounds 2] [--clients 2] [--local-steps 1]

Same config, seed and clients in both runtimes. Each time is measured from the
runner's side: `run_simulation` for the in-process run, `flwr run … --stream`
until the ServerApp finishes for Flower (SuperLink/SuperNode start-up not
included). The last line is the ratio Flower / in-process.
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


def job(out: Path, rounds: int, clients: int, local_steps: int):
    families = ["add", "sort", "reverse", "sub"]
    return config_from_dict({
        "model": {"source": "tiny", "warm_start": {"steps": 30, "batch_size": 32}, "lora": {"rank": 4, "alpha": 8}},
        "tasks": {
            "families": [{"name": families[i % len(families)], "difficulty": 1} for i in range(clients)],
            "train_per_family": 40, "test_per_family": 4,
        },
        "grpo": {"num_generations": 4, "max_completion_length": 4},
        "training": {"prompts_per_step": 2},
        "federation": {"num_clients": clients, "rounds": rounds, "local_steps": local_steps, "min_train_clients": clients},
        "output": {"dir": str(out)},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=1)
    args = parser.parse_args()
    quiet_flower_logs()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = job(tmp / "sim", args.rounds, args.clients, args.local_steps)
        resolve_model_source(config.model, config.tasks)  # warm start once, outside both timings

        started = time.perf_counter()
        run_simulation(config, progress=False)
        in_process = time.perf_counter() - started

        with deploy.LocalFederation(node_configs(config), tmp / "flower") as federation:
            flower = federation.run(config, tmp / "flower-run")
        sim_rounds = [json.loads(line) for line in (tmp / "sim" / "metrics.jsonl").read_text().splitlines()]
        fl_rounds = [json.loads(line) for line in (tmp / "flower-run" / "metrics.jsonl").read_text().splitlines()]

    def train_time(recs):
        return sum(r.get("client/train_s", 0.0) for r in recs if r["kind"] == "client")

    print(f"{'runtime':<12} {'wall s':>8} {'client train s':>15}")
    print(f"{'in-process':<12} {in_process:>8.1f} {train_time(sim_rounds):>15.1f}")
    print(f"{'flower':<12} {flower:>8.1f} {train_time(fl_rounds):>15.1f}")
    print(f"flower / in-process wall time: {flower / in_process:.2f}x "
          f"({args.clients} clients, {args.rounds} rounds, {args.local_steps} local steps)")


if __name__ == "__main__":
    main()
