"""Toy apps and functions that worker processes import by reference (spawned workers cannot run a test's closures).

Importable as `worker_apps`: pytest puts this folder on sys.path, and spawned
workers get the parent's sys.path.
"""

from __future__ import annotations

import os

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fgrpo.federation import wire

DIE_KEY = "die-partition"  # run config: the partition whose worker process exits in train (-1: none)
SLEEP_KEY = "sleep-partition"  # run config: the partition whose train call sleeps for an hour (-1: none)


def square_or_die(value: int) -> tuple[int, int]:
    """value² and the worker's pid; a negative value kills the worker process."""
    if value < 0:
        os._exit(3)
    return value * value, os.getpid()


def square_or_sleep(value: int) -> tuple[int, int]:
    """value² and the worker's pid; a negative value sleeps for an hour (a call stuck in user code)."""
    import time

    if value < 0:
        time.sleep(3600)
    return value * value, os.getpid()


def thread_report(_: object) -> tuple[int, str | None]:
    """What a worker runs with: torch's intra-op threads and the OpenMP budget in its environment."""
    import torch

    return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")


app = ClientApp()
dying_app = ClientApp()  # the same client, except that partition 1's process exits in train
stuck_app = ClientApp()  # the same client, except that partition 1's train call sleeps for an hour


def _calls(context: Context) -> int:
    if "calls" not in context.state:
        context.state["calls"] = MetricRecord({"train": 0})
    context.state["calls"]["train"] += 1
    return int(context.state["calls"]["train"])


@stuck_app.query()
@dying_app.query()
@app.query()
def init(msg: Message, context: Context) -> Message:
    """θ₀ = zeros and a one-tensor layout, for the server's init query."""
    from flwr.app import ConfigRecord

    from fgrpo.federation.export import layout_to_text

    layout = layout_to_text({"files": {"adapter_config.json": "{}"}, "weights_file": "adapter_model.safetensors",
                             "names": {"a": "layer.a.weight"}})
    content = RecordDict({wire.ARRAYS: wire.arrays_to_record({"a": np.zeros(3, np.float32)}),
                          wire.CONFIG: ConfigRecord({wire.CHECKPOINT_LAYOUT: layout})})
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """θ_k = θ + (pid + 1), n_k = 10·(pid + 1); the partition named by the run config's die-partition exits."""
    return _train(msg, context, int(context.run_config.get(DIE_KEY, -1)))


@dying_app.train()
def train_or_die(msg: Message, context: Context) -> Message:
    return _train(msg, context, 1)


@stuck_app.train()
def train_or_hang(msg: Message, context: Context) -> Message:
    if int(context.node_config["partition-id"]) == 1:
        import time

        time.sleep(3600)
    return _train(msg, context, -1)


def _train(msg: Message, context: Context, die_partition: int) -> Message:
    pid = int(context.node_config["partition-id"])
    calls = _calls(context)
    if pid == die_partition:
        os._exit(3)
    if pid == int(context.run_config.get(SLEEP_KEY, -1)):
        import time

        time.sleep(3600)
    arrays = {k: Array(v.numpy() + (pid + 1)) for k, v in msg.content[wire.ARRAYS].items()}
    metrics = {wire.CLIENT_ID: pid, wire.NUM_EXAMPLES: 10 * (pid + 1), wire.REWARD_MEAN: 0.5 * calls,
               wire.REWARD_STD: 0.1, wire.ACCURACY: 0.5, wire.TRAIN_TIME: 0.0, wire.UNIT_WEIGHT: 1,
               # a float: a varint int would change the reply's byte count with the pid's magnitude
               "worker-pid": float(os.getpid())}
    return Message(RecordDict({wire.ARRAYS: ArrayRecord(arrays), wire.METRICS: MetricRecord(metrics)}), reply_to=msg)


@stuck_app.evaluate()
@dying_app.evaluate()
@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    metrics = {wire.CLIENT_ID: pid, wire.NUM_EXAMPLES: 4, wire.ACC_HELDOUT: 0.25 * (pid + 1)}
    metrics["run-config-keys"] = len(context.run_config)
    metrics["server-data-allowed"] = int(bool(context.node_config.get("allow-server-data", False)))
    return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=msg)


LOAD_LOG_ENV = "FGRPO_TEST_LOAD_LOG"  # a file: one line per model load and per message, with the process id
counting_app = ClientApp()  # fgrpo's real ClientApp, counting its model loads (`build_learner`) and messages


def _log_line(text: str) -> None:
    with open(os.environ[LOAD_LOG_ENV], "a") as log:
        log.write(f"{text} {os.getpid()}\n")


@counting_app.query()
@counting_app.train()
@counting_app.evaluate()
def counted(msg: Message, context: Context) -> Message:
    from fgrpo.federation import clientapp

    if not getattr(clientapp.build_learner, "counted", False):  # once per process: count each model load in it
        build = clientapp.build_learner

        def counted_build(*args, **kwargs):
            _log_line("load")
            return build(*args, **kwargs)

        counted_build.counted = True
        clientapp.build_learner = counted_build
    _log_line(f"message-{msg.metadata.message_type}")
    return clientapp.client_app(msg, context)
