"""The federation loop the ServerApp runs: sample → local rounds → screen → aggregate → evaluate → log → checkpoint.

It drives any Flower `Strategy` through its own `configure_train` /
`aggregate_train` / `configure_evaluate` calls (rather than `Strategy.start`)
so that every round can log per-client statistics and aggregation weights to
metrics.jsonl, exclude faulty replies before any strategy sees them, and
checkpoint the server state for `--resume`. The same loop runs on the
in-process grid and on a real SuperLink.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from fgrpo.federation.checkpoint import (
    ServerState,
    capture_rng,
    config_differences,
    file_sha256,
    load_checkpoint,
    load_strategy_state,
    restore_rng,
    save_checkpoint,
    strategy_state,
)
from fgrpo.federation.compression import CompressionError, apply_delta, decode_delta
from fgrpo.config import CompressionConfig, Config, dump_config
from fgrpo.federation.defense import norm_clip_factors, scale_update, screen_update, update_norm
from fgrpo.errors import ConfigError, FederationError
from fgrpo.core.model import arrays_nbytes
from fgrpo.reporting.results import MetricsWriter, RunDirectory, run_directory, write_config, write_summary
from fgrpo.federation.screening import screen_round
from fgrpo.federation.strategies import make_strategy

# Methods that are run modes of the same code rather than Flower strategies.
PLUMBING_STRATEGY = {"centralized": "fedavg", "local": "fedavg"}
# Flower's robust FedAvg variants, used when a FedAvg run asks for robust aggregation.
ROBUST_FEDAVG = {"median": "fedmedian", "trimmed_mean": "fedtrimmedavg"}
# Methods whose aggregation Flower's DP accountant can account for (uniform FedAvg averaging).
DP_METHODS = ("fedavg", "fedprox")
UNIT_WEIGHT_KEY = "unit-weight"
# Keys that may change between a run and its resumption.
RESUMABLE_CHANGES = ("federation.rounds", "output.dir")


def clients_per_round(config: Config) -> int:
    fed = config.federation
    return min(fed.num_clients, max(fed.min_train_clients, int(fed.num_clients * fed.fraction_train)))


def build_strategy(config: Config, num_nodes: int):
    """The Flower strategy for the configured method, with robust aggregation and DP where asked."""
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
    robust = fed.defense.robust
    if name == "fgrpo":
        options = fed.fgrpo.model_dump()
    elif name == "fedprox":
        options = {"proximal_mu": fed.proximal_mu}
    elif name in ("fedadam", "fedyogi", "fedadagrad"):
        options = fed.server_opt.model_dump()
    if robust != "none":
        if name in ("fgrpo", "reward_weighted"):
            options.update(aggregator=robust, trim_fraction=fed.defense.trim_fraction)
        elif name == "fedavg":
            name = ROBUST_FEDAVG[robust]
            if robust == "trimmed_mean":
                options["beta"] = fed.defense.trim_fraction
        else:
            raise ConfigError(
                f"federation.defense.robust = '{robust}' works with methods fgrpo, reward_weighted and fedavg, "
                f"not '{fed.method}'"
            )
    if fed.dp.enabled:
        if fed.method not in DP_METHODS or robust != "none":
            raise ConfigError(
                f"federation.dp: method '{fed.method}'{' with robust aggregation' if robust != 'none' else ''} is not "
                f"supported. Flower's accountant covers the uniform average of {', '.join(DP_METHODS)} only; "
                "FGRPO's data-dependent weights change every client's share when one client joins, so the noise "
                "Flower adds would not bound its sensitivity"
            )
        common["weighted_by_key"] = UNIT_WEIGHT_KEY
    strategy = make_strategy(name, **common, **options)
    if fed.dp.enabled:
        strategy = _with_dp(strategy, config, sampled, num_nodes)
    return strategy


def _with_dp(strategy, config: Config, sampled: int, num_nodes: int):
    """Flower's central-DP wrapper (clients clip, the server adds noise σ·C/m) with its RDP accountant."""
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping
    from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    dp = config.federation.dp
    if dp.noise_multiplier <= 0:
        raise ConfigError("federation.dp.noise_multiplier must be > 0 when DP is enabled (σ = 0 gives no privacy)")
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=dp.delta,
            population_size=num_nodes,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    return DifferentialPrivacyClientSideFixedClipping(
        strategy, dp.noise_multiplier, dp.clip_norm, sampled, accountant=accountant
    )


def local_steps_per_round(config: Config) -> int:
    """Centralized training does the work of all sampled clients in one place (equal rollouts)."""
    fed = config.federation
    if fed.method == "centralized":
        return fed.local_steps * clients_per_round(config)
    return fed.local_steps


def _record_bytes(message: Message) -> int:
    content = message.content
    return sum(arrays_nbytes({k: v.numpy() for k, v in record.items()}) for record in content.array_records.values())


class Failure(NamedTuple):
    """A sampled client left out of a round's aggregation, and why."""

    node_id: int
    client_id: int | None
    reason: str


def summarize_failures(failures: list[Failure], limit: int = 600) -> str:
    """One line for many failures: identical reasons are said once, with the nodes that gave them."""
    by_reason: dict[str, list[int]] = {}
    for failure in failures:
        by_reason.setdefault(failure.reason, []).append(failure.node_id)
    parts = []
    for reason, nodes in by_reason.items():
        who = f"node {nodes[0]}" if len(nodes) == 1 else f"{len(nodes)} nodes ({', '.join(map(str, nodes[:3]))}{', …' if len(nodes) > 3 else ''})"
        parts.append(f"{who}: {reason}")
    text = "; ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _reply_arrays(reply: Message) -> dict[str, np.ndarray]:
    record = next(iter(reply.content.array_records.values()))
    return {name: array.numpy() for name, array in record.items()}


def screen_replies(
    messages: list[Message],
    replies: list[Message],
    current: dict[str, np.ndarray],
    node_clients: dict[int, int],
    compression: CompressionConfig | None = None,
    *,
    num_clients: int,
    weight_key: str = "num-examples",
) -> tuple[list[Message], list[Failure]]:
    """Split a round's replies into usable ones and failures (no reply, error, broken records, metrics, ids or arrays).

    Records and metrics are screened first (`screening.screen_round`: the
    node ↔ client-id bindings in `node_clients` grow on first sight). With a
    compression codec, each usable reply is then decoded in place to θ_t + Δ̂,
    so what follows (clipping, every strategy) sees ordinary float32 weights.
    """
    from fgrpo.federation.app import arrays_to_record  # app imports this module

    ok: list[Message] = []
    failures: list[Failure] = []
    answered = {r.metadata.reply_to_message_id for r in replies}
    for message in messages:
        if message.metadata.message_id not in answered:
            node = message.metadata.dst_node_id
            failures.append(Failure(node, node_clients.get(node), "no reply within federation.round_timeout_s"))
    accepted, refused = screen_round(replies, train=True, num_clients=num_clients, bindings=node_clients, weight_key=weight_key)
    failures += [Failure(*refusal) for refusal in refused]
    for reply in accepted:
        node = reply.metadata.src_node_id
        content = reply.content
        client_id = int(content["metrics"]["client-id"])
        arrays = _reply_arrays(reply)
        if compression is not None and compression.codec != "none":
            try:
                arrays = apply_delta(current, decode_delta(arrays, current, compression.codec, compression.block_size))
            except CompressionError as error:
                failures.append(Failure(node, client_id, str(error)[:400]))
                continue
            reply.content[next(iter(content.array_records))] = arrays_to_record(arrays)
        problem = screen_update(current, arrays)
        if problem is not None:
            failures.append(Failure(node, client_id, problem))
            continue
        ok.append(reply)
    return ok, failures


def clip_replies(
    ok: list[Message], current: dict[str, np.ndarray], multiple: float | None, mode: str
) -> tuple[list[Message], dict[int, tuple[float, float]], list[Failure]]:
    """Bound every update's norm by `multiple` × the round's median (scale it, or reject it).

    Returns (kept replies, client-id -> (norm, factor), rejections). Scaled
    replies are rewritten in place, so every strategy aggregates the bounded update.
    """
    norms = [update_norm(current, _reply_arrays(r)) for r in ok]
    ids = [int(r.content["metrics"]["client-id"]) for r in ok]
    factors = norm_clip_factors(norms, multiple) if multiple is not None else np.ones(len(ok))
    kept, rejected = [], []
    from fgrpo.federation.app import arrays_to_record

    for reply, norm, factor, cid in zip(ok, norms, factors, ids):
        if factor < 1.0 and mode == "reject":
            rejected.append(Failure(reply.metadata.src_node_id, cid, f"update norm {norm:.3g} > {multiple}× the round's median"))
            continue
        if factor < 1.0:
            key = next(iter(reply.content.array_records))
            reply.content[key] = arrays_to_record(scale_update(current, _reply_arrays(reply), float(factor)))
        kept.append(reply)
    return kept, {cid: (norm, float(f)) for cid, norm, f in zip(ids, norms, factors)}, rejected


def _aggregation_weights(strategy, ok_replies: list[Message]) -> dict[int, tuple[float, float | None]]:
    """client-id -> (weight, gain): FGRPO/reward-weighted report theirs, FedAvg-family weigh by n_k."""
    inner = getattr(strategy, "strategy", strategy)  # a DP wrapper holds the real strategy
    last = getattr(inner, "last_aggregation", None)
    if last is not None:
        gains = getattr(last, "gains", None)
        return {
            int(cid): (float(w), None if gains is None else float(gains[i]))
            for i, (cid, w) in enumerate(zip(last.client_ids, last.weights))
        }
    key = getattr(inner, "weighted_by_key", "num-examples")
    sizes = np.array([float(r.content["metrics"].get(key, 1.0)) for r in ok_replies])
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


def _privacy_spent(strategy) -> dict[str, float]:
    spent = strategy.privacy_spent() if hasattr(strategy, "privacy_spent") else None
    if spent is None:
        return {}
    return {"dp/epsilon": float(spent.epsilon), "dp/delta": float(spent.delta), "dp/releases": int(spent.num_releases)}


def check_metrics_prefix(path: Path, state: ServerState) -> None:
    """Resume only onto the metrics.jsonl the checkpoint saw: missing, shortened or edited files are refused."""
    if not path.is_file():
        raise ConfigError(
            f"cannot resume: '{path}' is missing; the checkpoint needs the run's metrics up to round "
            f"{state.server_round} ({state.metrics_offset} bytes). Restore it, or start the run again in a new directory"
        )
    size = path.stat().st_size
    if size < state.metrics_offset:
        raise ConfigError(
            f"cannot resume: '{path}' has {size} bytes but the checkpoint of round {state.server_round} recorded "
            f"{state.metrics_offset}; it was shortened. Restore it, or start the run again in a new directory"
        )
    if state.metrics_sha256 is not None and file_sha256(path, state.metrics_offset) != state.metrics_sha256:
        raise ConfigError(
            f"cannot resume: '{path}' was edited after the checkpoint of round {state.server_round} (its first "
            f"{state.metrics_offset} bytes differ). Restore it, or start the run again in a new directory"
        )


def _resume_state(run_dir: Path, config: Config) -> ServerState:
    state = load_checkpoint(run_dir)
    differences = config_differences(state.config_text, dump_config(config), RESUMABLE_CHANGES)
    if differences:
        raise ConfigError(
            f"cannot resume '{run_dir}': the config differs from the checkpointed run in {', '.join(differences[:8])}"
            f" (only {', '.join(RESUMABLE_CHANGES)} may change); use the run's own config.toml"
        )
    if state.server_round >= config.federation.rounds and (Path(run_dir) / "summary.json").exists():
        raise ConfigError(
            f"'{run_dir}' already finished its {state.server_round} rounds; raise federation.rounds to continue it"
        )
    return state


def run_federation(
    grid: Grid, config: Config, run_dir: Path, *, progress: bool = True, overwrite: bool = False, resume: bool = False
) -> dict:
    """Run `config.federation.rounds` rounds on `grid`; write RUN_DIR; return the summary.

    With --overwrite, a previous run in RUN_DIR is replaced only once this one
    has started cleanly (round 0 evaluated and checkpointed); a failed start
    removes what it wrote and puts the previous run back.
    """
    state = _resume_state(Path(run_dir), config) if resume else None
    with run_directory(run_dir, overwrite=overwrite, resume=resume) as directory:
        return _run_rounds(grid, config, directory, state, progress)


def _run_rounds(grid: Grid, config: Config, directory: RunDirectory, state: ServerState | None, progress: bool) -> dict:
    from fgrpo.federation.app import _shared_learner, arrays_to_record, record_to_arrays
    from fgrpo.core.model import get_trainable_arrays

    fed = config.federation
    method = fed.method
    seed = config.training.seed
    run_dir = directory.path
    write_config(run_dir, config)
    node_ids = list(grid.get_node_ids())
    strategy = build_strategy(config, len(node_ids))
    learner = _shared_learner(dump_config(config))
    node_clients: dict[int, int] = {}  # node id -> client id, bound on first sight (screening.bind_client)
    weight_key = UNIT_WEIGHT_KEY if fed.dp.enabled else "num-examples"
    if state is None:
        random.seed(seed)  # Flower strategies sample nodes with the `random` module
        np.random.seed(seed)  # Flower's DP noise uses NumPy's global RNG
        arrays = arrays_to_record(get_trainable_arrays(learner.model))
        first_round, elapsed = 1, 0.0
    else:
        arrays = arrays_to_record(state.arrays)
        load_strategy_state(strategy, state.strategy)
        restore_rng(state.python_rng, state.numpy_rng)
        if state.grid_state is not None and hasattr(grid, "load_state_dict"):
            grid.load_state_dict(state.grid_state)
        node_clients = dict(state.extra.get("node_clients", {}))
        check_metrics_prefix(run_dir / "metrics.jsonl", state)
        with open(run_dir / "metrics.jsonl", "r+b") as handle:  # drop records of the round the crash cut short
            handle.truncate(state.metrics_offset)
        first_round, elapsed = state.server_round + 1, state.elapsed_s
    if hasattr(strategy, "set_initial_arrays"):
        strategy.set_initial_arrays(arrays)

    train_config = {"local-steps": local_steps_per_round(config), "local-only": method == "local"}
    started = time.perf_counter() - elapsed
    from fgrpo.core.train import _progress

    def checkpoint(server_round: int, initial: dict, final_accuracy: float) -> None:
        python_rng, numpy_rng = capture_rng()
        save_checkpoint(
            run_dir,
            ServerState(
                server_round=server_round,
                arrays=record_to_arrays(arrays),
                strategy=strategy_state(strategy),
                python_rng=python_rng,
                numpy_rng=numpy_rng,
                metrics_offset=(run_dir / "metrics.jsonl").stat().st_size,
                metrics_sha256=file_sha256(run_dir / "metrics.jsonl"),
                config_text=dump_config(config),
                initial=initial,
                final_accuracy=final_accuracy,
                elapsed_s=time.perf_counter() - started,
                grid_state=grid.state_dict() if hasattr(grid, "state_dict") else None,
                extra={"node_clients": dict(node_clients)},
            ),
        )

    with MetricsWriter(run_dir, method, seed) as writer, _progress(progress) as bar:
        task = bar.add_task(f"{method} seed {seed}", total=fed.rounds, completed=first_round - 1, info="")

        def evaluate_round(server_round: int) -> dict[str, float]:
            messages = strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(train_config)), grid)
            answered = list(grid.send_and_receive(messages, timeout=fed.round_timeout_s))
            replies, refused = screen_round(answered, train=False, num_clients=fed.num_clients, bindings=node_clients)
            errors = [Failure(*refusal) for refusal in refused]
            if server_round == 0 and not replies:
                raise FederationError(
                    f"round 0: no client could evaluate the starting model ({summarize_failures(errors) or 'no replies'}); "
                    f"nothing was kept in '{run_dir}': fix the cause and run the same command again"
                )
            for failure in errors:
                known = {} if failure.client_id is None else {"client": failure.client_id}
                writer.write("failure", round=server_round, node=failure.node_id, reason=f"evaluate: {failure.reason}", **known)
            for reply in replies:
                m = reply.content["metrics"]
                if "acc-heldout" in m:
                    writer.write("client", round=server_round, client=int(m["client-id"]), **{"client/acc_heldout": float(m["acc-heldout"])})
            return _global_accuracy(replies)

        if state is None:
            initial = evaluate_round(0)
            writer.write("round", round=0, **initial)
            final_accuracy = initial["global/acc_heldout"]
            checkpoint(0, initial, final_accuracy)
            directory.commit()  # started cleanly: a replaced run may go now
        else:
            initial, final_accuracy = state.initial, state.final_accuracy
        bar.update(task, info=f"acc {final_accuracy:.1%}")
        for server_round in range(first_round, fed.rounds + 1):
            round_start = time.perf_counter()
            current = record_to_arrays(arrays)
            messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), grid))
            bytes_down = sum(_record_bytes(m) for m in messages)
            wire_before = getattr(grid, "wire_seconds", None)
            replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout_s))
            bytes_up = sum(_record_bytes(r) for r in replies if not r.has_error())  # as sent, before decoding
            aggregate_start = time.perf_counter()
            ok, failures = screen_replies(
                messages, replies, current, node_clients, fed.compression, num_clients=fed.num_clients, weight_key=weight_key
            )
            ok, norms, rejected = clip_replies(ok, current, fed.defense.norm_clip, fed.defense.norm_clip_mode)
            failures += rejected
            for failure in failures:
                known = {} if failure.client_id is None else {"client": failure.client_id}
                writer.write("failure", round=server_round, node=failure.node_id, reason=failure.reason, **known)
            if len(ok) < min(fed.min_train_clients, len(messages)):
                raise FederationError(
                    f"round {server_round}: only {len(ok)} of {len(messages)} clients succeeded "
                    f"(min_train_clients = {fed.min_train_clients}); {summarize_failures(failures)}. "
                    f"The last checkpoint in '{run_dir}' is intact: once the cause is fixed "
                    f"without changing the config, continue with `fgrpo run {run_dir}/config.toml --resume {run_dir}`"
                )
            new_arrays, _ = strategy.aggregate_train(server_round, ok)
            if new_arrays is not None and method != "local":
                arrays = new_arrays
            aggregate_s = time.perf_counter() - aggregate_start
            wire_s = None if wire_before is None else grid.wire_seconds - wire_before
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
                    "client/update_norm": norms[cid][0],
                }
                if norms[cid][1] < 1.0:
                    record["defense/clip_factor"] = norms[cid][1]
                if method != "local":
                    record["agg/weight"] = weight
                if gain is not None:
                    record["agg/gain"] = gain
                writer.write("client", round=server_round, client=cid, **record)
            eval_start = time.perf_counter()
            evaluation = evaluate_round(server_round) if server_round % fed.eval_every == 0 or server_round == fed.rounds else {}
            eval_s = time.perf_counter() - eval_start
            final_accuracy = evaluation.get("global/acc_heldout", final_accuracy)
            writer.write(
                "round",
                round=server_round,
                **evaluation,
                **_privacy_spent(strategy),
                **{
                    "comm/bytes_down": bytes_down,
                    "comm/bytes_up": bytes_up,
                    "time/round_s": time.perf_counter() - round_start,
                    "time/client_train_s": sum(float(r.content["metrics"]["train-time"]) for r in ok),
                    "time/aggregate_s": aggregate_s,
                    "time/eval_s": eval_s,
                    **({} if wire_s is None else {"time/wire_s": wire_s}),
                    "clients/sampled": len(messages),
                    "clients/failed": len(failures),
                    "clients/aggregated": len(ok) if new_arrays is not None else 0,
                },
            )
            if server_round % fed.checkpoint_every == 0 or server_round == fed.rounds:
                checkpoint(server_round, initial, final_accuracy)
            bar.update(task, advance=1, info=f"acc {final_accuracy:.1%}")
    wall = time.perf_counter() - started
    if config.output.save_adapter:
        from fgrpo.core.model import set_trainable_arrays

        set_trainable_arrays(learner.model, record_to_arrays(arrays))
        learner.model.save_pretrained(run_dir / "adapter")
    summary = {
        "method": method,
        "seed": seed,
        "rounds": fed.rounds,
        "initial/acc_heldout": initial["global/acc_heldout"],
        "final/acc_heldout": final_accuracy,
        "wall_s": wall,
        **_privacy_spent(strategy),
    }
    write_summary(run_dir, summary)
    return summary
