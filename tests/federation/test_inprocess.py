"""Tests for fgrpo.federation.inprocess: Flower's own strategy loop against a real toy ClientApp, in one process."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp.strategy import FedAvg

from fgrpo.errors import ConfigError, FederationError
from fgrpo.federation.inprocess import DOWN, UP, InProcessGrid, wire_round_trip
from fgrpo.federation.strategies import FGRPO

SHAPE = (64, 32)
INITIAL = ArrayRecord({"lora_A": Array(np.zeros(SHAPE, dtype=np.float32)), "lora_B": Array(np.ones(4, dtype=np.float32))})


def make_app(fail_partition: int | None = None) -> ClientApp:
    """Toy numpy ClientApp: θ_k = θ + (partition-id + 1), n_k = 10·(pid + 1), per the message contract."""
    app = ClientApp()

    def count(context: Context, key: str) -> int:
        if "calls" not in context.state:
            context.state["calls"] = MetricRecord({"train": 0, "evaluate": 0})
        context.state["calls"][key] += 1
        return int(context.state["calls"][key])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        calls = count(context, "train")  # before raising: a failed call must not be kept
        if pid == fail_partition:
            raise RuntimeError(f"partition {pid} ran out of prompts")
        arrays = {k: Array(v.numpy() + (pid + 1)) for k, v in msg.content["arrays"].items()}
        metrics = MetricRecord(
            {
                "num-examples": 10 * (pid + 1),
                "client-id": pid,
                "reward-mean": float((pid + 1) * calls),
                "reward-std": 0.5,
                "accuracy": 0.1 * calls,
                "server-round": int(msg.content["config"]["server-round"]),
                "run-flag": float(context.run_config["flag"]),
            }
        )
        return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        count(context, "evaluate")
        mean = float(np.mean(msg.content["arrays"]["lora_A"].numpy()))
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 5, "param-mean": mean})}), reply_to=msg)

    return app


def make_grid(app: ClientApp, n: int = 3, **kwargs) -> InProcessGrid:
    return InProcessGrid(app, [{"partition-id": i, "data-path": f"/data/{i}"} for i in range(n)], run_config={"flag": 1}, **kwargs)


def by_partition(grid: InProcessGrid) -> dict[int, Context]:
    return {int(c.node_config["partition-id"]): c for c in grid.contexts.values()}


def test_flower_fedavg_runs_three_rounds():
    grid = make_grid(make_app())
    result = FedAvg(min_available_nodes=3).start(grid, INITIAL, num_rounds=3)
    # each round adds Σ n_k (pid+1) / Σ n = (10·1 + 20·2 + 30·3) / 60 = 7/3
    np.testing.assert_allclose(result.arrays["lora_A"].numpy(), np.full(SHAPE, 7.0), rtol=1e-6)
    np.testing.assert_allclose(result.arrays["lora_B"].numpy(), np.full(4, 8.0), rtol=1e-6)
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
    assert result.train_metrics_clientapp[2]["run-flag"] == pytest.approx(1.0)  # run_config reached the nodes
    assert result.evaluate_metrics_clientapp[3]["param-mean"] == pytest.approx(7.0, rel=1e-6)


def test_node_configs_reach_contexts_and_state_persists():
    grid = make_grid(make_app())
    FedAvg(min_available_nodes=3).start(grid, INITIAL, num_rounds=3)
    contexts = by_partition(grid)
    assert sorted(contexts) == [0, 1, 2]
    assert contexts[1].node_config == {"partition-id": 1, "data-path": "/data/1"}
    for context in contexts.values():
        assert dict(context.state["calls"]) == {"train": 3, "evaluate": 3}
    node_ids = list(grid.get_node_ids())
    assert len(set(node_ids)) == 3 and SUPERLINK_NODE_ID not in node_ids
    assert sorted(node_ids) != [0, 1, 2]  # node ids are not partition ids
    assert all(c.node_id == nid for nid, c in grid.contexts.items())


def test_fgrpo_runs_on_the_grid():
    grid = make_grid(make_app())
    strategy = FGRPO(temperature=1.0, min_available_nodes=3)
    result = strategy.start(grid, INITIAL, num_rounds=3)
    last = strategy.last_aggregation
    assert last.server_round == 3 and last.client_ids == [0, 1, 2]
    # R_k = (pid+1)·round; at round 3 the EMA baseline (β = .5) of [1, 2]·(pid+1) is
    # 1.5·(pid+1), so g = (3 − 1.5)/1.5 = 1 for all and the weights are the size prior
    np.testing.assert_allclose(last.gains, [1.0, 1.0, 1.0])
    np.testing.assert_allclose(last.weights, [1 / 6, 2 / 6, 3 / 6])
    assert list(result.train_metrics_clientapp[3]["agg-client-ids"]) == [0, 1, 2]
    assert sorted(strategy.clients) == [0, 1, 2]


def test_a_failing_client_yields_an_error_reply_and_the_round_goes_on():
    grid = make_grid(make_app(fail_partition=1))
    result = FedAvg(min_available_nodes=3).start(grid, INITIAL, num_rounds=2)
    # only partitions 0 and 2: (10·1 + 30·3) / 40 = 2.5 per round
    np.testing.assert_allclose(result.arrays["lora_A"].numpy(), np.full(SHAPE, 5.0), rtol=1e-6)
    # the failing node's state changes are dropped, as on a SuperNode
    assert by_partition(grid)[1].state["calls"]["train"] == 0
    assert by_partition(grid)[0].state["calls"]["train"] == 2

    bad_node = by_partition(grid)[1].node_id
    msg = Message(RecordDict({"arrays": INITIAL, "config": ConfigRecord({"server-round": 9})}), bad_node, "train")
    (reply,) = grid.send_and_receive([msg])
    assert reply.has_error()
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "partition 1 ran out of prompts" in reply.error.reason


def test_reply_metadata_looks_like_a_real_reply():
    seen = []
    grid = make_grid(make_app(), on_message=lambda node_id, reply: seen.append((node_id, reply)))
    nodes = list(grid.get_node_ids())
    content = RecordDict({"arrays": INITIAL, "config": ConfigRecord({"server-round": 4})})
    messages = [Message(content, node, "train") for node in nodes]
    ids = list(grid.push_messages(messages))
    assert len(set(ids)) == 3 and all(ids)
    replies = list(grid.pull_messages(ids))
    assert list(grid.pull_messages(ids)) == []  # each reply is handed out once
    for msg, reply in zip(messages, replies):
        assert reply.metadata.reply_to_message_id == msg.metadata.message_id
        assert reply.metadata.src_node_id == msg.metadata.dst_node_id
        assert reply.metadata.dst_node_id == SUPERLINK_NODE_ID == msg.metadata.src_node_id
        assert reply.metadata.message_type == "train"
        assert reply.metadata.run_id == grid.run.run_id
        assert reply.metadata.message_id and reply.metadata.message_id not in ids
        assert reply.content["metrics"]["server-round"] == 4
    assert [node for node, _ in seen] == nodes
    # the ClientApp got a copy: the server's content is untouched
    np.testing.assert_array_equal(content["arrays"]["lora_A"].numpy(), np.zeros(SHAPE))


def test_traffic_is_logged_per_round_node_and_direction():
    grid = make_grid(make_app())
    FedAvg(min_available_nodes=3).start(grid, INITIAL, num_rounds=2)
    train = [e for e in grid.traffic_log if e.message_type == "train"]
    assert len(train) == 2 * 3 * 2  # rounds × nodes × directions
    payload = sum(a.numpy().nbytes for a in INITIAL.values())
    for entry in train:
        assert entry.server_round in (1, 2) and entry.node_id in grid.contexts
        assert entry.direction in (DOWN, UP)
        assert payload < entry.num_bytes < payload + 4096  # arrays plus a little metadata
    assert grid.bytes_total(DOWN, server_round=1) > 3 * payload
    assert grid.bytes_total(UP) == sum(e.num_bytes for e in grid.traffic_log if e.direction == UP)
    evaluate_up = [e for e in grid.traffic_log if e.message_type == "evaluate" and e.direction == UP]
    assert evaluate_up and all(e.num_bytes < payload for e in evaluate_up)  # metrics only


def test_wire_round_trip_keeps_content_and_id():
    grid = make_grid(make_app(), n=1)
    msg = Message(RecordDict({"arrays": INITIAL}), next(iter(grid.get_node_ids())), "train")
    msg.metadata.__dict__["_message_id"] = "abc"
    copy, num_bytes = wire_round_trip(msg)
    assert copy is not msg and copy.metadata.message_id == "abc"
    np.testing.assert_array_equal(copy.content["arrays"]["lora_B"].numpy(), np.ones(4))
    assert num_bytes > 64 * 32 * 4


def test_unknown_node_and_bad_pushes():
    grid = make_grid(make_app(), n=2)
    (reply,) = grid.send_and_receive([Message(RecordDict(), 12345, "train")])
    assert reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE
    with pytest.raises(FederationError):
        InProcessGrid(make_app(), [])
    with pytest.raises(FederationError, match="reply"):
        grid.push_messages([reply])


def test_node_config_values_must_be_flower_scalars():
    with pytest.raises(ConfigError, match="bool, int, float or str"):
        InProcessGrid(make_app(), [{"partition-id": 0, "paths": ["a", "b"]}])


def test_an_error_inside_every_client_reaches_the_user_once(tmp_path, caplog):
    import logging

    from conftest import small_config_dict

    from fgrpo.config import config_from_dict, dump_config
    from fgrpo.deploy.runtime import node_configs
    from fgrpo.federation.wire import CONFIG_KEY
    from fgrpo.federation.server import run_federation

    config = config_from_dict({**small_config_dict(tmp_path), "federation": {"num_clients": 6, "min_train_clients": 1}})
    app = ClientApp()

    @app.query()  # the init query: where a real node first reads its data and loads its model
    def broken(msg: Message, context: Context) -> Message:
        raise ValueError("data.jsonl line 3: invalid JSON")

    grid = InProcessGrid(app, node_configs(config), run_config={CONFIG_KEY: dump_config(config)})
    with caplog.at_level(logging.INFO), pytest.raises(FederationError) as info:
        run_federation(grid, config, tmp_path / "run", progress=False)
    assert str(info.value).count("data.jsonl line 3") == 1 and "6 nodes" in str(info.value)
    assert "ValueError: data.jsonl line 3: invalid JSON" in str(info.value)  # not Flower's "<class '...'>:<'...'>"
    assert [r for r in caplog.records if r.levelno >= logging.WARNING and "data.jsonl" in r.getMessage()] == []


# ---------------------------------------------------------------------- worker processes


@pytest.fixture(scope="module")
def pool():
    from fgrpo.federation.workers import WorkerPool

    with WorkerPool(2, 1) as workers:
        yield workers


def toy_grid(n: int = 3, pool=None, **run_config) -> InProcessGrid:
    nodes = [{"partition-id": i, "num-partitions": n} for i in range(n)]
    return InProcessGrid("worker_apps:app", nodes, run_config=run_config, pool=pool)


def test_a_worker_pool_runs_the_same_rounds_as_this_process(pool):
    import os
    import random

    sequential, parallel = toy_grid(), toy_grid(pool=pool)
    results = []
    for grid in (sequential, parallel):
        random.seed(0)  # Flower samples nodes with `random`: the same order both times
        results.append(FedAvg(min_available_nodes=3).start(grid, INITIAL, num_rounds=2))
    for name in INITIAL:
        np.testing.assert_array_equal(results[0].arrays[name].numpy(), results[1].arrays[name].numpy())
    assert results[1].train_metrics_clientapp[2]["reward-mean"] == pytest.approx(1.0)  # 0.5 × the node's 2nd call
    for grid in (sequential, parallel):  # each node's state survived both rounds
        assert sorted(int(c.state["calls"]["train"]) for c in grid.contexts.values()) == [2, 2, 2]
    assert sorted(e[2:] for e in sequential.traffic_log) == sorted(e[2:] for e in parallel.traffic_log)  # same bytes
    node = next(iter(parallel.get_node_ids()))
    message = Message(RecordDict({"arrays": INITIAL, "config": ConfigRecord({"server-round": 3})}), node, "train")
    (reply,) = parallel.send_and_receive([message])
    assert reply.content["metrics"]["worker-pid"] != os.getpid()  # it ran in a worker


def test_a_node_whose_worker_dies_gets_a_crash_reply_and_the_round_goes_on(pool):
    grid = toy_grid(pool=pool, **{"die-partition": 1})
    result = FedAvg(min_available_nodes=3).start(grid, INITIAL, num_rounds=2)
    # only partitions 0 and 2: (10·1 + 30·3) / 40 = 2.5 per round
    np.testing.assert_allclose(result.arrays["lora_A"].numpy(), np.full(SHAPE, 5.0), rtol=1e-6)
    contexts = by_partition(grid)
    assert "calls" not in contexts[1].state and int(contexts[0].state["calls"]["train"]) == 2
    message = Message(RecordDict({"arrays": INITIAL, "config": ConfigRecord({"server-round": 3})}), contexts[1].node_id, "train")
    (reply,) = grid.send_and_receive([message])
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_CRASHED
    assert "worker process" in reply.error.reason


def test_a_dead_worker_is_a_failed_client_in_the_server_loop(pool, tmp_path):
    import json

    from fgrpo.config import config_from_dict
    from fgrpo.federation.server import run_federation

    config = config_from_dict({"federation": {"method": "fedavg", "num_clients": 3, "rounds": 2, "min_train_clients": 1},
                               "output": {"dir": str(tmp_path / "run")}})
    summary = run_federation(toy_grid(pool=pool, **{"die-partition": 2}), config, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    failures = [r for r in records if r["kind"] == "failure"]
    assert [r["round"] for r in failures] == [1, 2] and all("worker process" in r["reason"] for r in failures)
    rounds = [r for r in records if r["kind"] == "round" and r["round"] > 0]
    assert [(r["clients/failed"], r["clients/aggregated"]) for r in rounds] == [(1, 2), (1, 2)]
    assert summary["rounds"] == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stuck_client_is_stopped_at_the_round_timeout_and_the_run_goes_on(tmp_path, workers):
    import json
    import time

    from fgrpo.config import config_from_dict
    from fgrpo.federation.server import run_federation
    from fgrpo.federation.workers import WorkerPool

    config = config_from_dict({"federation": {"method": "fedavg", "num_clients": 3, "rounds": 2, "min_train_clients": 1,
                                              "round_timeout_s": 2.0},
                               "output": {"dir": str(tmp_path / "run")}})
    started = time.monotonic()
    with WorkerPool(workers, 1) as pool:
        summary = run_federation(toy_grid(pool=pool, **{"sleep-partition": 1}), config, tmp_path / "run", progress=False)
    assert time.monotonic() - started < 300 and summary["rounds"] == 2  # not the hour partition 1 sleeps
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    failures = [r for r in records if r["kind"] == "failure"]
    assert [(r["round"], r["client"]) for r in failures] == [(1, 1), (2, 1)]
    assert all("round_timeout_s" in r["reason"] for r in failures)
    rounds = [r for r in records if r["kind"] == "round" and r["round"] > 0]
    assert [(r["clients/failed"], r["clients/aggregated"]) for r in rounds] == [(1, 2), (1, 2)]


def test_a_pool_needs_the_client_apps_reference(pool):
    with pytest.raises(FederationError, match="module:attribute"):
        InProcessGrid(make_app(), [{"partition-id": 0}], pool=pool)
    with pytest.raises(ConfigError, match="no_such_module"):
        InProcessGrid("no_such_module:app", [{"partition-id": 0}])
