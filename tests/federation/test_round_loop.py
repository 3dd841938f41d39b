"""Each stage of the server's round loop on a fake grid: no model, hand-made client replies."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from fgrpo.config import config_from_dict
from fgrpo.federation import wire
from fgrpo.federation.inprocess import InProcessGrid
from fgrpo.federation.methods import build_strategy
from fgrpo.federation.server import RoundLoop
from fgrpo.reporting.results import MetricsWriter

from fake_apps import fake_client_app

THETA0 = {"a": np.zeros(3, np.float32)}


def fake_app(broken: set[int] = frozenset(), liar: int | None = None):
    """Client k adds k + 1 to θ and reports 10·(k + 1) examples; clients in `broken` send NaN.

    The `liar` reports reward-mean 10^round (a huge, ever-growing fake gain) and sends 20× its step.
    """
    return fake_client_app(broken=broken, liar=liar)


@pytest.fixture
def loop(tmp_path):
    def make(broken=frozenset(), liar=None, **federation):
        config = config_from_dict(
            {"federation": {"method": "fedavg", "num_clients": 3, "rounds": 1, "min_train_clients": 1, **federation},
             "output": {"dir": str(tmp_path / "run")}}
        )
        k = config.federation.num_clients
        grid = InProcessGrid(fake_app(set(broken), liar), [{"partition-id": i, "num-partitions": k} for i in range(k)],
                             run_config={wire.CONFIG_KEY: ""})
        (tmp_path / "run").mkdir(exist_ok=True)
        writer = MetricsWriter(tmp_path / "run", config.federation.method, 0)
        strategy = build_strategy(config, k)
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


def liar_rounds(server, rounds):
    """Run `rounds` rounds through screen → aggregate; per round: {client: (norm, clip factor, weight)}."""
    from fgrpo.federation.server import aggregation_weights

    seen = []
    for server_round in range(1, rounds + 1):
        messages = server.configure(server_round)
        ok, failures = server.screen(messages, server.send(messages))
        assert not failures
        server.aggregate(server_round, ok)
        weights = aggregation_weights(server.strategy, ok, wire.NUM_EXAMPLES)
        seen.append({cid: (*server.norms[cid], weights[cid][0]) for cid in server.norms})
    return seen


@pytest.mark.parametrize("method", ["fgrpo", "fedavg"])
def test_the_default_config_caps_and_clips_one_liar_without_any_defence_configured(loop, method):
    """4 owners, owner 3 lies (reward 10^round, 20× update): no key of [federation.defense] or w_max is set."""
    server = loop(liar=3, method=method, num_clients=4, rounds=3)
    for server_round, clients in enumerate(liar_rounds(server, 3), start=1):
        norms = sorted(norm for norm, _, _ in clients.values())
        lower_median = norms[1]  # sorted(norms)[(K − 1) // 2], K = 4: an honest update's norm
        norm, factor, weight = clients[3]
        assert norm > 20 * lower_median  # the liar really sent a huge update...
        assert norm * factor == pytest.approx(1.5 * lower_median)  # ...and the server bounded it to 1.5×
        # honest ones untouched (owner 2, at exactly 1.5× the reference, may round to 1 − 1e-16)
        assert all(f == pytest.approx(1.0) for cid, (_, f, _) in clients.items() if cid != 3)
        if method == "fgrpo":  # its fake gain buys at most 1.5/K = 0.375, never a majority
            assert weight == pytest.approx(0.375)
        else:  # FedAvg weighs by examples: 40 of 100
            assert weight == pytest.approx(0.4)


def test_previous_defaults_let_the_liar_take_the_round(loop):
    """The same liar with clipping off, w_max = 1 and no max_tilt (before issue 16) takes nearly all the weight."""
    server = loop(
        liar=3, method="fgrpo", num_clients=4, rounds=3, defense={"norm_clip": "off"}, fgrpo={"w_max": 1.0, "max_tilt": "off"}
    )
    last = liar_rounds(server, 3)[-1]
    assert last[3][1] == 1.0 and last[3][2] > 0.99


def test_partial_participation_bounds_the_liar_by_the_one_other_client_of_its_round(loop):
    """Two of four owners a round: when the liar is sampled, the other client's norm is the reference and both weigh ½."""
    server = loop(liar=3, method="fgrpo", num_clients=4, rounds=8, fraction_train=0.5, min_train_clients=2)
    rounds = liar_rounds(server, 8)
    with_liar = [clients for clients in rounds if 3 in clients]
    assert with_liar and len(with_liar) < len(rounds)  # the liar is absent some rounds (seeded sampling)
    for clients in rounds:
        assert len(clients) == 2
        assert all(w == pytest.approx(0.5) for _, _, w in clients.values())  # K = 2: FGRPO's auto cap is ½
    for clients in with_liar:
        (other,) = [cid for cid in clients if cid != 3]
        norm, factor, _ = clients[3]
        assert norm * factor == pytest.approx(1.5 * clients[other][0])


def test_local_only_owners_are_not_clipped(loop):
    """Nothing is averaged for local-only, so the default clip must not touch (or log) their updates."""
    server = loop(liar=2, method="local")
    messages = server.configure(1)
    server.screen(messages, server.send(messages))
    assert all(factor == 1.0 for _, factor in server.norms.values())
    clipped = loop(liar=2, method="fedavg")
    messages = clipped.configure(1)
    clipped.screen(messages, clipped.send(messages))
    assert clipped.norms[2][1] < 1.0
