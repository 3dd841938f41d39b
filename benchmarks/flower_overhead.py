"""Wall time of the same federated job in-process vs on Flower (SuperLink + SuperNodes on 127.0.0.1), with each
node's warm worker (Flower-warm, the default) and, optionally, without it (Flower-cold: a fresh ClientApp
process per message, `warm=false`).

    python benchmarks/flower_overhead.py [--model tiny|smollm2-135m|qwen2.5-0.5b] [--rounds 2,20] [--clients 2]
        [--local-steps 1] [--arms inprocess,warm,cold] [--arm-timeout-s 900]

Same config, seed and clients in every arm. Each time is measured from the runner's side: `run_simulation` for
the in-process run, `flwr run … --stream` until the ServerApp finishes for Flower (SuperLink/SuperNode start-up
not included). `--model smollm2-135m` is the real SmolLM2-135M-Instruct (`model.source = "smollm2-135m"`,
cached under $FGRPO_CACHE/models) with chat prompts and small settings (2 prompts x 2 completions, 8 new tokens,
2 held-out prompts per family, evaluated after the last round only) so that 20 rounds fit a 2-core CPU;
`--model qwen2.5-0.5b` a local checkpoint with Qwen2.5-0.5B's published shapes and random weights
(`real_shapes.py`), also evaluated once. The tiny model is evaluated every round.

For the warm arm it prints where a message's time goes, from the line each forwarding ClientApp process logs
(`fgrpo.federation.handoff.TIMING`, in the SuperNodes' logs): the work in the warm worker, the hand-off
(socket, Flower's protobufs both ways) and Flower (everything else: its polling, the per-message
`flwr-clientapp` process, transport; estimated as a node's share of the wall time less the other two).

Each arm has a time limit (`--arm-timeout-s`); the script always ends with `ratio:` lines, or with one line
saying which arm ran out of time or failed (no traceback).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue
import re
import tempfile
import time
from pathlib import Path

from fgrpo.config import config_from_dict
from fgrpo.federation.handoff import TIMING_PATTERN
from real_shapes import QWEN25, save_random_checkpoint

REAL = "smollm2-135m"
ARMS = ("inprocess", "warm", "cold")


class ArmFailed(Exception):
    """An arm that did not finish: the one line the script ends with."""


def job(out: Path, rounds: int, clients: int, local_steps: int, source: str = "tiny"):
    families = ["add", "sort", "reverse", "sub"]
    model = {"source": source, "lora": {"rank": 4, "alpha": 8}}
    tasks = {"families": [{"name": families[i % len(families)], "difficulty": 1} for i in range(clients)],
             "train_per_family": 40, "test_per_family": 4}
    grpo = {"num_generations": 4, "max_completion_length": 4}
    if source == "tiny":
        model["warm_start"] = {"steps": 30, "batch_size": 32}
    if source == REAL:  # the real model in words, as small as a 20-round run on 2 CPU cores allows
        model["dtype"] = "float32"
        tasks.update({"prompt_style": "chat", "train_per_family": 20, "test_per_family": 2})
        grpo = {"num_generations": 2, "max_completion_length": 8}
    return config_from_dict({
        "model": model,
        "tasks": tasks,
        "grpo": grpo,
        "training": {"prompts_per_step": 2},
        "federation": {
            "num_clients": clients, "rounds": rounds, "local_steps": local_steps, "min_train_clients": clients,
            "eval_every": 1 if source == "tiny" else rounds,
        },
        "output": {"dir": str(out)},
    })


def _in_process(config, results) -> None:
    from fgrpo.deploy.runtime import run_simulation

    started = time.perf_counter()
    run_simulation(config, progress=False)
    results.put(time.perf_counter() - started)


def in_process_arm(config, limit_s: float) -> float:
    """The in-process run in a child process, so that a time limit can stop it."""
    import os

    # A child stopped at its limit leaves its queues' semaphores to multiprocessing's tracker, which would warn
    # about them after the last line; that line is the answer.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning:multiprocessing.resource_tracker")
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_in_process, args=(config, results))
    child.start()
    try:
        wall = results.get(timeout=limit_s)
    except queue.Empty:
        raise ArmFailed(f"the in-process arm ran out of time (limit {limit_s:.0f} s)") from None
    finally:
        child.join(timeout=5)
        if child.is_alive():
            child.kill()
    return wall


def flower_arm(config, nodes, work: Path, run_dir: Path, warm: bool, limit_s: float) -> tuple[float, list[tuple]]:
    """(wall s, [(kind, total, work, hand-off) per message]) of one Flower run, warm or cold."""
    from fgrpo.deploy import flower as deploy
    from fgrpo.errors import FederationError

    name = "Flower-warm" if warm else "Flower-cold"
    try:
        with deploy.LocalFederation(nodes, work, warm=warm) as federation:
            wall = federation.run(config, run_dir, timeout_s=limit_s)
            logs = [federation.log_tail(f"supernode{i}", 10**9) for i in range(len(nodes))]
    except FederationError as error:
        first = str(error).splitlines()[0]
        reason = "ran out of time" if "did not finish" in first else f"failed: {first[:200]}"
        raise ArmFailed(f"the {name} arm {reason} (limit {limit_s:.0f} s)") from None
    return wall, [m.groups() for log in logs for m in TIMING_LINE.finditer(log)]


TIMING_LINE = re.compile(TIMING_PATTERN)  # the line each forwarding ClientApp process logs (handoff.TIMING)


def client_train_s(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sum(r.get("client/train_s", 0.0) for r in records if r["kind"] == "client")


def compare(tmp: Path, rounds: int, args, source: str) -> list[str]:
    """Every chosen arm on one job; prints its table and returns its `ratio:` lines."""
    from fgrpo.core.pipeline import resolve_model_source
    from fgrpo.deploy.runtime import node_configs

    config = job(tmp / f"sim-{rounds}", rounds, args.clients, args.local_steps, source)
    resolve_model_source(config.model, config.tasks)  # warm start / download once, outside every timing
    walls, runs, messages = {}, {}, []
    for arm in args.arms:
        if arm == "inprocess":
            walls[arm], runs[arm] = in_process_arm(config, args.arm_timeout_s), tmp / f"sim-{rounds}"
        else:
            runs[arm] = tmp / f"flower-{arm}-run-{rounds}"
            walls[arm], timings = flower_arm(config, node_configs(config), tmp / f"flower-{arm}-{rounds}", runs[arm],
                                             arm == "warm", args.arm_timeout_s)
            messages += timings if arm == "warm" else []
    print(f"\n{Path(source).name}, {args.clients} clients, {rounds} rounds, {args.local_steps} local steps")
    print(f"{'arm':<12} {'wall s':>8} {'client train s':>15}")
    for arm, wall in walls.items():
        print(f"{arm:<12} {wall:>8.1f} {client_train_s(runs[arm]):>15.1f}")
    if messages:
        n = len(messages)
        work = sum(float(m[2]) for m in messages) / n
        handoff = sum(float(m[3]) for m in messages) / n
        per_message = walls["warm"] * args.clients / n  # a node's messages run one after another
        print(f"where a Flower-warm message's time goes (mean of {n} messages):")
        print(f"  work in the warm worker      {work:8.3f} s")
        print(f"  hand-off (socket, protobuf)  {handoff:8.3f} s")
        print(f"  Flower (polling, process)    {max(per_message - work - handoff, 0.0):8.3f} s  "
              f"(a node's share of the wall time, {per_message:.3f} s, less the two above)")
    base = walls.get("inprocess")
    return [f"ratio: {arm} / in-process wall time = {walls[arm] / base:.2f}x ({walls[arm]:.1f} s vs {base:.1f} s; "
            f"{Path(source).name}, {args.clients} clients, {rounds} rounds, {args.local_steps} local steps)"
            for arm in walls if arm != "inprocess" and base]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", REAL, *sorted(QWEN25)], default="tiny")
    parser.add_argument("--rounds", default="2", help="comma-separated round counts, e.g. 2,20")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=1)
    parser.add_argument("--arms", default="inprocess,warm", help=f"comma-separated, from {','.join(ARMS)}")
    parser.add_argument("--arm-timeout-s", type=float, default=900.0, help="time limit of each arm (s)")
    args = parser.parse_args()
    args.arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    if not set(args.arms) <= set(ARMS) or "inprocess" not in args.arms:
        parser.error(f"--arms: choose from {', '.join(ARMS)}, with inprocess (the reference)")
    from fgrpo.reporting.noise import quiet_flower_logs

    quiet_flower_logs()
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        try:
            source = args.model if args.model in ("tiny", REAL) else str(save_random_checkpoint(args.model, tmp / args.model))
            for rounds in (int(r) for r in args.rounds.split(",")):
                ratios += compare(tmp, rounds, args, source)
        except ArmFailed as failed:
            ratios.append(f"no ratio: {failed}")
        except Exception as error:  # noqa: BLE001 - the benchmark ends with one line, not a traceback
            ratios.append(f"no ratio: the benchmark failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
    for line in ratios:
        print(line)


if __name__ == "__main__":
    main()
