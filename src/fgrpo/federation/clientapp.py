"""The Flower ClientApp: a node's local GRPO rounds, held-out evaluation and θ₀, run unchanged in-process and on Flower.

The run config carries the whole resolved fgrpo config as TOML text
(`fgrpo-config`), so a SuperNode needs nothing from the server but the run;
each node's own data and reward code come from its node config
(`partition-id` / `num-partitions`, `data-path` or `data-config`; see
`fgrpo.data.node_spec`): files and modules the run config names are read only
where the node allows it. What goes over the wire is
`fgrpo.federation.wire`'s contract.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fgrpo.config import Config
from fgrpo.core.learner import GRPOLearner
from fgrpo.core.model import checkpoint_layout, get_trainable_arrays
from fgrpo.core.pipeline import build_learner
from fgrpo.core.threads import apply_threads, available_cores, env_thread_budget, threads_per_worker
from fgrpo.federation import wire
from fgrpo.federation.client import ClientData, all_client_data, evaluate_arrays, local_round, pooled_data, round_seed
from fgrpo.federation.export import layout_to_text as export_layout_text
from fgrpo.federation.wire import arrays_to_record, config_from_context, config_from_text, record_to_arrays

def node_config_from_context(context: Context) -> Config:
    """The run config as this node uses it (its own data and reward code, `data.node_spec`)."""
    return config_from_text(node_config_text(context))


@lru_cache(maxsize=64)
def _node_config_text(config_text: str, node_items: tuple) -> str:
    """The run config as this node uses it: its [tasks] with the node's own data and reward code."""
    from fgrpo.config import dump_config
    from fgrpo.data.node_spec import node_spec, node_tasks

    config = config_from_text(config_text)
    tasks = node_tasks(config.tasks, node_spec(dict(node_items)))
    # Unchanged text when nothing changed, so in-process nodes share one learner.
    return config_text if tasks is config.tasks else dump_config(config.model_copy(update={"tasks": tasks}))


def node_config_text(context: Context) -> str:
    return _node_config_text(wire.config_text(context), tuple(sorted(context.node_config.items())))


@lru_cache(maxsize=2)
def _shared_learner(config_text: str) -> GRPOLearner:
    """One policy per process: in-process clients share it and swap adapters in and out.

    Its first use is where this process takes its torch thread budget
    (`runtime.threads`; "auto": the OMP_NUM_THREADS that whoever started this
    process set, else every core): a Flower ClientApp process, an in-process
    worker and a Ray actor all pass through here before they run torch.
    """
    config = config_from_text(config_text)
    apply_threads(threads_per_worker(1, available_cores(), config.runtime.threads, env_thread_budget()))
    return build_learner(config, config.training.seed)


def shared_learner(context: Context) -> GRPOLearner:
    return _shared_learner(node_config_text(context))


@lru_cache(maxsize=1024)
def _client_data(config_text: str, partition_id: int, num_partitions: int, data_path: str, own_data: bool = False) -> ClientData:
    config = config_from_text(config_text)
    if own_data and not data_path:  # the node's data-config: all of its examples are this client's
        from fgrpo.core.pipeline import build_task_splits

        splits = build_task_splits(config.tasks.model_copy(update={"families": []}))
        return ClientData(partition_id, splits.train, splits.test, splits.validation)
    if data_path:
        if not Path(data_path).is_file():
            from fgrpo.errors import DataError

            raise DataError(f"node config data-path '{data_path}': no such file on this SuperNode")
        return file_client_data(config, partition_id, data_path)
    if config.federation.method == "centralized":
        return pooled_data(config)
    if not 0 <= partition_id < num_partitions:
        from fgrpo.errors import ConfigError

        raise ConfigError(f"node config partition-id = {partition_id} must be in 0..{num_partitions - 1} (num-partitions)")
    return _partitioned(config_text, num_partitions)[partition_id]


@lru_cache(maxsize=2)
def _partitioned(config_text: str, num_partitions: int) -> list[ClientData]:
    """All partitions at once: in-process nodes share one partitioning (examples are shared, not copied)."""
    return all_client_data(config_from_text(config_text), num_partitions)


# A node's own file holds out the same share as a config's [[tasks.files]] entry by default.
NODE_FILE_TEST_FRACTION = 0.2


def file_client_data(config: Config, partition_id: int, data_path: str) -> ClientData:
    """A SuperNode's own JSONL file (deployment): its prompts never exist anywhere else."""
    from fgrpo.data.tasks import load_jsonl, train_test_split

    examples = load_jsonl(data_path, family=f"client{partition_id}")
    train, test = train_test_split(examples, NODE_FILE_TEST_FRACTION, config.tasks.seed)
    return ClientData(partition_id, train, test)


def global_heldout(context: Context, split: str) -> list | None:
    """Every owner's held-out examples together, for scoring a local-only model beyond its own split.

    Only a simulated node can rebuild them (from the shared pool definition); a
    node with its own data file cannot see other owners' data, so it gets None.
    """
    node = context.node_config
    config_text = wire.config_text(context)
    if str(node.get("data-path", "")) or config_from_text(config_text).federation.method == "centralized":
        return None
    shares = _partitioned(config_text, int(node.get("num-partitions", 1)))
    return [ex for share in shares for ex in share.heldout(split)]


def node_data(context: Context) -> ClientData:
    """This node's examples, from the data it owns (`data.node_spec`); errors that leave it quote no data."""
    from fgrpo.data.node_spec import node_spec, public_message
    from fgrpo.errors import DataError, FgrpoError

    node = context.node_config
    text = node_config_text(context)
    own_data = node_spec(node).owns_data  # a data-config may bring only reward code
    try:
        return _client_data(
            text,
            int(node.get("partition-id", 0)),
            int(node.get("num-partitions", 1)),
            str(node.get("data-path", "")),
            own_data,
        )
    except DataError as error:
        raise DataError(public_message(error)) from None
    except FgrpoError:
        raise  # names keys and files, never data
    except Exception as error:  # noqa: BLE001 - whatever else the reader raised, only its type travels
        raise DataError(public_message(error)) from None


def dp_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Client-side DP clipping: ‖θ_k − θ_t‖ ≤ C when the server's DP wrapper sends a clipping norm C.

    The same contract as Flower's `fixedclipping_mod` (which it replaces only
    because flwr 1.42's version divides by zero on an all-zero update, which a
    GRPO round with no reward variance produces).
    """
    from flwr.app import MessageType
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from fgrpo.federation.defense import update_norm

    reply = call_next(msg, context)
    config = msg.content.config_records.get(wire.CONFIG) if msg.has_content() else None
    if msg.metadata.message_type != MessageType.TRAIN or config is None or KEY_CLIPPING_NORM not in config:
        return reply
    if reply.has_error():
        return reply
    start, sent = record_to_arrays(msg.content[wire.ARRAYS]), record_to_arrays(reply.content[wire.ARRAYS])
    norm, clip = update_norm(start, sent), float(config[KEY_CLIPPING_NORM])
    if norm > clip:
        reply.content[wire.ARRAYS] = arrays_to_record(wire.scale_update(start, sent, clip / norm))
    return reply


def simulate_attack(
    config: Config, client_id: int, server_round: int, start: dict[str, np.ndarray], arrays: dict, metrics: dict
) -> tuple[dict[str, np.ndarray], dict]:
    """A malicious client (federation.attack): lie about the reward, scale the update. Honest clients pass through."""
    attack = config.federation.attack
    if client_id not in attack.clients:
        return arrays, metrics
    if attack.update_scale != 1.0:
        arrays = wire.scale_update(start, arrays, attack.update_scale)
    if attack.reward_growth is not None:
        metrics = {**metrics, wire.REWARD_MEAN: float(attack.reward_growth ** max(server_round, 1))}
    return arrays, metrics


def encode_upload(config: Config, start: dict[str, np.ndarray], trained: dict[str, np.ndarray], context: Context) -> dict:
    """What the client sends: θ_k as is, or its compressed delta (the node's context keeps the error-feedback residual)."""
    from fgrpo.federation.compression import compress_update

    options = config.federation.compression
    if options.codec == "none":
        return trained
    residual = None
    if options.error_feedback and wire.RESIDUAL_KEY in context.state:
        residual = record_to_arrays(context.state[wire.RESIDUAL_KEY])
    encoded, residual = compress_update(start, trained, options.codec, residual, options.block_size)
    if options.error_feedback:
        context.state[wire.RESIDUAL_KEY] = arrays_to_record(residual)
    return encoded


client_app = ClientApp(mods=[dp_clipping_mod])


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    """Local GRPO round. Replies with θ_k and aggregate statistics only."""
    config = node_config_from_context(context)
    learner = shared_learner(context)
    data = node_data(context)
    round_config = msg.content[wire.CONFIG]
    start = record_to_arrays(msg.content[wire.ARRAYS])
    local_only = bool(round_config.get(wire.LOCAL_ONLY, False))
    if local_only and wire.LOCAL_ADAPTER_KEY in context.state:
        start = record_to_arrays(context.state[wire.LOCAL_ADAPTER_KEY])  # local-only ignores the global model
    server_round = int(round_config.get(wire.SERVER_ROUND, 0))
    keep_optimizer = config.federation.keep_optimizer_state
    arrays, metrics = local_round(
        learner,
        start,
        data,
        local_steps=int(round_config.get(wire.LOCAL_STEPS, config.federation.local_steps)),
        prompts_per_step=config.training.prompts_per_step,
        seed=round_seed(config.training.seed, data.client_id, server_round),
        proximal_mu=float(round_config.get(wire.PROXIMAL_MU, 0.0)),
        optimizer_state=record_to_arrays(context.state[wire.OPTIMIZER_KEY]) if keep_optimizer and wire.OPTIMIZER_KEY in context.state else None,
        measure_in_round=config.federation.method == "fgrpo" and config.federation.fgrpo.gain == "in_round",
    )
    if keep_optimizer:  # the node's own state: it never leaves the client
        context.state[wire.OPTIMIZER_KEY] = arrays_to_record(learner.optimizer_state_arrays())
    arrays, metrics = simulate_attack(config, data.client_id, server_round, start, arrays, metrics)
    if local_only:
        context.state[wire.LOCAL_ADAPTER_KEY] = arrays_to_record(arrays)
        record = context.state[wire.LOCAL_ADAPTER_KEY]
    else:
        record = arrays_to_record(encode_upload(config, start, arrays, context))
    metrics.update({wire.NUM_EXAMPLES: len(data.train), wire.CLIENT_ID: data.client_id, wire.UNIT_WEIGHT: 1})
    return Message(RecordDict({wire.ARRAYS: record, wire.METRICS: MetricRecord(metrics)}), reply_to=msg)


@client_app.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    """Greedy accuracy of the received (or, local-only, the client's own) weights on the client's held-out split
    (its test split, or its validation split when `evaluation.split = "validation"`)."""
    config = node_config_from_context(context)
    learner = shared_learner(context)
    data = node_data(context)
    arrays = record_to_arrays(msg.content[wire.ARRAYS])
    local_only = bool(msg.content[wire.CONFIG].get(wire.LOCAL_ONLY, False))
    if local_only and wire.LOCAL_ADAPTER_KEY in context.state:
        arrays = record_to_arrays(context.state[wire.LOCAL_ADAPTER_KEY])
    heldout = data.heldout(config.evaluation.split)
    metrics: dict[str, float | int] = {wire.NUM_EXAMPLES: len(heldout), wire.CLIENT_ID: data.client_id}
    if heldout:
        result = evaluate_arrays(learner, arrays, heldout, config.grpo.max_completion_length)
        metrics[wire.ACC_HELDOUT] = result[f"eval/{wire.ACC_HELDOUT}"]
        for ex_family in sorted({ex.family for ex in heldout}):
            metrics[f"{wire.FAMILY_ACC}{ex_family}"] = result[f"eval/acc/{ex_family}"]
            metrics[f"{wire.FAMILY_N}{ex_family}"] = sum(ex.family == ex_family for ex in heldout)
    everyone = global_heldout(context, config.evaluation.split) if local_only else None
    if everyone:  # local-only reported twice: on its own split (above) and on every owner's held-out data
        result = evaluate_arrays(learner, arrays, everyone, config.grpo.max_completion_length)
        metrics[wire.ACC_GLOBAL_SET] = result[f"eval/{wire.ACC_HELDOUT}"]
    return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=msg)


@client_app.query()
def client_init(msg: Message, context: Context) -> Message:
    """θ₀ and the checkpoint layout, for a server that holds no model (asked once, before round 0)."""
    model = shared_learner(context).model
    layout = ConfigRecord({wire.CHECKPOINT_LAYOUT: export_layout_text(checkpoint_layout(model))})
    return Message(RecordDict({wire.ARRAYS: arrays_to_record(get_trainable_arrays(model)), wire.CONFIG: layout}), reply_to=msg)
