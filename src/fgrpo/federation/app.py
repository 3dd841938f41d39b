"""The Flower App: one ClientApp and one ServerApp, run unchanged in-process and on Flower.

The run config carries the whole resolved fgrpo config as TOML text
(`fgrpo-config`), so a SuperNode needs nothing from the server but the run;
each node's own data and reward code come from its node config
(`partition-id` / `num-partitions`, `data-path` or `data-config`; see
`fgrpo.data.node_spec`): files and modules the run config names are read only
where the node allows it.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fgrpo.federation.client import ClientData, all_client_data, evaluate_arrays, local_round, pooled_data, round_seed
from fgrpo.config import Config
from fgrpo.core.learner import GRPOLearner
from fgrpo.core.pipeline import build_learner

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_KEY = "fgrpo-config"
RUN_DIR_KEY = "run-dir"
RESUME_KEY = "resume"
LOCAL_ADAPTER_KEY = "local-adapter"
RESIDUAL_KEY = "compression-residual"


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


@lru_cache(maxsize=4)
def _config_from_text(text: str) -> Config:
    from fgrpo.config import config_from_dict, load_config

    if not text.strip():  # `flwr run .` with the pyproject defaults: the packaged quickstart scenario
        from importlib.resources import files

        return load_config(Path(str(files("fgrpo") / "scenarios" / "quickstart.toml")))
    return config_from_dict(tomllib.loads(text), source=f"run config '{CONFIG_KEY}'")


def config_from_context(context: Context) -> Config:
    """The run config as the server sent it (the ServerApp's view)."""
    return _config_from_text(str(context.run_config[CONFIG_KEY]))


def node_config_from_context(context: Context) -> Config:
    """The run config as this node uses it (its own data and reward code, `data.node_spec`)."""
    return _config_from_text(node_config_text(context))


@lru_cache(maxsize=64)
def _node_config_text(config_text: str, node_items: tuple) -> str:
    """The run config as this node uses it: its [tasks] with the node's own data and reward code."""
    from fgrpo.config import dump_config
    from fgrpo.data.node_spec import node_spec, node_tasks

    config = _config_from_text(config_text)
    tasks = node_tasks(config.tasks, node_spec(dict(node_items)))
    # Unchanged text when nothing changed, so in-process nodes share one learner with the server.
    return config_text if tasks is config.tasks else dump_config(config.model_copy(update={"tasks": tasks}))


def node_config_text(context: Context) -> str:
    return _node_config_text(str(context.run_config[CONFIG_KEY]), tuple(sorted(context.node_config.items())))


@lru_cache(maxsize=2)
def _shared_learner(config_text: str) -> GRPOLearner:
    """One policy per process: in-process clients share it and swap adapters in and out."""
    config = _config_from_text(config_text)
    return build_learner(config, config.training.seed)


def shared_learner(context: Context) -> GRPOLearner:
    return _shared_learner(node_config_text(context))


@lru_cache(maxsize=1024)
def _client_data(config_text: str, partition_id: int, num_partitions: int, data_path: str, own_data: bool = False) -> ClientData:
    config = _config_from_text(config_text)
    if own_data and not data_path:  # the node's data-config: all of its examples are this client's
        from fgrpo.core.pipeline import build_task_pool

        return ClientData(partition_id, *build_task_pool(config.tasks.model_copy(update={"families": []})))
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
    return all_client_data(_config_from_text(config_text), num_partitions)


def file_client_data(config: Config, partition_id: int, data_path: str) -> ClientData:
    """A SuperNode's own JSONL file (deployment): its prompts never exist anywhere else."""
    import random

    from fgrpo.data.tasks import load_jsonl

    examples = load_jsonl(data_path, family=f"client{partition_id}")
    random.Random(config.tasks.seed).shuffle(examples)
    num_test = max(1, len(examples) // 5) if len(examples) > 1 else 0
    return ClientData(partition_id, examples[num_test:], examples[:num_test])


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

    from fgrpo.federation.defense import scale_update, update_norm

    reply = call_next(msg, context)
    config = msg.content.config_records.get("config") if msg.has_content() else None
    if msg.metadata.message_type != MessageType.TRAIN or config is None or KEY_CLIPPING_NORM not in config:
        return reply
    if reply.has_error():
        return reply
    start, sent = record_to_arrays(msg.content["arrays"]), record_to_arrays(reply.content["arrays"])
    norm, clip = update_norm(start, sent), float(config[KEY_CLIPPING_NORM])
    if norm > clip:
        reply.content["arrays"] = arrays_to_record(scale_update(start, sent, clip / norm))
    return reply


def simulate_attack(
    config: Config, client_id: int, server_round: int, start: dict[str, np.ndarray], arrays: dict, metrics: dict
) -> tuple[dict[str, np.ndarray], dict]:
    """A malicious client (federation.attack): lie about the reward, scale the update. Honest clients pass through."""
    attack = config.federation.attack
    if client_id not in attack.clients:
        return arrays, metrics
    if attack.update_scale != 1.0:
        arrays = {k: start[k] + attack.update_scale * (v - start[k]) for k, v in arrays.items()}
    if attack.reward_growth is not None:
        metrics = {**metrics, "reward-mean": float(attack.reward_growth ** max(server_round, 1))}
    return arrays, metrics


def encode_upload(config: Config, start: dict[str, np.ndarray], trained: dict[str, np.ndarray], context: Context) -> dict:
    """What the client sends: θ_k as is, or its compressed delta (the node's context keeps the error-feedback residual)."""
    from fgrpo.federation.compression import compress_update

    options = config.federation.compression
    if options.codec == "none":
        return trained
    residual = None
    if options.error_feedback and RESIDUAL_KEY in context.state:
        residual = record_to_arrays(context.state[RESIDUAL_KEY])
    encoded, residual = compress_update(start, trained, options.codec, residual, options.block_size)
    if options.error_feedback:
        context.state[RESIDUAL_KEY] = arrays_to_record(residual)
    return encoded


client_app = ClientApp(mods=[dp_clipping_mod])


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    """Local GRPO round. Replies with θ_k and aggregate statistics only."""
    config = node_config_from_context(context)
    learner = shared_learner(context)
    data = node_data(context)
    round_config = msg.content["config"]
    start = record_to_arrays(msg.content["arrays"])
    local_only = bool(round_config.get("local-only", False))
    if local_only and LOCAL_ADAPTER_KEY in context.state:
        start = record_to_arrays(context.state[LOCAL_ADAPTER_KEY])  # local-only ignores the global model
    server_round = int(round_config.get("server-round", 0))
    arrays, metrics = local_round(
        learner,
        start,
        data,
        local_steps=int(round_config.get("local-steps", config.federation.local_steps)),
        prompts_per_step=config.training.prompts_per_step,
        seed=round_seed(config.training.seed, data.client_id, server_round),
        proximal_mu=float(round_config.get("proximal-mu", 0.0)),
    )
    arrays, metrics = simulate_attack(config, data.client_id, server_round, start, arrays, metrics)
    if local_only:
        context.state[LOCAL_ADAPTER_KEY] = arrays_to_record(arrays)
        record = context.state[LOCAL_ADAPTER_KEY]
    else:
        record = arrays_to_record(encode_upload(config, start, arrays, context))
    metrics.update({"num-examples": len(data.train), "client-id": data.client_id, "unit-weight": 1})
    return Message(RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}), reply_to=msg)


@client_app.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    """Greedy accuracy of the received (or, local-only, the client's own) weights on the client's held-out split."""
    config = node_config_from_context(context)
    learner = shared_learner(context)
    data = node_data(context)
    arrays = record_to_arrays(msg.content["arrays"])
    if bool(msg.content["config"].get("local-only", False)) and LOCAL_ADAPTER_KEY in context.state:
        arrays = record_to_arrays(context.state[LOCAL_ADAPTER_KEY])
    metrics: dict[str, float | int] = {"num-examples": len(data.test), "client-id": data.client_id}
    if data.test:
        result = evaluate_arrays(learner, arrays, data.test, config.grpo.max_completion_length)
        metrics["acc-heldout"] = result["eval/acc_heldout"]
        for ex_family in sorted({ex.family for ex in data.test}):
            metrics[f"acc/{ex_family}"] = result[f"eval/acc/{ex_family}"]
            metrics[f"n/{ex_family}"] = sum(ex.family == ex_family for ex in data.test)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """Flower deployment entry point: the same federation loop as the in-process runtime."""
    from fgrpo.deploy.flower import wait_for_nodes
    from fgrpo.federation.server import run_federation

    config = config_from_context(context)
    run_dir = Path(str(context.run_config.get(RUN_DIR_KEY, "")) or config.output.dir)
    wait_for_nodes(grid, 1 if config.federation.method == "centralized" else config.federation.num_clients)
    # `flwr run ... --run-config 'resume=true'` continues a crashed deployment run from its checkpoint.
    run_federation(grid, config, run_dir, progress=False, resume=bool(context.run_config.get(RESUME_KEY, False)))
