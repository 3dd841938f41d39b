"""The Flower ClientApp: a node's local GRPO rounds, held-out evaluation and θ₀, run unchanged in-process and on Flower.

The run config carries the whole resolved fgrpo config as TOML text
(`fgrpo-config`), so a SuperNode needs nothing from the server but the run;
each node's own data and reward code come from its node config
(`partition-id` / `num-partitions`, `data-path` or `data-config`; see
`fgrpo.data.node_spec`): files and modules the run config names are read only
where the node allows it, and so are the model folder and chat template file
it names (the node may give its own). What goes over the wire is
`fgrpo.federation.wire`'s contract; an error leaves the node only in its
value-free form (`private_errors_mod`), the full one stays in the node's log.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fgrpo.config import Config
from fgrpo.core.learner import GRPOLearner
from fgrpo.core.model import checkpoint_layout, get_trainable_arrays
from fgrpo.core.pipeline import build_learner
from fgrpo.core.threads import apply_threads, auto_threads
from fgrpo.federation import wire
from fgrpo.federation.client import (
    ClientData,
    all_client_data,
    evaluate_arrays,
    local_round,
    owner_client_data,
    pooled_data,
    round_seed,
)
from fgrpo.federation.export import layout_to_text as export_layout_text
from fgrpo.federation.fedsa import personal_part, personalize, shared_part
from fgrpo.federation.hetlora import truncate, zero_beyond
from fgrpo.federation.wire import arrays_to_record, config_from_context, config_from_text, record_to_arrays
from fgrpo.registry import PERSONAL_METHODS

logger = logging.getLogger(__name__)


def node_config_from_context(context: Context) -> Config:
    """The run config as this node uses it (its own data and reward code, `data.node_spec`)."""
    return config_from_text(node_config_text(context))


@lru_cache(maxsize=64)
def _node_config_text(config_text: str, node_items: tuple) -> str:
    """The run config as this node uses it: its [tasks] with the node's own data and reward code.

    A node that takes entry k of the run's [[federation.clients]] keeps only
    that entry, as its [tasks]; the other owners' entries are dropped, so
    nothing downstream can read them.
    """
    from fgrpo.config import dump_config
    from fgrpo.data.node_spec import node_spec, node_tasks, run_owner

    config = config_from_text(config_text)
    node = dict(node_items)
    spec = node_spec(node)
    partition_id = int(node.get("partition-id", 0))
    owners = config.federation.clients
    if config.federation.method == "centralized":
        check_pooled_owners(owners, spec)  # one node pools every owner's data and rewards
        owners = []
    owner = run_owner(owners, spec, partition_id)
    tasks = node_tasks(config.tasks, spec, owner, partition_id)
    if tasks is config.tasks:  # unchanged text when nothing changed
        return config_text
    update = {"tasks": tasks}
    if owner is not None or (spec.owns_data and owners):
        update["federation"] = config.federation.model_copy(update={"clients": []})  # no other owner's entry
    return dump_config(config.model_copy(update=update))


def check_pooled_owners(owners: list, spec) -> None:
    """A centralized node reads every owner's files and imports every owner's reward code: only where it allows that."""
    from fgrpo.data.node_spec import ALLOW_SERVER_CODE, ALLOW_SERVER_DATA, owners_named
    from fgrpo.errors import ConfigError

    paths, code = owners_named(owners)
    if paths and not spec.allow_server_data:
        raise ConfigError(f"a centralized node pools the owners' files ({', '.join(paths[:3])}): it needs '{ALLOW_SERVER_DATA}=true'")
    if code and not spec.allow_server_code:
        raise ConfigError(f"a centralized node imports the owners' reward code ({', '.join(code[:3])}): it needs '{ALLOW_SERVER_CODE}=true'")


def node_config_text(context: Context) -> str:
    return _node_config_text(wire.config_text(context), tuple(sorted(context.node_config.items())))


@lru_cache(maxsize=8)
def learner_config_text(config_text: str) -> str:
    """The part of the run config the policy depends on: everything but data and rewards, which are each node's.

    In-process nodes with different owners therefore share one model; the
    base model (the tiny model's warm start on the run's families) is the
    run's on every node.
    """
    from fgrpo.config import TasksConfig, dump_config

    config = config_from_text(config_text)
    tasks = config.tasks.model_copy(update={"files": [], "sources": [], "rewards": TasksConfig().rewards})
    federation = config.federation.model_copy(update={"clients": []})
    return dump_config(config.model_copy(update={"tasks": tasks, "federation": federation}))


@lru_cache(maxsize=2)
def _shared_learner(config_text: str) -> GRPOLearner:
    """One policy per process: in-process clients share it and swap adapters in and out.

    Its first use is where this process takes its torch thread budget
    (`runtime.threads`; "auto": the OMP_NUM_THREADS that whoever started this
    process set, else every core that no other process keeps busy): a Flower ClientApp process, an in-process
    worker and a Ray actor all pass through here before they run torch.
    """
    config = config_from_text(config_text)
    apply_threads(auto_threads(1, config.runtime.threads))
    return build_learner(config, config.training.seed)


@lru_cache(maxsize=64)
def _node_reward(node_text: str, key: str):
    """This node's reward functions: its owner's (centralized: each pooled example is scored by its owner's).
    `key` is where they were configured, for error messages."""
    from fgrpo.core.pipeline import build_owner_rewards, build_reward

    config = config_from_text(node_text)
    if config.federation.clients:
        return build_owner_rewards(config)
    return build_reward(config.tasks, config.grpo.max_completion_length, key)


def node_rewards_key(context: Context) -> str:
    """Where this node's reward functions come from: its data-config, its [[federation.clients]] entry, or [tasks]."""
    from fgrpo.data.node_spec import DATA_CONFIG, node_spec, run_owner

    node = context.node_config
    spec = node_spec(node)
    if spec.data is not None and spec.data.rewards:
        return f"node config {DATA_CONFIG} '{node[DATA_CONFIG]}': rewards"
    config = config_from_text(wire.config_text(context))
    if config.federation.method != "centralized":
        found = run_owner(config.federation.clients, spec, int(node.get("partition-id", 0)))
        if found is not None and found[1].rewards:
            return f"federation.clients[{found[0]}].rewards"
    return "tasks.rewards"


@lru_cache(maxsize=64)
def _node_model_text(config_text: str, node_items: tuple) -> str:
    """The run config with the [model] this node loads (`data.node_spec.node_model`): its own model-source and
    chat-template, else the run's, whose paths it reads only with allow-server-data."""
    from fgrpo.config import dump_config
    from fgrpo.data.node_spec import node_model, node_spec

    config = config_from_text(config_text)
    model = node_model(config.model, node_spec(dict(node_items)))
    return config_text if model is config.model else dump_config(config.model_copy(update={"model": model}))


def node_learner(context: Context) -> GRPOLearner:
    """The process's policy for this node's [model]; a model that fails to load says only that it failed.

    Whatever the loader says (a folder without config.json, a permission
    error, a hub error) stays in the node's log: from the server, a path that
    is missing, unreadable or not a model looks like one the node refuses.
    """
    from fgrpo.data.node_spec import MODEL_SOURCE, unusable_source
    from fgrpo.errors import FgrpoError, ModelError

    node_items = tuple(sorted(context.node_config.items()))
    run_text = wire.config_text(context)
    text = learner_config_text(_node_model_text(run_text, node_items))
    try:
        return _shared_learner(text)
    except Exception as error:  # noqa: BLE001 - only fgrpo's value-free errors pass as they are
        if isinstance(error, FgrpoError) and not isinstance(error, ModelError):
            raise
        own = bool(dict(node_items).get(MODEL_SOURCE))
        public = (
            f"node config {MODEL_SOURCE}: the model cannot be loaded (the details stay in the node's log)"
            if own
            else unusable_source(config_from_text(run_text).model.source)
        )
        message = str(error) if isinstance(error, ModelError) else f"{type(error).__name__}: {error}"
        raise ModelError(message, public=public) from error


def warm_up_learner(config_text: str) -> None:
    """Build this process's policy for a run config now (a worker's start-up), before any node's call needs it."""
    _shared_learner(learner_config_text(config_text))


def shared_learner(context: Context) -> GRPOLearner:
    """The process's policy, scoring with this node's reward functions (clients run one at a time in a process)."""
    learner = node_learner(context)
    learner.reward = _node_reward(node_config_text(context), node_rewards_key(context))
    return learner


@lru_cache(maxsize=1024)
def _client_data(
    config_text: str, partition_id: int, num_partitions: int, data_path: str, owner: tuple[str, int | None] | None = None
) -> ClientData:
    """This node's examples. `owner` = (name, size) when the node's [tasks] are one owner's spec (its data-config,
    or its [[federation.clients]] entry): then every example of those [tasks] is this client's."""
    config = config_from_text(config_text)
    if owner is not None and not data_path:
        return owner_client_data(config.tasks, partition_id, *owner)
    if data_path:
        if not Path(data_path).is_file():
            from fgrpo.errors import DataError

            raise DataError(f"node config data-path '{data_path}': no such file on this SuperNode")
        return file_client_data(config, partition_id, data_path)
    if config.federation.method == "centralized":
        return pooled_data(config)
    if not 0 <= partition_id < num_partitions:
        from fgrpo.errors import ConfigError

        raise ConfigError(
            f"node config partition-id = {partition_id} must be in 0..{num_partitions - 1} (num-partitions)",
            public=f"node config partition-id must be in 0..{num_partitions - 1} (num-partitions)",
        )
    return _partitioned(config_text, num_partitions)[partition_id]


def node_owner(context: Context) -> tuple[str, int | None] | None:
    """(name, size) of the owner spec this node's data comes from, or None when it holds a share of the run's pool."""
    from fgrpo.data.node_spec import node_spec, owner_name, run_owner

    node = context.node_config
    spec = node_spec(node)
    partition_id = int(node.get("partition-id", 0))
    if spec.data is not None and spec.data.has_data():
        return owner_name(spec.data, partition_id), spec.data.size
    config = config_from_text(wire.config_text(context))
    owners = config.federation.clients if config.federation.method != "centralized" else []
    found = run_owner(owners, spec, partition_id)
    return None if found is None else (owner_name(found[1], found[0]), found[1].size)


def node_lora_rank(context: Context) -> int:
    """The LoRA rank this node trains: its data-config's or its [[federation.clients]] entry's lora_rank, else the
    run's model.lora.rank (centralized pools everyone at the run's rank). Read from the run config: the node's
    own config keeps no [[federation.clients]] entry."""
    from fgrpo.data.node_spec import node_spec, run_owner

    config = config_from_text(wire.config_text(context))
    spec = node_spec(context.node_config)
    if spec.data is not None and spec.data.lora_rank is not None:
        return spec.data.lora_rank
    if config.federation.method != "centralized":
        found = run_owner(config.federation.clients, spec, int(context.node_config.get("partition-id", 0)))
        if found is not None and found[1].lora_rank is not None:
            return found[1].lora_rank
    return config.model.lora.rank


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

    Only a simulated node can rebuild them (from the shared pool definition, or
    every [[federation.clients]] entry when it may read what the run names); a
    node with its own data cannot see other owners' data, so it gets None.
    """
    from fgrpo.data.node_spec import node_spec

    node = context.node_config
    config_text = wire.config_text(context)
    config = config_from_text(config_text)
    spec = node_spec(node)
    if spec.owns_data or config.federation.method == "centralized":
        return None
    if config.federation.clients:
        if not spec.allow_server_data:
            return None
        shares = all_client_data(config, len(config.federation.clients))
    else:
        shares = _partitioned(config_text, int(node.get("num-partitions", 1)))
    return [ex for share in shares for ex in share.heldout(split)]


def node_data(context: Context) -> ClientData:
    """This node's examples, from the data it owns (`data.node_spec`); errors that leave it quote no data."""
    from fgrpo.data.node_spec import public_message
    from fgrpo.errors import DataError, FgrpoError

    node = context.node_config
    try:
        return _client_data(
            node_config_text(context),
            int(node.get("partition-id", 0)),
            int(node.get("num-partitions", 1)),
            str(node.get("data-path", "")),
            node_owner(context),
        )
    except DataError as error:
        raise DataError(public_message(error)) from None
    except FgrpoError:
        raise  # names keys and files, never data
    except Exception as error:  # noqa: BLE001 - whatever else the reader raised, only its type travels
        raise DataError(public_message(error)) from None


_LOGGED: set[str] = set()


def private_errors_mod(msg: Message, context: Context, call_next) -> Message:
    """Errors leave the node only in their value-free form (`data.node_spec.public_message`).

    Flower sends a ClientApp's exception text to the server. A reward
    function's own message may quote a completion or an answer, a loader's
    may quote a file, a node-config error its value: the server gets the
    file, line, key and kind of problem, and the node's log keeps the full
    message (the first one behind each public text, not one per round and
    client).
    """
    from fgrpo.data.node_spec import public_message
    from fgrpo.errors import as_public

    try:
        return call_next(msg, context)
    except Exception as error:  # noqa: BLE001 - re-raised, in its public form
        public = public_message(error)
        full = f"{type(error).__name__}: {error}"
        if public != str(error) and public not in _LOGGED and len(_LOGGED) < 1024:
            _LOGGED.add(public)
            logger.warning("this node's ClientApp failed (the server is told only: %s): %s", public, full)
        raise as_public(error, public) from None


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


def personal_arrays(context: Context) -> dict[str, np.ndarray] | None:
    """A fedsa node's own LoRA B matrices (None before its first round: the received, peft-zero B)."""
    return record_to_arrays(context.state[wire.PERSONAL_KEY]) if wire.PERSONAL_KEY in context.state else None


client_app = ClientApp(mods=[private_errors_mod, dp_clipping_mod])  # the first mod is the outermost


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    """Local GRPO round. Replies with θ_k and aggregate statistics only."""
    config = node_config_from_context(context)
    learner = shared_learner(context)
    data = node_data(context)
    round_config = msg.content[wire.CONFIG]
    rank = node_lora_rank(context)
    start = zero_beyond(record_to_arrays(msg.content[wire.ARRAYS]), rank)  # a rank-r adapter in the rank-R model
    local_only = bool(round_config.get(wire.LOCAL_ONLY, False))
    if local_only and wire.LOCAL_ADAPTER_KEY in context.state:
        start = record_to_arrays(context.state[wire.LOCAL_ADAPTER_KEY])  # local-only ignores the global model
    personal = config.federation.method in PERSONAL_METHODS
    if personal:  # fedsa: the global A with this owner's own B
        start = personalize(start, personal_arrays(context))
    server_round = int(round_config.get(wire.SERVER_ROUND, 0))
    keep_optimizer = config.federation.keep_optimizer_state
    arrays, metrics = local_round(
        learner,
        start,
        data,
        local_steps=int(round_config.get(wire.LOCAL_STEPS, config.federation.local_steps)),
        prompts_per_step=max(1, int(round_config.get(wire.PROMPTS_PER_STEP, config.training.prompts_per_step))),
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
        record = arrays_to_record(truncate(arrays, rank))
    elif personal:  # fedsa: B stays in the node's state, only A travels
        context.state[wire.PERSONAL_KEY] = arrays_to_record(personal_part(arrays))
        record = arrays_to_record(shared_part(arrays))
    elif config.federation.compression.codec != "none":  # full rank only (the config and the server refuse mixed)
        record = arrays_to_record(encode_upload(config, start, arrays, context))
    else:
        record = arrays_to_record(truncate(arrays, rank))  # components r..R are zero: only the first r travel
    metrics.update(
        {wire.NUM_EXAMPLES: len(data.train), wire.CLIENT_ID: data.client_id, wire.UNIT_WEIGHT: 1, wire.LORA_RANK: rank}
    )
    return Message(RecordDict({wire.ARRAYS: record, wire.METRICS: MetricRecord(metrics)}), reply_to=msg)


@client_app.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    """Greedy accuracy of the received (or, local-only, the client's own) weights on the client's held-out split
    (its test split, or its validation split when `evaluation.split = "validation"`)."""
    config = node_config_from_context(context)
    learner = shared_learner(context)
    data = node_data(context)
    arrays = zero_beyond(record_to_arrays(msg.content[wire.ARRAYS]), node_lora_rank(context))  # what it can run
    local_only = bool(msg.content[wire.CONFIG].get(wire.LOCAL_ONLY, False))
    if local_only and wire.LOCAL_ADAPTER_KEY in context.state:
        arrays = record_to_arrays(context.state[wire.LOCAL_ADAPTER_KEY])
    if config.federation.method in PERSONAL_METHODS:  # fedsa: this owner's model, the global A with its own B
        arrays = personalize(arrays, personal_arrays(context))
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


def shared_layout(layout: dict, context: Context) -> dict:
    """The checkpoint layout as the server may see it: peft records the base model's path in adapter_config.json,
    and a node's own model-source is its own, so the run's model.source stands there instead."""
    import json

    from fgrpo.data.node_spec import MODEL_SOURCE

    text = layout["files"].get("adapter_config.json")
    if text is None or not context.node_config.get(MODEL_SOURCE):
        return layout
    adapter_config = json.loads(text)
    adapter_config["base_model_name_or_path"] = config_from_text(wire.config_text(context)).model.source
    return {**layout, "files": {**layout["files"], "adapter_config.json": json.dumps(adapter_config, indent=2)}}


@client_app.query()
def client_init(msg: Message, context: Context) -> Message:
    """θ₀ and the checkpoint layout, for a server that holds no model (asked once, before round 0)."""
    model = shared_learner(context).model
    layout = ConfigRecord({wire.CHECKPOINT_LAYOUT: export_layout_text(shared_layout(checkpoint_layout(model), context))})
    return Message(RecordDict({wire.ARRAYS: arrays_to_record(get_trainable_arrays(model)), wire.CONFIG: layout}), reply_to=msg)
