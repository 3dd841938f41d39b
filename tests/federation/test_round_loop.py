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


def fake_app(broken: set[int] = frozenset(), liar: int | None = None, **claims):
    """Client k adds k + 1 to θ and reports 10·(k + 1) examples; clients in `broken` send NaN.

    The `liar` reports reward-mean 10^round (a huge, ever-growing fake gain) and sends 20× its step;
    `claims` (examples=, evaluation=) replace the sizes and held-out results clients report (fake_apps.py).
    """
    return fake_client_app(broken=broken, liar=liar, **claims)


@pytest.fixture
def loop(tmp_path):
    def make(broken=frozenset(), liar=None, claims=None, **federation):
        config = config_from_dict(
            {"federation": {"method": "fedavg", "num_clients": 3, "rounds": 1, "min_train_clients": 1, **federation},
             "output": {"dir": str(tmp_path / "run")}}
        )
        k = config.federation.num_clients
        grid = InProcessGrid(fake_app(set(broken), liar, **(claims or {})), [{"partition-id": i, "num-partitions": k} for i in range(k)],
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
    # By default client 2 (norm 3 vs 2) would be clipped; 3 clients keep every share within the size cap (½).
    server = loop(broken={3}, num_clients=4, defense={"norm_clip": "off"})
    messages = server.configure(1)
    ok, failures = server.screen(messages, server.send(messages))
    assert [f.client_id for f in failures] == [3] and "non-finite" in failures[0].reason
    assert server.aggregate(1, ok)
    # clients 0, 1 and 2 add 1, 2 and 3, weighted 10:20:30
    np.testing.assert_allclose(wire.record_to_arrays(server.arrays)["a"], np.full(3, (1 * 10 + 2 * 20 + 3 * 30) / 60), rtol=1e-6)
    server.log_clients(1, ok, failures)
    server.writer.close()
    weights = {r["client"]: r["agg/weight"] for r in records(tmp_path, "client")}
    assert weights == pytest.approx({0: 1 / 6, 1: 2 / 6, 2: 3 / 6})
    assert [r["client"] for r in records(tmp_path, "failure")] == [3]


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
        # FGRPO: its fake gain buys at most 1.5/K = 0.375, never a majority. FedAvg weighs by examples, its
        # 40 of 100 held to the same share by the size cap (screening.capped_sizes).
        assert weight == pytest.approx(0.375)


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


# ------------------------------------------------------------------ claimed sizes buy no more than a capped share

SIZE_LIAR = {"examples": lambda cid, server_round: 10**9 if cid == 3 else 10 * (cid + 1)}
SIZE_WEIGHED = ["fgrpo", "fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "reward_weighted"]


def one_round(server):
    messages = server.configure(1)
    ok, failures = server.screen(messages, server.send(messages))
    assert not failures
    assert server.aggregate(1, ok)
    server.log_clients(1, ok, failures)
    server.writer.close()


ROBUST = [(method, robust) for method in ("fgrpo", "reward_weighted", "fedavg") for robust in ("median", "trimmed_mean")]


@pytest.mark.parametrize(("method", "robust"), [(method, "none") for method in SIZE_WEIGHED] + ROBUST)
def test_no_strategy_gives_a_client_claiming_1e9_examples_more_than_the_size_cap(loop, tmp_path, method, robust):
    """4 owners, owner 3 claims 10^9 examples: its weight is at most max(1/K, min(½, 1.5/K)) = 0.375, as logged."""
    from fgrpo.federation.aggregation import auto_weight_cap

    server = loop(method=method, num_clients=4, claims=SIZE_LIAR, defense={"norm_clip": "off", "robust": robust})
    one_round(server)
    clients = {r["client"]: r for r in records(tmp_path, "client")}
    weights = {cid: r["agg/weight"] for cid, r in clients.items()}
    assert weights[3] <= auto_weight_cap(4) + 1e-12
    assert sum(weights.values()) == pytest.approx(1.0)
    assert clients[3]["client/num_examples"] == 10**9  # the claim is logged as made...
    if robust == "none" and method != "reward_weighted":  # ...and what was weighed beside it
        assert clients[3]["defense/size_counted"] < 10**9
    if method in ("fedavg", "fedprox", "fedavgm") and robust == "none":
        # The logged weights are the ones the strategy used: client k's step k + 1, averaged with them.
        step = wire.record_to_arrays(server.arrays)["a"][0]
        assert step == pytest.approx(sum(w * (cid + 1) for cid, w in weights.items()), rel=1e-6)


def test_the_size_cap_leaves_fedavg_as_published_while_no_client_passes_it(loop, tmp_path):
    """10:20:30:40 examples (40% > 0.375 for client 3) vs 10:20:30:30: the capped round, then an untouched one."""
    for sizes, expected in (((10, 20, 30, 40), None), ((10, 20, 30, 30), (10, 20, 30, 30))):
        server = loop(method="fedavg", num_clients=4, claims={"examples": lambda cid, r, s=sizes: s[cid]},
                      defense={"norm_clip": "off"})
        one_round(server)
        weights = [r["agg/weight"] for r in sorted(records(tmp_path, "client")[-4:], key=lambda r: r["client"])]
        if expected is None:
            assert weights[3] == pytest.approx(0.375)
            assert weights[:3] == pytest.approx([0.625 * n / 60 for n in (10, 20, 30)])  # the rest as claimed
        else:
            assert weights == pytest.approx([n / sum(expected) for n in expected])


def test_median_logs_the_equal_vote_fedmedian_gives_not_the_claimed_size(loop, tmp_path):
    """FedMedian ignores weights: every client's logged weight is 1/K, the liar's included (not ~1.0)."""
    server = loop(method="fedavg", num_clients=4, claims=SIZE_LIAR, defense={"norm_clip": "off", "robust": "median"})
    one_round(server)
    assert {r["client"]: r["agg/weight"] for r in records(tmp_path, "client")} == {c: 0.25 for c in range(4)}
    assert wire.record_to_arrays(server.arrays)["a"][0] == pytest.approx(np.median([1, 2, 3, 4]))


def test_a_client_claiming_1e9_held_out_examples_all_correct_moves_the_pooled_accuracy_by_at_most_its_capped_share(loop):
    """The issue's case: honest 8.3%; one client claims 10^9 examples all correct (it reported 99.99999% before)."""
    from fgrpo.federation.aggregation import auto_weight_cap

    honest = {cid: (12, 1 / 12) for cid in range(4)}
    liar = {**honest, 3: (10**9, 1.0)}
    honest_acc = loop(claims={"evaluation": lambda cid: honest[cid]}, num_clients=4).evaluate(0)["global/acc_heldout"]
    reported = loop(claims={"evaluation": lambda cid: liar[cid]}, num_clients=4).evaluate(0)["global/acc_heldout"]
    assert honest_acc == pytest.approx(1 / 12)
    assert honest_acc < reported <= honest_acc + auto_weight_cap(4)  # 0.375: never 100%, never a majority
    assert reported == pytest.approx(0.375 * 1.0 + 0.625 / 12)


def test_a_later_claim_above_a_clients_first_size_is_refused(loop, tmp_path):
    """Sizes are bound at first sight: client 1 trains on 20 examples in round 1 and claims 10^6 in round 2."""
    evaluated: list[int] = []

    def evaluation(cid):  # client 2 reports 4 held-out examples at round 0, then 400
        evaluated.append(cid)
        return (400 if cid == 2 and evaluated.count(2) > 1 else 4), 0.5

    server = loop(num_clients=3, rounds=2, claims={
        "examples": lambda cid, r: 10**6 if (cid, r) == (1, 2) else 10 * (cid + 1), "evaluation": evaluation,
    })
    server.evaluate(0)
    for server_round in (1, 2):
        messages = server.configure(server_round)
        ok, failures = server.screen(messages, server.send(messages))
        if server_round == 2:
            assert [(f.client_id, f.reason) for f in failures] == [(1, "'num-examples' = 1000000 is more than the 20 client 1 declared first")]
    server.evaluate(1)
    server.writer.close()
    assert [(r["client"], r["reason"]) for r in records(tmp_path, "failure")] == [
        (2, "evaluate: 'num-examples' = 400 is more than the 4 client 2 declared first")
    ]
    assert server.train_sizes == {0: 10, 1: 20, 2: 30} and server.eval_sizes == {0: 4, 1: 4, 2: 4}
    from fgrpo.federation.checkpoint import load_checkpoint

    server.checkpoint(2)  # --resume keeps the bindings
    extra = load_checkpoint(tmp_path / "run").extra
    assert extra["train_sizes"] == {0: 10, 1: 20, 2: 30} and extra["eval_sizes"] == {0: 4, 1: 4, 2: 4}
