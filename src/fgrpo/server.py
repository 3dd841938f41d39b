"""The federation loop the ServerApp runs: sample → local rounds → aggregate → evaluate → log.

It drives any Flower `Strategy` through its own `configure_train` /
`aggregate_train` / `configure_evaluate` calls (rather than `Strategy.start`)
so that every round can log per-client statistics and aggregation weights to
metrics.jsonl. The same loop runs on the in-process grid and on a real
SuperLink.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from .config import Config, dump_config
from .errors import FederationError
from .model import arrays_nbytes
from .results import MetricsWriter, prepare_run_dir, write_config, write_summary
from .strategies import make_strategy

# Methods that are run modes of the same code rather than Flower strategies.
PLUMBING_STRATEGY = {"centralized": "fedavg", "local": "fedavg"}


def clients_per_round(config: Config) -> int:
    fed = config.federation
    return min(fed.num_clients, max(fed.min_train_clients, int(fed.num_clients * fed.fraction_train)))


def build_strategy(config: Config, num_nodes: int):
    """The Flower strategy for the configured method (FedAvg plumbing for centralized / local)."""
    fed = config.federation
    name = PLUMBING_STRATEGY.get(fed.method, fed.method)
    sampled = 1 if fed.method == "centralized" else clients_per_round(config)
    # Flower's strategies wait until `min_available_nodes` are connected before
    # sampling: asking for fewer than all nodes lets a round go on after a
    # SuperNode drops (deployment), while `fraction_train` still samples `sampled`
    # of `num_nodes` (the epsilon guards int() against 29/100*100 = 28.999...).
    floor = min(sampled, fed.min_train_clients)
    common = dict(
        fraction_train=min(1.0, (sampled + 1e-6) / num_nodes),
        min_train_nodes=floor,
        min_available_nodes=floor,
        fraction_evaluate=1.0,
        min_evaluate_nodes=floor,
    )
    options: dict = {}
    if name == "fgrpo":
        options = fed.fgrpo.model_dump()
    elif name == "fedprox":
        options = {"proximal_mu": fed.proximal_mu}
    elif name in ("fedadam", "fedyogi", "fedadagrad"):
        options = fed.server_opt.model_dump()
    return make_strategy(name, **common, **options)


def local_steps_per_round(config: Config) -> int:
    """Centralized training does the work of all sampled clients in one place (equal rollouts)."""
    fed = config.federation
    if fed.method == "centralized":
        return fed.local_steps * clients_per_round(config)
    return fed.local_steps


def _record_bytes(message: Message) -> int:
    content = message.content
    return sum(arrays_nbytes({k: v.numpy() for k, v in record.items()}) for record in content.array_records.values())


def _aggregation_weights(strategy, ok_replies: list[Message]) -> dict[int, tuple[float, float | None]]:
    """client-id -> (weight, gain): FGRPO/reward-weighted report theirs, FedAvg-family weigh by n_k."""
    last = getattr(strategy, "last_aggregation", None)
    if last is not None:
        gains = getattr(last, "gains", None)
        return {
            int(cid): (float(w), None if gains is None else float(gains[i]))
            for i, (cid, w) in enumerate(zip(last.client_ids, last.weights))
        }
    sizes = np.array([float(r.content["metrics"]["num-examples"]) for r in ok_replies])
    weights = sizes / sizes.sum() if sizes.sum() > 0 else np.full(len(sizes), 1 / max(1, len(sizes)))
    return {int(r.content["metrics"]["client-id"]): (float(w), None) for r, w in zip(ok_replies, weights)}


def _global_accuracy(eval_replies: list[Message]) -> dict[str, float]:
    """Pool the clients' held-out results: their splits together are the pooled held-out set."""
    total, correct = 0, 0.0
    family_n: dict[str, float] = {}
    family_correct: dict[str, float] = {}
    for reply in eval_replies:
        metrics = reply.content["metrics"]
        n = float(metrics["num-examples"])
        if n == 0 or "acc-heldout" not in metrics:
            continue
        total += n
        correct += float(metrics["acc-heldout"]) * n
        for key in metrics:
            if key.startswith("acc/"):
                family = key[4:]
                fn = float(metrics[f"n/{family}"])
                family_n[family] = family_n.get(family, 0) + fn
                family_correct[family] = family_correct.get(family, 0) + float(metrics[key]) * fn
    result = {"global/acc_heldout": correct / total if total else float("nan")}
    result.update({f"global/acc/{f}": family_correct[f] / family_n[f] for f in sorted(family_n)})
    return result


def run_federation(grid: Grid, config: Config, run_dir: Path, *, progress: bool = True, overwrite: bool = False) -> dict:
    """Run `config.federation.rounds` rounds on `grid`; write RUN_DIR; return the summary."""
    from .app import _shared_learner, arrays_to_record, record_to_arrays
    from .model import get_trainable_arrays

    fed = config.federation
    method = fed.method
    seed = config.training.seed
    run_dir = prepare_run_dir(run_dir, overwrite=overwrite)
    write_config(run_dir, config)
    random.seed(seed)  # Flower strategies sample nodes with the `random` module
    node_ids = list(grid.get_node_ids())
    strategy = build_strategy(config, len(node_ids))
    learner = _shared_learner(dump_config(config))
    arrays = arrays_to_record(get_trainable_arrays(learner.model))
    if hasattr(strategy, "set_initial_arrays"):
        strategy.set_initial_arrays(arrays)

    train_config = {"local-steps": local_steps_per_round(config), "local-only": method == "local"}
    started = time.perf_counter()
    final_accuracy = float("nan")
    from .train import _progress

    with MetricsWriter(run_dir, method, seed) as writer, _progress(progress) as bar:
        task = bar.add_task(f"{method} seed {seed}", total=fed.rounds, info="")

        def evaluate_round(server_round: int) -> dict[str, float]:
            messages = strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(train_config)), grid)
            replies = [r for r in grid.send_and_receive(messages, timeout=fed.round_timeout_s) if not r.has_error()]
            for reply in replies:
                m = reply.content["metrics"]
                if "acc-heldout" in m:
                    writer.write("client", round=server_round, client=int(m["client-id"]), **{"client/acc_heldout": float(m["acc-heldout"])})
            return _global_accuracy(replies)

        initial = evaluate_round(0)
        writer.write("round", round=0, **initial)
        bar.update(task, info=f"acc {initial['global/acc_heldout']:.1%}")
        for server_round in range(1, fed.rounds + 1):
            round_start = time.perf_counter()
            messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), grid))
            bytes_down = sum(_record_bytes(m) for m in messages)
            replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout_s))
            ok = [r for r in replies if not r.has_error()]
            failed = [r for r in replies if r.has_error()]
            # A node that died sends nothing: no reply by the timeout is a failure too.
            num_failed = len(messages) - len(ok)
            if len(ok) < min(fed.min_train_clients, len(messages)):
                reasons = "; ".join([str(r.error.reason) for r in failed] + ["no reply"] * (num_failed - len(failed)))[:500]
                raise FederationError(
                    f"round {server_round}: only {len(ok)} of {len(messages)} clients succeeded "
                    f"(min_train_clients = {fed.min_train_clients}): {reasons}"
                )
            new_arrays, _ = strategy.aggregate_train(server_round, replies)
            if new_arrays is not None and method != "local":
                arrays = new_arrays
            weights = _aggregation_weights(strategy, ok)
            for reply in ok:
                m = reply.content["metrics"]
                cid = int(m["client-id"])
                weight, gain = weights.get(cid, (None, None))
                record = {
                    "client/reward_mean": float(m["reward-mean"]),
                    "client/reward_std": float(m["reward-std"]),
                    "client/accuracy": float(m["accuracy"]),
                    "client/num_examples": int(m["num-examples"]),
                    "client/train_s": float(m["train-time"]),
                }
                if method != "local":
                    record["agg/weight"] = weight
                if gain is not None:
                    record["agg/gain"] = gain
                writer.write("client", round=server_round, client=cid, **record)
            evaluation = evaluate_round(server_round) if server_round % fed.eval_every == 0 or server_round == fed.rounds else {}
            final_accuracy = evaluation.get("global/acc_heldout", final_accuracy)
            writer.write(
                "round",
                round=server_round,
                **evaluation,
                **{
                    "comm/bytes_down": bytes_down,
                    "comm/bytes_up": sum(_record_bytes(r) for r in ok),
                    "time/round_s": time.perf_counter() - round_start,
                    "clients/sampled": len(messages),
                    "clients/failed": num_failed,
                },
            )
            bar.update(task, advance=1, info=f"acc {final_accuracy:.1%}")
    wall = time.perf_counter() - started
    if config.output.save_adapter:
        from .model import set_trainable_arrays

        set_trainable_arrays(learner.model, record_to_arrays(arrays))
        learner.model.save_pretrained(run_dir / "adapter")
    summary = {
        "method": method,
        "seed": seed,
        "rounds": fed.rounds,
        "initial/acc_heldout": initial["global/acc_heldout"],
        "final/acc_heldout": final_accuracy,
        "wall_s": wall,
    }
    write_summary(run_dir, summary)
    return summary
