"""The federation loop the ServerApp runs, as DESIGN.md's round loop; the server holds no model.

    init (θ₀ from a client) → round 0: evaluate → for t = 1..T:
    configure → send → screen → clip → aggregate → log → evaluate → checkpoint

`RoundLoop` names each stage as a method on the loop's state (θ_t, the
strategy, the metrics writer), so each can be driven on its own on a fake
grid. It drives any Flower `Strategy` through its own `configure_train` /
`aggregate_train` / `configure_evaluate` calls (rather than `Strategy.start`)
so that every round can log per-client statistics and aggregation weights to
metrics.jsonl, exclude faulty replies before any strategy sees them, and
checkpoint the server state for `--resume`. The same loop runs on the
in-process grid and on a real SuperLink, and imports neither torch nor
transformers: θ₀ and the layout of the final weights come from a client
(`init_from_client`), and the final adapter is written from arrays
(`fgrpo.federation.export`).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedMedian, FedTrimmedAvg, Strategy

from fgrpo.config import Config, dump_config
from fgrpo.errors import ConfigError, FederationError
from fgrpo.federation import wire
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
from fgrpo.federation.export import save_weights
from fgrpo.federation.hetlora import full_rank, rankwise_correction
from fgrpo.federation.methods import build_strategy, local_steps_per_round, prompts_per_step, weight_key
from fgrpo.federation.reply_checks import decode_arrays, error_reason, read_init_reply, screen_round
from fgrpo.federation.screening import Failure, cap_sizes, capped_sizes, clip_replies, screen_replies
from fgrpo.federation.strategies import WeightedAverage
from fgrpo.registry import MIXED_RANK_METHODS, PERSONAL_METHODS, SERVER_LR_METHODS
from fgrpo.federation.wire import ACC_HELDOUT, arrays_nbytes, arrays_to_record, record_to_arrays, scale_update
from fgrpo.reporting.progress import progress_bar
from fgrpo.reporting.results import MetricsWriter, RunDirectory, run_directory, write_config, write_summary
from fgrpo.reporting.tracking import check_report_to, open_trackers

# Keys that may change between a run and its resumption (the runtime: where clients run, not what they compute).
RESUMABLE_CHANGES = ("federation.rounds", "output.dir") + tuple(
    f"runtime.{key}" for key in ("backend", "workers", "threads", "num_cpus_per_client", "num_gpus_per_client")
)
GLOBAL_ACC = f"global/{ACC_HELDOUT}"
GLOBAL_ACC_GLOBAL_SET = f"global/{wire.ACC_GLOBAL_SET}"  # local-only: its models on every owner's held-out data
INIT_GROUP = "init"
# The init query is where a node loads its model: allow it more than a round's timeout.
INIT_TIMEOUT_S = 600.0


def _record_bytes(message: Message) -> int:
    """Bytes of a message's arrays; a reply's arrays that do not decode (screening refuses them) count as sent."""
    total = 0
    for record in message.content.array_records.values():
        arrays, _ = decode_arrays(record)
        total += arrays_nbytes(arrays) if arrays is not None else sum(len(array.data) for array in record.values())
    return total


def init_from_client(
    grid: Grid, node_ids: list[int], timeout: float | None, reference: dict[str, np.ndarray] | None = None
) -> tuple[ArrayRecord, dict, list[Failure]]:
    """(θ₀, checkpoint layout, refused init replies) from the first node whose init reply passes the checks.

    They all hold the same θ₀; a reply is refused (`reply_checks.read_init_reply`:
    a layout that names a path or is not JSON, θ₀ that is not finite floating
    point, or not shaped like `reference`, a resumed run's θ_t) and the next
    node is asked. When none can, the error says why once per distinct reason
    (a bad config fails the same way on every node).
    """
    failures: list[Failure] = []
    for node in sorted(node_ids):
        message = grid.create_message(RecordDict({wire.CONFIG: ConfigRecord({})}), MessageType.QUERY, node, INIT_GROUP)
        for reply in grid.send_and_receive([message], timeout=timeout):
            if reply.has_error():
                failures.append(Failure(node, None, error_reason(reply.error.reason)[:300]))
                continue
            try:
                theta, layout = read_init_reply(reply.content, reference)
            except FederationError as error:
                failures.append(Failure(node, None, f"init reply refused: {error}"[:400]))
                continue
            return arrays_to_record(theta), layout, failures
    raise FederationError(
        f"round 0: no client could load the model and send the starting adapter θ₀ (the server holds no model): "
        f"{summarize_failures(failures) or 'no reply'}; nothing was kept: fix the cause and run the same command again"
    )


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


def global_accuracy(eval_replies: list[Message]) -> dict[str, float]:
    """Pool the clients' held-out results: their splits together are the pooled held-out set.

    Each client's count is its own word, so it counts as `screening.capped_sizes`
    allows (its per-family counts scaled alike): one client claiming 1e9
    examples, all correct, moves the pooled accuracy by at most its capped
    share of the round, never to 100%.
    """
    total, correct = 0.0, 0.0
    family_n: dict[str, float] = {}
    family_correct: dict[str, float] = {}
    scored = [r.content[wire.METRICS] for r in eval_replies]
    scored = [m for m in scored if float(m[wire.NUM_EXAMPLES]) > 0 and ACC_HELDOUT in m]
    claims = [float(m[wire.NUM_EXAMPLES]) for m in scored]
    for metrics, claim, n in zip(scored, claims, capped_sizes(claims)):
        total += n
        correct += float(metrics[ACC_HELDOUT]) * n
        for key in metrics:
            if key.startswith(wire.FAMILY_ACC):
                family = key[len(wire.FAMILY_ACC):]
                fn = float(metrics[f"{wire.FAMILY_N}{family}"]) * (n / claim)
                family_n[family] = family_n.get(family, 0) + fn
                family_correct[family] = family_correct.get(family, 0) + float(metrics[key]) * fn
    result = {GLOBAL_ACC: correct / total if total else float("nan")}
    result.update({f"global/acc/{f}": family_correct[f] / family_n[f] for f in sorted(family_n)})
    on_global_set = [
        float(r.content[wire.METRICS][wire.ACC_GLOBAL_SET]) for r in eval_replies if wire.ACC_GLOBAL_SET in r.content[wire.METRICS]
    ]
    if on_global_set:  # local-only: the mean over owners of each owner's model on the whole held-out set
        result[GLOBAL_ACC_GLOBAL_SET] = float(np.mean(on_global_set))
    return result


def aggregation_weights(strategy: Strategy, ok: list[Message], key: str) -> dict[int, tuple[float, float | None]]:
    """client-id -> (weight, gain) of the last aggregation: the weights the strategy really used.

    fgrpo's strategies report their own (`WeightedAverage.last_aggregation`);
    Flower's FedMedian and FedTrimmedAvg ignore the sizes (one equal vote each:
    1/K); the rest of Flower's FedAvg family weighs each reply by its `key`
    metric (n_k as `screening.cap_sizes` left it, or 1 under DP).
    """
    inner = strategy.strategy if isinstance(strategy, DifferentialPrivacyClientSideFixedClipping) else strategy
    if isinstance(inner, WeightedAverage) and inner.last_aggregation is not None:
        last = inner.last_aggregation
        return {cid: (w, g) for cid, w, g in zip(last.client_ids, last.weights, last.gains)}
    if isinstance(inner, (FedMedian, FedTrimmedAvg)):
        return {int(r.content[wire.METRICS][wire.CLIENT_ID]): (1.0 / len(ok), None) for r in ok}
    sizes = np.array([float(r.content[wire.METRICS].get(key, 1.0)) for r in ok])
    weights = sizes / sizes.sum() if sizes.sum() > 0 else np.full(len(sizes), 1 / max(1, len(sizes)))
    return {int(r.content[wire.METRICS][wire.CLIENT_ID]): (float(w), None) for r, w in zip(ok, weights)}


def privacy_spent(strategy: Strategy) -> dict[str, float]:
    spent = strategy.privacy_spent() if isinstance(strategy, DifferentialPrivacyClientSideFixedClipping) else None
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
    if state.metrics_sha256 is None:
        raise ConfigError(
            f"cannot resume: the checkpoint of round {state.server_round} records no hash of '{path}', so fgrpo "
            "cannot check what resuming would drop from it; start the run again in a new directory"
        )
    if file_sha256(path, state.metrics_offset) != state.metrics_sha256:
        raise ConfigError(
            f"cannot resume: '{path}' was edited after the checkpoint of round {state.server_round} (its first "
            f"{state.metrics_offset} bytes differ). Restore it, or start the run again in a new directory"
        )
    dropped = _records_beyond(path, state.metrics_offset, state.server_round)
    if dropped is not None:
        raise ConfigError(
            f"cannot resume: resuming would cut '{path}' back to byte {state.metrics_offset} (the checkpoint of round "
            f"{state.server_round}), but what follows {dropped}. Restore the file, or start the run again in a new "
            "directory"
        )


def _records_beyond(path: Path, offset: int, server_round: int) -> str | None:
    """What is wrong with dropping metrics.jsonl's bytes after `offset`, or None when they are only the records
    of rounds after `server_round` (the round a crash cut short, its last line perhaps half-written).

    Resuming truncates the file to `offset`: this is the check that nothing else would go.
    """
    with open(path, "rb") as handle:
        if offset > 0:
            handle.seek(offset - 1)
            if handle.read(1) != b"\n":
                return "starts inside a record"
        lines = handle.read().split(b"\n")
    for number, line in enumerate(lines[:-1]):  # the last piece has no newline: a write the crash cut short
        try:
            record = json.loads(line)
        except ValueError:
            return f"has a line that is not JSON (line {number + 1} after that byte)"
        later = isinstance(record, dict) and isinstance(record.get("round"), int) and record["round"] > server_round
        if not later:
            return "holds records of rounds the checkpoint already covers"
    return None


def resume_state(run_dir: Path, config: Config) -> ServerState:
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


@dataclass
class RoundLoop:
    """The server's state across rounds and one method per stage of a round."""

    grid: Grid
    config: Config
    run_dir: Path
    strategy: Strategy
    writer: MetricsWriter
    arrays: ArrayRecord  # θ_t, the global adapter
    started: float  # perf_counter at the run's start (earlier by the time a resumed run already spent)
    node_clients: dict[int, int] = field(default_factory=dict)  # Flower node id -> stable client id
    initial: dict = field(default_factory=dict)  # round 0's evaluation
    final_accuracy: float = float("nan")
    final_global_set: float | None = None  # local-only's accuracy on the whole held-out set
    norms: dict[int, tuple[float, float]] = field(default_factory=dict)  # client id -> (update norm, clip factor)
    ranks: dict[int, int] = field(default_factory=dict)  # client id -> the LoRA rank it last declared
    train_sizes: dict[int, int] = field(default_factory=dict)  # client id -> the num-examples it first trained on
    eval_sizes: dict[int, int] = field(default_factory=dict)  # client id -> the held-out count it first reported
    counted: dict[int, tuple[float, float]] = field(default_factory=dict)  # client id -> (claimed, counted) size

    @property
    def round_config(self) -> ConfigRecord:
        fed = self.config.federation
        return ConfigRecord({
            wire.LOCAL_STEPS: local_steps_per_round(self.config),
            wire.PROMPTS_PER_STEP: prompts_per_step(self.config),
            wire.LOCAL_ONLY: fed.method == "local",
        })

    # ------------------------------------------------------------------ stages of a training round

    def configure(self, server_round: int) -> list[Message]:
        """The strategy samples clients and builds their train messages (θ_t and the round config)."""
        return list(self.strategy.configure_train(server_round, self.arrays, self.round_config, self.grid))

    def send(self, messages: list[Message]) -> list[Message]:
        return list(self.grid.send_and_receive(messages, timeout=self.config.federation.round_timeout_s))

    def screen(self, messages: list[Message], replies: list[Message]) -> tuple[list[Message], list[Failure]]:
        """Drop missing or broken replies (decoding compressed ones), then bound the update norms."""
        fed = self.config.federation
        current = record_to_arrays(self.arrays)
        ok, failures = screen_replies(
            messages,
            replies,
            current,
            self.node_clients,
            fed.compression,
            num_clients=fed.num_clients,
            weight_key=weight_key(self.config),
            ranks=self.ranks,
            mixed_ranks=fed.method in MIXED_RANK_METHODS and not fed.dp.enabled,
            personal=fed.method in PERSONAL_METHODS,
            sizes=self.train_sizes,
        )
        # Local-only owners share nothing, so there is no average to protect: their updates are not clipped.
        multiple = None if fed.method == "local" else fed.defense.clip_multiple
        ok, self.norms, rejected = clip_replies(ok, current, multiple, fed.defense.norm_clip_mode)
        self.counted = cap_sizes(ok, weight_key(self.config))
        return ok, failures + rejected

    def aggregate(self, server_round: int, ok: list[Message]) -> bool:
        """θ_{t+1} from the screened replies (local-only keeps θ_t); True when the strategy aggregated."""
        fed = self.config.federation
        current = self.arrays
        new_arrays, _ = self.strategy.aggregate_train(server_round, ok)
        if new_arrays is not None and fed.method != "local":
            new_arrays = self.rankwise(current, new_arrays, ok)
        if new_arrays is not None and fed.method in SERVER_LR_METHODS and fed.server_lr != 1.0:
            # θ ← θ + η (aggregate − θ): the FedAvg family's server learning rate (fgrpo tune searches it).
            new_arrays = arrays_to_record(scale_update(record_to_arrays(current), record_to_arrays(new_arrays), fed.server_lr))
        if new_arrays is not None and fed.method != "local":
            self.arrays = new_arrays
        return new_arrays is not None

    def rankwise(self, current: ArrayRecord, aggregate: ArrayRecord, ok: list[Message]) -> ArrayRecord:
        """With mixed LoRA ranks, component j's step over the weight of the clients that trained it (hetlora.py)."""
        theta = record_to_arrays(current)
        rank = full_rank(theta)
        ids = [int(r.content[wire.METRICS][wire.CLIENT_ID]) for r in ok]
        ranks = [self.ranks.get(cid, rank) for cid in ids]
        if rank is None or all(r == rank for r in ranks):
            return aggregate
        weights = aggregation_weights(self.strategy, ok, weight_key(self.config))
        return arrays_to_record(rankwise_correction(theta, record_to_arrays(aggregate), ranks, [weights[c][0] for c in ids]))

    def log_failures(self, server_round: int, failures: list[Failure], prefix: str = "") -> None:
        """One `failure` record per refused reply, with its node, its client (if known) and why."""
        for failure in failures:
            known = {} if failure.client_id is None else {"client": failure.client_id}
            self.writer.write("failure", round=server_round, node=failure.node_id, reason=f"{prefix}{failure.reason}", **known)

    def log_clients(self, server_round: int, ok: list[Message], failures: list[Failure]) -> None:
        """One record per failure and per aggregated client: its statistics, norm, weight and gain."""
        self.log_failures(server_round, failures)
        key = weight_key(self.config)
        weights = aggregation_weights(self.strategy, ok, key)
        for reply in ok:
            m = reply.content[wire.METRICS]
            cid = int(m[wire.CLIENT_ID])
            weight, gain = weights.get(cid, (None, None))
            norm, factor = self.norms[cid]
            claimed, counted = self.counted[cid]
            record = {
                "client/reward_mean": float(m[wire.REWARD_MEAN]),
                "client/reward_std": float(m[wire.REWARD_STD]),
                "client/accuracy": float(m[wire.ACCURACY]),
                "client/num_examples": int(claimed if key == wire.NUM_EXAMPLES else m[wire.NUM_EXAMPLES]),  # as claimed
                "client/train_s": float(m[wire.TRAIN_TIME]),
                "client/update_norm": norm,
            }
            if cid in self.ranks:
                record["client/lora_rank"] = self.ranks[cid]
            if factor < 1.0:
                record["defense/clip_factor"] = factor
            if counted < claimed:
                record["defense/size_counted"] = counted  # the size weighed, below the claimed one
            if self.config.federation.method != "local":
                record["agg/weight"] = weight
            if gain is not None:
                record["agg/gain"] = gain
            self.writer.write("client", round=server_round, client=cid, **record)

    def evaluate(self, server_round: int) -> dict[str, float]:
        """Every client scores θ_t on its held-out split; returns the pooled accuracy."""
        messages = self.strategy.configure_evaluate(server_round, self.arrays, self.round_config, self.grid)
        answered = self.send(list(messages))
        # Evaluation replies pass the same rules as training replies (ids bound to nodes, values in range).
        replies, refused = screen_round(
            answered,
            train=False,
            num_clients=self.config.federation.num_clients,
            bindings=self.node_clients,
            sizes=self.eval_sizes,
        )
        errors = [Failure(*refusal) for refusal in refused]
        if server_round == 0 and not replies:
            raise FederationError(
                f"round 0: no client could evaluate the starting model ({summarize_failures(errors) or 'no replies'}); "
                f"nothing was kept in '{self.run_dir}': fix the cause and run the same command again"
            )
        self.log_failures(server_round, errors, "evaluate: ")
        for reply in replies:
            m = reply.content[wire.METRICS]
            if ACC_HELDOUT in m:
                self.writer.write(
                    "client", round=server_round, client=int(m[wire.CLIENT_ID]), **{f"client/{ACC_HELDOUT}": float(m[ACC_HELDOUT])}
                )
        return global_accuracy(replies)

    def checkpoint(self, server_round: int) -> None:
        python_rng, numpy_rng = capture_rng()
        save_checkpoint(
            self.run_dir,
            ServerState(
                server_round=server_round,
                arrays=record_to_arrays(self.arrays),
                strategy=strategy_state(self.strategy),
                python_rng=python_rng,
                numpy_rng=numpy_rng,
                metrics_offset=(self.run_dir / "metrics.jsonl").stat().st_size,
                metrics_sha256=file_sha256(self.run_dir / "metrics.jsonl"),
                config_text=dump_config(self.config),
                initial=self.initial,
                final_accuracy=self.final_accuracy,
                elapsed_s=time.perf_counter() - self.started,
                grid_state=self.grid.state_dict() if hasattr(self.grid, "state_dict") else None,
                extra={
                    "node_clients": dict(self.node_clients),
                    "train_sizes": dict(self.train_sizes),
                    "eval_sizes": dict(self.eval_sizes),
                },
            ),
        )

    # ------------------------------------------------------------------ rounds

    def initial_round(self) -> None:
        """Round 0: evaluate θ₀ and checkpoint, so a run killed in round 1 resumes from here."""
        self.initial = self.evaluate(0)
        self.writer.write("round", round=0, **self.initial)
        self.final_accuracy = self.initial[GLOBAL_ACC]
        self.final_global_set = self.initial.get(GLOBAL_ACC_GLOBAL_SET)
        self.checkpoint(0)

    def train_round(self, server_round: int) -> None:
        """configure → send → screen → clip → aggregate → log → evaluate → checkpoint."""
        fed = self.config.federation
        round_start = time.perf_counter()
        messages = self.configure(server_round)
        bytes_down = sum(_record_bytes(m) for m in messages)
        wire_before = getattr(self.grid, "wire_seconds", None)  # the in-process grid times its serialisation
        replies = self.send(messages)
        bytes_up = sum(_record_bytes(r) for r in replies if not r.has_error())  # as sent, before decoding
        if fed.method == "local":
            # The in-process plumbing passes adapters so one loop serves every method, but a
            # local-only owner sends and receives nothing.
            bytes_down = bytes_up = 0
        aggregate_start = time.perf_counter()
        ok, failures = self.screen(messages, replies)
        if len(ok) < min(fed.min_train_clients, len(messages)):
            self.log_failures(server_round, failures)
            raise FederationError(
                f"round {server_round}: only {len(ok)} of {len(messages)} clients succeeded "
                f"(min_train_clients = {fed.min_train_clients}); {summarize_failures(failures)}. "
                f"The last checkpoint in '{self.run_dir}' is intact: once the cause is fixed without changing the "
                f"config, continue with `fgrpo run {self.run_dir}/config.toml --resume {self.run_dir}`"
            )
        aggregated = self.aggregate(server_round, ok)
        aggregate_s = time.perf_counter() - aggregate_start
        wire_s = None if wire_before is None else self.grid.wire_seconds - wire_before
        self.log_clients(server_round, ok, failures)
        eval_start = time.perf_counter()
        due = server_round % fed.eval_every == 0 or server_round == fed.rounds
        evaluation = self.evaluate(server_round) if due else {}
        eval_s = time.perf_counter() - eval_start
        self.final_accuracy = evaluation.get(GLOBAL_ACC, self.final_accuracy)
        self.final_global_set = evaluation.get(GLOBAL_ACC_GLOBAL_SET, self.final_global_set)
        self.writer.write(
            "round",
            round=server_round,
            **evaluation,
            **privacy_spent(self.strategy),
            **{
                "comm/bytes_down": bytes_down,
                "comm/bytes_up": bytes_up,
                "time/round_s": time.perf_counter() - round_start,
                "time/client_train_s": sum(float(r.content[wire.METRICS][wire.TRAIN_TIME]) for r in ok),
                "time/aggregate_s": aggregate_s,
                "time/eval_s": eval_s,
                **({} if wire_s is None else {"time/wire_s": wire_s}),
                "clients/sampled": len(messages),
                "clients/failed": len(failures),
                "clients/aggregated": len(ok) if aggregated else 0,
            },
        )
        if server_round % fed.checkpoint_every == 0 or server_round == fed.rounds:
            self.checkpoint(server_round)


def run_federation(
    grid: Grid, config: Config, run_dir: Path, *, progress: bool = True, overwrite: bool = False, resume: bool = False
) -> dict:
    """Run `config.federation.rounds` rounds on `grid`; write RUN_DIR; return the summary.

    With --overwrite, a previous run in RUN_DIR is replaced only once this one
    has started cleanly (round 0 evaluated and checkpointed); a failed start
    removes what it wrote and puts the previous run back.
    """
    state = resume_state(Path(run_dir), config) if resume else None
    if state is not None:  # refused before anything in RUN_DIR changes (config.toml included)
        check_metrics_prefix(Path(run_dir) / "metrics.jsonl", state)
    with run_directory(run_dir, overwrite=overwrite, resume=resume) as directory:
        return _run(grid, config, directory, state, progress)


def _run(grid: Grid, config: Config, directory: RunDirectory, state: ServerState | None, progress: bool) -> dict:
    fed = config.federation
    seed = config.training.seed
    run_dir = directory.path
    check_report_to(config)
    node_ids = list(grid.get_node_ids())
    strategy = build_strategy(config, len(node_ids))
    init_timeout = None if fed.round_timeout_s is None else max(fed.round_timeout_s, INIT_TIMEOUT_S)
    initial_arrays, layout, init_failures = init_from_client(grid, node_ids, init_timeout, None if state is None else state.arrays)
    if state is None:
        random.seed(seed)  # Flower strategies sample nodes with the `random` module
        np.random.seed(seed)  # Flower's DP noise uses NumPy's global RNG
        arrays, first_round, elapsed, node_clients, sizes = initial_arrays, 1, 0.0, {}, {}
    else:
        arrays = arrays_to_record(state.arrays)
        load_strategy_state(strategy, state.strategy)
        restore_rng(state.python_rng, state.numpy_rng)
        if state.grid_state is not None and hasattr(grid, "load_state_dict"):
            grid.load_state_dict(state.grid_state)
        node_clients = dict(state.extra.get("node_clients", {}))
        sizes = {key: dict(state.extra.get(key, {})) for key in ("train_sizes", "eval_sizes")}
        check_metrics_prefix(run_dir / "metrics.jsonl", state)  # again, right before the only truncation
        with open(run_dir / "metrics.jsonl", "r+b") as handle:  # drop records of the round the crash cut short
            handle.truncate(state.metrics_offset)
        first_round, elapsed = state.server_round + 1, state.elapsed_s
    write_config(run_dir, config)  # only once a resume is accepted: a refused one leaves config.toml as it was

    trackers = open_trackers(run_dir, config, name=f"{fed.method}-seed{seed}")
    with MetricsWriter(run_dir, fed.method, seed, trackers) as writer, progress_bar(progress) as bar:
        loop = RoundLoop(grid, config, run_dir, strategy, writer, arrays, time.perf_counter() - elapsed, node_clients)
        loop.train_sizes, loop.eval_sizes = sizes.get("train_sizes", {}), sizes.get("eval_sizes", {})
        loop.log_failures(first_round - 1, init_failures)
        task = bar.add_task(f"{fed.method} seed {seed}", total=fed.rounds, completed=first_round - 1, info="")
        if state is None:
            loop.initial_round()
            directory.commit()  # started cleanly: a replaced run may go now
        else:
            loop.initial, loop.final_accuracy = state.initial, state.final_accuracy
            loop.final_global_set = state.initial.get(GLOBAL_ACC_GLOBAL_SET)
        bar.update(task, info=f"acc {loop.final_accuracy:.1%}")
        for server_round in range(first_round, fed.rounds + 1):
            loop.train_round(server_round)
            bar.update(task, advance=1, info=f"acc {loop.final_accuracy:.1%}")
    wall = time.perf_counter() - loop.started
    if config.output.save_adapter:
        save_weights(run_dir / "adapter", record_to_arrays(loop.arrays), layout)
    summary = {
        "method": fed.method,
        "seed": seed,
        "rounds": fed.rounds,
        f"initial/{ACC_HELDOUT}": loop.initial[GLOBAL_ACC],
        f"final/{ACC_HELDOUT}": loop.final_accuracy,
        **({} if loop.final_global_set is None else {f"final/{wire.ACC_GLOBAL_SET}": loop.final_global_set}),
        "eval_split": config.evaluation.split,
        "wall_s": wall,
        **privacy_spent(strategy),
    }
    write_summary(run_dir, summary)
    return summary
