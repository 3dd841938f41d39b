"""Each stage of the server's round loop on a fake grid: no model, hand-made client replies."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fgrpo.config import config_from_dict
from fgrpo.federation import wire
from fgrpo.federation.inprocess import InProcessGrid
from fgrpo.federation.methods import build_strategy
from fgrpo.federation.server import RoundLoop
from fgrpo.reporting.results import MetricsWriter

THETA0 = {"a": np.zeros(3, np.float32)}


def fake_app(broken: set[int] = frozenset()) -> ClientApp:
    """Client k adds k + 1 to θ and reports 10·(k + 1) examples; clients in `broken` send NaN."""
    app = ClientApp()

    @app.train()
    def train(msg, context):
        cid = int(context.node_config["partition-id"])
        theta = wire.record_to_arrays(msg.content[wire.ARRAYS])
        trained = {k: v + (np.nan if cid in broken else cid + 1) for k, v in theta.items()}
        metrics = {wire.CLIENT_ID: cid, wire.NUM_EXAMPLES: 10 * (cid + 1), wire.REWARD_MEAN: 0.5, wire.REWARD_STD: 0.1,
                   wire.ACCURACY: 0.5, wire.TRAIN_TIME: 0.0, wire.UNIT_WEIGHT: 1}
        return Message(RecordDict({wire.ARRAYS: wire.arrays_to_record(trained), wire.METRICS: MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg, context):
        cid = int(context.node_config["partition-id"])
        metrics = {wire.CLIENT_ID: cid, wire.NUM_EXAMPLES: 4, wire.ACC_HELDOUT: 0.25 * (cid + 1)}
        return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app


@pytest.fixture
def loop(tmp_path):
    def make(broken=frozenset(), **federation):
        config = config_from_dict(
            {"federation": {"method": "fedavg", "num_clients": 3, "rounds": 1, "min_train_clients": 1, **federation},
             "output": {"dir": str(tmp_path / "run")}}
        )
        grid = InProcessGrid(fake_app(set(broken)), [{"partition-id": i, "num-partitions": 3} for i in range(3)],
                             run_config={wire.CONFIG_KEY: ""})
        (tmp_path / "run").mkdir(exist_ok=True)
        writer = MetricsWriter(tmp_path / "run", config.federation.method, 0)
        strategy = build_strategy(config, 3)
        return RoundLoop(grid, config, tmp_path / "run", strategy, writer, wire.arrays_to_record(THETA0), time.perf_counter())

    return make


def records(tmp_path, kind):
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_configure_sends_theta_and_the_round_config_to_every_sampled_node(loop):
    messages = loop().configure(1)
    assert len(messages) == 3
    for message in messages:
        assert wire.record_to_arrays(message.content[wire.ARRAYS])["a"].tolist() == [0, 0, 0]
        assert message.content[wire.CONFIG][wire.LOCAL_ONLY] is False


def test_screen_drops_a_broken_reply_and_aggregate_weighs_the_rest_by_examples(loop, tmp_path):
    server = loop(broken={2}, defense={"norm_clip": "off"})  # by default client 1 (norm 2 vs 1) would be clipped to 1.5
    messages = server.configure(1)
    ok, failures = server.screen(messages, server.send(messages))
    assert [f.client_id for f in failures] == [2] and "non-finite" in failures[0].reason
    assert server.aggregate(1, ok)
    # clients 0 and 1 add 1 and 2, weighted 10:20
    np.testing.assert_allclose(wire.record_to_arrays(server.arrays)["a"], np.full(3, (1 * 10 + 2 * 20) / 30), rtol=1e-6)
    server.log_clients(1, ok, failures)
    server.writer.close()
    weights = {r["client"]: r["agg/weight"] for r in records(tmp_path, "client")}
    assert weights == pytest.approx({0: 1 / 3, 1: 2 / 3})
    assert [r["client"] for r in records(tmp_path, "failure")] == [2]


def test_server_lr_stretches_the_aggregate_step(loop):
    server = loop(server_lr=2.0)
    messages = server.configure(1)
    ok, _ = server.screen(messages, server.send(messages))
    server.aggregate(1, ok)
    step = (1 * 10 + 2 * 20 + 3 * 30) / 60
    np.testing.assert_allclose(wire.record_to_arrays(server.arrays)["a"], np.full(3, 2 * step), rtol=1e-6)


def test_evaluate_pools_the_clients_held_out_accuracy(loop):
    result = loop().evaluate(1)
    assert result["global/acc_heldout"] == pytest.approx((0.25 + 0.5 + 0.75) * 4 / 12)
