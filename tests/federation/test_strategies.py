"""Tests for fgrpo.federation.strategies: the weight math by hand and by property, the strategies on fake replies."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedProx, FedTrimmedAvg
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fgrpo.errors import ConfigError, FederationError
from fgrpo.federation.strategies import (
    FGRPO,
    STRATEGIES,
    RewardWeighted,
    RunningStats,
    aggregation_weights,
    make_strategy,
    relative_gain,
    reward_weighted_weights,
    update_baseline,
    weighted_update,
    zscore_gain,
)

SERVER = 1


def history(values) -> RunningStats:
    stats = RunningStats()
    for v in values:
        stats.update(v)
    return stats


# --------------------------------------------------------------------------- gains by hand


def test_relative_gain_by_hand():
    assert relative_gain(1.2, 1.0, 1e-3) == pytest.approx(0.2)  # 0.2 / 1
    assert relative_gain(0.5, -2.0, 1e-3) == pytest.approx(1.25)  # 2.5 / |−2|
    assert relative_gain(0.3, 0.0, 0.1) == pytest.approx(3.0)  # 0.3 / max(0, δ = 0.1)
    assert relative_gain(5.0, None, 1e-3) == 0.0  # first participation


def test_zscore_gain_by_hand():
    # past R = [1, 3]: μ = 2, sample σ = √2; R = 4 -> (4 − 2) / (√2 + 0.01)
    assert zscore_gain(4.0, history([1.0, 3.0]), 0.01) == pytest.approx(2 / (math.sqrt(2) + 0.01))
    assert zscore_gain(4.0, history([1.0]), 0.01) == 0.0  # one past value: no spread known yet
    assert zscore_gain(4.0, None, 0.01) == 0.0


def test_running_stats_match_numpy():
    values = np.random.default_rng(0).normal(3.0, 2.0, size=50)
    stats = history(values)
    assert stats.count == 50
    assert stats.mean == pytest.approx(values.mean())
    assert stats.std == pytest.approx(values.std(ddof=1))


def test_update_baseline_by_hand():
    assert update_baseline(None, 0.7, 0.5) == 0.7  # first value initialises B
    assert update_baseline(1.0, 3.0, 0.75) == pytest.approx(1.5)  # 0.75·1 + 0.25·3


# --------------------------------------------------------------------------- weights by hand


def test_weights_by_hand():
    ln3, ln8, ln2 = math.log(3), math.log(8), math.log(2)
    # uniform sizes, exp(g) = [1, 3] -> [1/4, 3/4]
    np.testing.assert_allclose(aggregation_weights([0, ln3], [1, 1]), [0.25, 0.75])
    # sizes [3, 1] times exp(g) = [1, 3] -> [3, 3] -> [1/2, 1/2]
    np.testing.assert_allclose(aggregation_weights([0, ln3], [3, 1]), [0.5, 0.5])
    # τ = 2 halves the gains: exp([0, 2 ln 3] / 2) = [1, 3]
    np.testing.assert_allclose(aggregation_weights([0, 2 * ln3], [1, 1], temperature=2.0), [0.25, 0.75])
    # size_prior=False ignores n
    np.testing.assert_allclose(aggregation_weights([0, 0], [1, 99], size_prior=False), [0.5, 0.5])


def test_cap_redistributes_in_proportion():
    ln8, ln2 = math.log(8), math.log(2)
    # ∝ [8, 1, 1] = [.8, .1, .1]; cap .5 -> the other .5 split 1:1. (Plain clip then
    # renormalise would give [.714, .143, .143], back above the cap.)
    np.testing.assert_allclose(aggregation_weights([ln8, 0, 0], [1, 1, 1], w_max=0.5), [0.5, 0.25, 0.25])
    # ∝ [8, 2, 1]; cap .5 -> the other .5 split 2:1
    np.testing.assert_allclose(aggregation_weights([ln8, ln2, 0], [1, 1, 1], w_max=0.5), [0.5, 1 / 3, 1 / 6])


def test_floor_redistributes_in_proportion():
    # ∝ [8, 2, 1] = [.727, .182, .091]; floor .2 lifts both small ones:
    # 8c + .2 + .2 = 1 -> c = .075 -> [.6, .2, .2] (2c = .15 < .2, so both floored)
    w = aggregation_weights([math.log(8), math.log(2), 0], [1, 1, 1], w_min=0.2)
    np.testing.assert_allclose(w, [0.6, 0.2, 0.2])


def test_infeasible_bounds_fall_back_to_uniform():
    np.testing.assert_allclose(aggregation_weights([5, 0, -5], [1, 2, 3], w_max=0.2), [1 / 3] * 3)  # 3·0.2 < 1
    np.testing.assert_allclose(aggregation_weights([5, 0, -5], [1, 2, 3], w_min=0.5), [1 / 3] * 3)  # 3·0.5 > 1


def test_bounds_hold_even_for_a_client_without_examples():
    # p = [0, 1] cannot respect w_max = .5 by scaling; the cap is a hard constraint.
    np.testing.assert_allclose(aggregation_weights([0, 0], [0, 1], w_max=0.5), [0.5, 0.5])


def test_underflowed_weights_keep_their_order_under_the_cap():
    # exp(1000) swamps the others; after capping at .5 the rest is split ∝ exp([10, 0]).
    w = aggregation_weights([1000.0, 10.0, 0.0], [1, 1, 1], w_max=0.5)
    np.testing.assert_allclose(w, [0.5, 0.5 / (1 + math.exp(-10)), 0.5 * math.exp(-10) / (1 + math.exp(-10))])


def test_reward_weighted_weights_by_hand():
    np.testing.assert_allclose(reward_weighted_weights([1.0, -1.0, 3.0]), [0.25, 0.0, 0.75])
    np.testing.assert_allclose(reward_weighted_weights([-1.0, 0.0]), [0.5, 0.5])
    np.testing.assert_allclose(reward_weighted_weights([math.inf, 1.0, math.nan]), [1.0, 0.0, 0.0])


def test_weighted_update_by_hand():
    current = {"a": np.array([1.0, 2.0], dtype=np.float32)}
    clients = [{"a": np.array([3.0, 2.0])}, {"a": np.array([1.0, 6.0])}]
    # Δ = [2, 0], [0, 4]; Σ w Δ = .25·[2, 0] + .75·[0, 4] = [.5, 3]; θ + .5·Σ = [1.25, 3.5]
    new = weighted_update(current, clients, [0.25, 0.75], server_lr=0.5)
    np.testing.assert_allclose(new["a"], [1.25, 3.5])
    assert new["a"].dtype == np.float32
    with pytest.raises(FederationError, match="missing keys"):
        weighted_update(current, [{"b": np.zeros(2)}], [1.0])
    with pytest.raises(FederationError, match="shape"):
        weighted_update(current, [{"a": np.zeros(3)}], [1.0])


# --------------------------------------------------------------------------- properties

finite_gains = st.floats(-50, 50, allow_nan=False)
sizes = st.integers(0, 1000)
temperatures = st.sampled_from([0.05, 0.5, 1.0, 4.0, math.inf])


@st.composite
def weight_problem(draw, gain_values=finite_gains, sizes=sizes):
    k = draw(st.integers(1, 8))
    gains = draw(st.lists(gain_values, min_size=k, max_size=k))
    ns = draw(st.lists(sizes, min_size=k, max_size=k))
    w_max = draw(st.floats(0.05, 1.0))
    w_min = draw(st.floats(0.0, w_max))
    return gains, ns, draw(temperatures), w_min, w_max, draw(st.booleans())


def effective_bounds(k, w_min, w_max):
    return min(w_min, 1 / k), max(w_max, 1 / k)


@settings(max_examples=150, deadline=None)
@given(weight_problem())
def test_weights_are_a_bounded_distribution(problem):
    gains, ns, tau, w_min, w_max, prior = problem
    w = aggregation_weights(gains, ns, tau, w_min, w_max, prior)
    lo, hi = effective_bounds(len(gains), w_min, w_max)
    assert np.all(np.isfinite(w))
    assert w.sum() == pytest.approx(1.0, abs=1e-9)
    assert np.all(w >= lo - 1e-12) and np.all(w <= hi + 1e-12)


def reference_weights(gains, ns, tau, w_min, w_max, prior):
    """Independent reference: w_k = clip(c·v_k, lo, hi) with c found by bisection on log c."""
    k = len(gains)
    lo, hi = effective_bounds(k, w_min, w_max)
    p = np.asarray(ns, float) / sum(ns) if prior and sum(ns) > 0 else np.full(k, 1 / k)
    with np.errstate(divide="ignore"):
        logits = np.log(p) + (0.0 if math.isinf(tau) else np.asarray(gains, float) / tau)
    logits = np.maximum(logits, -1e300)

    def total(a):
        return np.clip(np.exp(np.minimum(a + logits, 0.0)), lo, hi).sum()

    a_lo, a_hi = -1e4, 1e4
    for _ in range(200):
        mid = 0.5 * (a_lo + a_hi)
        a_lo, a_hi = (mid, a_hi) if total(mid) < 1 else (a_lo, mid)
    return np.clip(np.exp(np.minimum(a_hi + logits, 0.0)), lo, hi)


@settings(max_examples=150, deadline=None)
@given(weight_problem(gain_values=st.floats(-20, 20), sizes=st.integers(1, 1000)))
def test_weights_match_bisection_reference(problem):
    np.testing.assert_allclose(aggregation_weights(*problem), reference_weights(*problem), atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(weight_problem(), st.randoms(use_true_random=False))
def test_permutation_equivariance(problem, rnd):
    gains, ns, tau, w_min, w_max, prior = problem
    order = list(range(len(gains)))
    rnd.shuffle(order)
    w = aggregation_weights(gains, ns, tau, w_min, w_max, prior)
    w_perm = aggregation_weights([gains[i] for i in order], [ns[i] for i in order], tau, w_min, w_max, prior)
    np.testing.assert_allclose(w_perm, w[order], atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.lists(finite_gains, min_size=1, max_size=8).flatmap(
    lambda g: st.tuples(st.just(g), st.lists(st.integers(1, 1000), min_size=len(g), max_size=len(g)))
))
def test_infinite_temperature_is_fedavg_exactly(problem):
    gains, ns = problem
    fedavg = [n / sum(ns) for n in ns]  # what Flower's aggregate_arrayrecords uses
    assert aggregation_weights(gains, ns, math.inf).tolist() == fedavg
    np.testing.assert_allclose(aggregation_weights(gains, ns, 1e9), fedavg, atol=1e-6)


@settings(max_examples=100, deadline=None)
@given(weight_problem(), st.data())
def test_absurd_gain_gets_at_most_w_max(problem, data):
    gains, ns, tau, w_min, w_max, prior = problem
    liar = data.draw(st.integers(0, len(gains) - 1))
    gains[liar] = data.draw(st.sampled_from([1e12, 1e300, math.inf]))
    w = aggregation_weights(gains, ns, tau, w_min, w_max, prior)
    assert w[liar] <= effective_bounds(len(gains), w_min, w_max)[1] + 1e-12


@settings(max_examples=150, deadline=None)
@given(weight_problem(gain_values=st.floats(allow_nan=True, allow_infinity=True)))
def test_non_finite_gains_give_finite_weights(problem):
    w = aggregation_weights(*problem)
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    assert w.sum() == pytest.approx(1.0, abs=1e-9)


DELTA = 1e-3


@st.composite
def relative_clients(draw):
    """K clients' (R, B) with |B| ≥ 0.1, and a scale c ∈ [0.1, 10] so c|B| ≥ δ too."""
    k = draw(st.integers(1, 6))
    rewards = draw(st.lists(st.floats(-10, 10), min_size=k, max_size=k))
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=k, max_size=k))
    mags = draw(st.lists(st.floats(0.1, 10), min_size=k, max_size=k))
    return rewards, [s * m for s, m in zip(signs, mags)], draw(st.integers(0, k - 1)), draw(st.floats(0.1, 10))


@settings(max_examples=150, deadline=None)
@given(relative_clients(), weight_problem())
def test_relative_gain_weights_are_scale_invariant(clients, problem):
    rewards, baselines, i, c = clients
    _, _, tau, w_min, w_max, prior = problem
    ns = list(range(1, len(rewards) + 1))
    gains = [relative_gain(r, b, DELTA) for r, b in zip(rewards, baselines)]
    rewards[i], baselines[i] = c * rewards[i], c * baselines[i]
    scaled = [relative_gain(r, b, DELTA) for r, b in zip(rewards, baselines)]
    np.testing.assert_allclose(
        aggregation_weights(scaled, ns, tau, w_min, w_max, prior),
        aggregation_weights(gains, ns, tau, w_min, w_max, prior),
        rtol=1e-9, atol=1e-12,
    )


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.floats(-10, 10), st.lists(st.floats(-10, 10), min_size=2, max_size=6)), min_size=1, max_size=5),
    st.data(),
    st.floats(0.1, 10),
    st.sampled_from([0.5, 1.0, 4.0, math.inf]),
)
def test_zscore_gain_weights_are_scale_invariant(clients, data, c, tau):
    # (cR − cμ)/(cσ + δ) differs from (R − μ)/(σ + δ) only through δ: with σ ≥ 0.1 and
    # δ = 1e-9 the change is below 1e-7 relative, so the weights agree to that order.
    delta = 1e-9
    assume(all(history(h).std >= 0.1 for _, h in clients))
    i = data.draw(st.integers(0, len(clients) - 1))
    ns = [1] * len(clients)
    gains = [zscore_gain(r, history(h), delta) for r, h in clients]
    r_i, h_i = clients[i]
    clients[i] = (c * r_i, [c * v for v in h_i])
    scaled = [zscore_gain(r, history(h), delta) for r, h in clients]
    np.testing.assert_allclose(aggregation_weights(scaled, ns, tau), aggregation_weights(gains, ns, tau), rtol=1e-5, atol=1e-12)


# --------------------------------------------------------------------------- strategies on fake replies


@pytest.fixture(autouse=True)
def _task_identity():
    """`Message(...)` needs the sender's identity (the runtime's grid sets it)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, SERVER


class NodesOnly(Grid):
    """Just enough Grid for `configure_train` to sample nodes."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError

    def get_node_ids(self):
        return self.node_ids

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def reply(client_id: int, theta: dict[str, np.ndarray], n: int, reward: float) -> Message:
    """A train reply per the message contract, from node 100 + client_id."""
    ins = Message(RecordDict(), 100 + client_id, "train")
    metrics = MetricRecord(
        {"num-examples": n, "client-id": client_id, "reward-mean": reward, "reward-std": 0.1, "accuracy": reward / 10}
    )
    return Message(RecordDict({"arrays": record(theta), "metrics": metrics}), reply_to=ins)


def error_reply(node_id: int) -> Message:
    return Message(Error(code=2, reason="boom"), reply_to=Message(RecordDict(), node_id, "train"))


THETA = {"a": np.array([1.0, -1.0], dtype=np.float32), "b": np.ones((2, 2), dtype=np.float32)}


def client_theta(client_id: int, round_: int) -> dict[str, np.ndarray]:
    return {k: v + (client_id + 1) * 0.1 * round_ for k, v in THETA.items()}


def run_round(strategy, server_round, theta, replies):
    strategy.configure_train(server_round, record(theta), ConfigRecord(), NodesOnly([100, 101, 102]))
    return strategy.aggregate_train(server_round, replies)


def as_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


def test_fgrpo_three_rounds_tracks_baselines_of_participants_only():
    # w_max = 1, max_tilt off: this checks the paper's unbounded formula (the default bounds have their own tests).
    s = FGRPO(gain="relative", temperature=1.0, baseline_decay=0.5, delta=1e-3, w_max=1.0, max_tilt="off", min_available_nodes=3)
    sizes = {0: 10, 1: 30, 2: 20}
    # round 1: clients 0 and 1, first participation -> gains 0, weights = sizes 10:30
    out, metrics = run_round(s, 1, THETA, [reply(0, client_theta(0, 1), 10, 2.0), reply(1, client_theta(1, 1), 30, 0.5)])
    assert s.last_aggregation.gains == [0.0, 0.0]
    np.testing.assert_allclose(s.last_aggregation.weights, [0.25, 0.75])
    assert {cid: st.baseline for cid, st in s.clients.items()} == {0: 2.0, 1: 0.5}
    assert list(metrics["agg-client-ids"]) == [0, 1] and "client-id" not in metrics
    theta1 = as_numpy(out)

    # round 2: clients 1 and 2 (reply order shuffled). Client 1 vs its previous baseline .5:
    # g1 = (1.0 − .5)/.5 = 1; client 2 is new: g2 = 0. Weights ∝ [30e, 20].
    out, metrics = run_round(s, 2, theta1, [reply(2, client_theta(2, 2), 20, 4.0), reply(1, client_theta(1, 2), 30, 1.0)])
    assert s.last_aggregation.client_ids == [1, 2]
    np.testing.assert_allclose(s.last_aggregation.gains, [1.0, 0.0])
    expected = np.array([30 * math.e, 20]) / (30 * math.e + 20)
    np.testing.assert_allclose(s.last_aggregation.weights, expected)
    np.testing.assert_allclose(list(metrics["agg-weights"]), expected)
    assert s.clients[0].baseline == 2.0 and s.clients[0].rounds_seen == 1  # sat out: untouched
    assert s.clients[1].baseline == pytest.approx(0.75)  # .5·.5 + .5·1
    assert s.clients[2].baseline == 4.0
    np.testing.assert_allclose(
        as_numpy(out)["a"], weighted_update(theta1, [client_theta(1, 2), client_theta(2, 2)], expected)["a"], rtol=1e-6
    )
    theta2 = as_numpy(out)

    # round 3: all; client 0 against its round-1 baseline 2.0: g0 = (1 − 2)/2 = −.5
    # g1 = (1.5 − .75)/.75 = 1, g2 = (2 − 4)/4 = −.5
    replies = [reply(c, client_theta(c, 3), sizes[c], r) for c, r in [(0, 1.0), (1, 1.5), (2, 2.0)]]
    replies.append(error_reply(103))  # a failed node is skipped
    run_round(s, 3, theta2, replies)
    np.testing.assert_allclose(s.last_aggregation.gains, [-0.5, 1.0, -0.5])
    logits = np.log([10, 30, 20]) + np.array([-0.5, 1.0, -0.5])
    np.testing.assert_allclose(s.last_aggregation.weights, np.exp(logits) / np.exp(logits).sum())
    assert [s.clients[c].rounds_seen for c in (0, 1, 2)] == [2, 3, 2]


def test_fgrpo_zscore_needs_two_past_values():
    s = FGRPO(gain="zscore", delta=1e-3)
    for rnd, r in enumerate([1.0, 3.0], start=1):
        run_round(s, rnd, THETA, [reply(0, THETA, 10, r), reply(1, THETA, 10, 1.0)])
        assert s.last_aggregation.gains == [0.0, 0.0]
    run_round(s, 3, THETA, [reply(0, THETA, 10, 4.0), reply(1, THETA, 10, 1.0)])
    # client 0: past [1, 3] -> (4 − 2)/(√2 + δ); client 1: past [1, 1] -> σ = 0, (1 − 1)/δ = 0
    np.testing.assert_allclose(s.last_aggregation.gains, [2 / (math.sqrt(2) + 1e-3), 0.0])


def test_fgrpo_with_infinite_temperature_equals_flower_fedavg():
    replies = [reply(c, client_theta(c, 1), n, r) for c, n, r in [(0, 7, 5.0), (1, 13, -1.0), (2, 30, 0.3)]]
    fgrpo = FGRPO(temperature=math.inf, w_max=1.0)  # no cap: client 2 holds 60% of the data
    fedavg = FedAvg()
    for _ in range(2):  # second round has baselines, τ = inf must still ignore them
        ours, _ = run_round(fgrpo, 1, THETA, replies)
        theirs, _ = run_round(fedavg, 1, THETA, replies)
        for key in THETA:
            np.testing.assert_allclose(ours[key].numpy(), theirs[key].numpy(), rtol=1e-6)


def test_server_lr_zero_keeps_theta():
    s = FGRPO(server_lr=0.0)
    out, _ = run_round(s, 1, THETA, [reply(0, client_theta(0, 1), 10, 1.0), reply(1, client_theta(1, 1), 10, 2.0)])
    for key, value in THETA.items():
        np.testing.assert_array_equal(out[key].numpy(), value)


def test_state_dict_round_trips_through_json():
    s = FGRPO(gain="zscore")
    for rnd, (r0, r1) in enumerate([(1.0, 2.0), (3.0, 2.5), (2.0, 0.5)], start=1):
        run_round(s, rnd, THETA, [reply(0, THETA, 10, r0), reply(1, THETA, 20, r1)])
    state = json.loads(json.dumps(s.state_dict()))
    resumed = FGRPO(gain="zscore")
    resumed.load_state_dict(state)
    assert resumed.state_dict() == s.state_dict()
    nxt = [reply(0, client_theta(0, 4), 10, 5.0), reply(1, client_theta(1, 4), 20, 1.0)]
    a, _ = run_round(s, 4, THETA, nxt)
    b, _ = run_round(resumed, 4, THETA, nxt)
    assert resumed.last_aggregation == s.last_aggregation
    np.testing.assert_array_equal(a["a"].numpy(), b["a"].numpy())
    with pytest.raises(ConfigError):
        resumed.load_state_dict({"clients": []})


def test_reward_weighted_uses_raw_rewards():
    s = RewardWeighted()
    _, metrics = run_round(s, 1, THETA, [reply(0, THETA, 10, 1.0), reply(1, THETA, 99, 3.0), reply(2, THETA, 5, -2.0)])
    np.testing.assert_allclose(list(metrics["agg-weights"]), [0.25, 0.75, 0.0])
    assert s.server_lr == 1.0


def test_contract_violations_are_named():
    s = FGRPO()
    bad = reply(0, THETA, 10, 1.0)
    del bad.content["metrics"]["client-id"]
    other = reply(1, THETA, 10, 1.0)
    del other.content["metrics"]["client-id"]
    with pytest.raises(FederationError, match="client-id"):
        run_round(s, 1, THETA, [bad, other])
    with pytest.raises(FederationError, match="same client-id"):
        run_round(s, 1, THETA, [reply(0, THETA, 10, 1.0), reply(0, THETA, 10, 2.0)])
    with pytest.raises(FederationError, match="configure_train"):
        FGRPO().aggregate_train(1, [reply(0, THETA, 10, 1.0)])
    assert run_round(s, 1, THETA, [error_reply(100)]) == (None, None)


@pytest.mark.parametrize(
    "options",
    [{"gain": "nope"}, {"temperature": 0.0}, {"baseline_decay": 1.0}, {"delta": 0.0}, {"w_min": 0.6, "w_max": 0.5}, {"server_lr": -1}],
)
def test_fgrpo_rejects_bad_options(options):
    with pytest.raises(ConfigError):
        FGRPO(**options)


# --------------------------------------------------------------------------- factory


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_factory_builds_every_name(name):
    strategy = make_strategy(name, min_available_nodes=3, fraction_train=0.5)
    assert isinstance(strategy, STRATEGIES[name])
    assert strategy.min_available_nodes == 3


def test_factory_options_and_errors():
    assert make_strategy("fedprox", proximal_mu=0.1).proximal_mu == 0.1
    assert isinstance(make_strategy("FedProx"), FedProx)
    adam = make_strategy("fedadam", eta=0.05, eta_l=0.01, beta_1=0.8, beta_2=0.9, tau=1e-4)
    assert isinstance(adam, FedAdam) and (adam.eta, adam.beta_1, adam.tau) == (0.05, 0.8, 1e-4)
    adagrad = make_strategy("fedadagrad", eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-4)  # betas ignored
    assert isinstance(adagrad, FedAdagrad) and adagrad.beta_1 == 0.0
    assert make_strategy("fgrpo", temperature=2.0, w_max=None).temperature == 2.0  # None -> default
    with pytest.raises(ConfigError, match="fgrpo, reward_weighted, fedavg"):
        make_strategy("fedsgd")
    with pytest.raises(ConfigError, match="bad options"):
        make_strategy("fedavg", proximal_mu=0.1)
    with pytest.raises(ConfigError):
        make_strategy("fedtrimmedavg", beta=0.7)
    assert isinstance(make_strategy("fedtrimmedavg", beta=0.1), FedTrimmedAvg)


def test_fedadam_needs_no_initial_arrays_beyond_configure_train():
    # flwr 1.42's FedOpt family records θ_t in configure_train.
    adam = make_strategy("fedadam", eta=0.1)
    out, _ = run_round(adam, 1, THETA, [reply(0, client_theta(0, 1), 10, 1.0), reply(1, client_theta(1, 1), 10, 1.0)])
    assert out is not None and not np.allclose(out["a"].numpy(), THETA["a"])


def noisy_reply(client_id: int, n: int, reward: float, var: float, inround: float = 0.0, inround_var: float = 0.0):
    """A train reply that also carries the noise statistics the standard_error and in_round gains use."""
    message = reply(client_id, client_theta(client_id, 1), n, reward)
    metrics = message.content["metrics"]
    metrics["reward-mean-var"] = var
    metrics["gain-inround"] = inround
    metrics["gain-inround-var"] = inround_var
    return message


NOISE_GAINS = [("standard_error", False), ("standard_error", True), ("in_round", False), ("in_round", True), ("relative", True)]


def three_rounds(strategy, rounds):
    """rounds: per round a list of (client, n, reward, var, inround, inround_var)."""
    for number, clients in enumerate(rounds, start=1):
        run_round(strategy, number, THETA, [noisy_reply(*c) for c in clients])
    return strategy.last_aggregation


@pytest.mark.parametrize("gain, shrink", NOISE_GAINS)
@settings(max_examples=25, deadline=None)
@given(
    rewards=st.lists(st.tuples(st.floats(-5, 5), st.floats(1e-4, 2), st.floats(-1, 1), st.floats(1e-4, 1)), min_size=6, max_size=6),
    c=st.floats(0.01, 100),
    tau=st.floats(0.1, 10),
)
def test_noise_aware_gains_keep_designs_properties(gain, shrink, rewards, c, tau):
    """Weights sum to 1 and stay in [0, w_max]; scaling one client's rewards by c > 0 changes no weight.

    The paper's relative gain divides by max(|B|, δ), so it is scale invariant only while |B| ≥ δ
    (DESIGN.md): for it the rewards are shifted to [1, 11]. The noise-aware gains need no such care.
    """
    offset = 6.0 if gain == "relative" else 0.0

    def schedule(scale):
        out = []
        for rnd in range(3):
            clients = []
            for cid in (0, 1):
                r, v, d, dv = rewards[rnd * 2 + cid]
                r += offset
                s = scale if cid == 0 else 1.0  # client 0's reward function is c times larger
                clients.append((cid, 10 + 5 * cid, s * r, s * s * v, s * d, s * s * dv))
            out.append(clients)
        return out

    plain = three_rounds(FGRPO(gain=gain, shrink=shrink, temperature=tau, w_max=0.8), schedule(1.0))
    scaled = three_rounds(FGRPO(gain=gain, shrink=shrink, temperature=tau, w_max=0.8), schedule(c))
    assert math.isclose(sum(plain.weights), 1.0, rel_tol=1e-9)
    assert all(0 <= w <= 0.8 + 1e-12 for w in plain.weights)
    np.testing.assert_allclose(plain.weights, scaled.weights, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("gain, shrink", NOISE_GAINS)
def test_noise_aware_gains_with_infinite_temperature_are_fedavg(gain, shrink):
    rounds = [[(0, 10, 1.0, 0.01, 0.5, 0.01), (1, 30, 0.2, 0.04, -0.1, 0.02)]] * 3
    last = three_rounds(FGRPO(gain=gain, shrink=shrink, temperature=math.inf, w_max=1.0), rounds)
    np.testing.assert_allclose(last.weights, [0.25, 0.75])


def test_standard_error_gain_by_hand_and_its_state_survives_a_round_trip():
    s = FGRPO(gain="standard_error", baseline_decay=0.5)
    three_rounds(s, [[(0, 10, 0.2, 0.01, 0, 0), (1, 10, 0.5, 0.04, 0, 0)]])
    last = three_rounds(s, [[(0, 10, 0.2, 0.01, 0, 0), (1, 10, 0.5, 0.04, 0, 0)], [(0, 10, 0.5, 0.01, 0, 0), (1, 10, 0.5, 0.04, 0, 0)]])
    # client 0 in round 3 of this run: B = 0.2, Var B = .25·.01 + .25·.01 = .005 → g = .3/√(.01 + .005)
    assert last.gains[0] == pytest.approx(0.3 / math.sqrt(0.015))
    assert last.gains[1] == 0.0
    restored = FGRPO(gain="standard_error")
    restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert restored.clients[0].baseline_var == s.clients[0].baseline_var


def test_in_round_gain_needs_no_history_and_shrinkage_silences_noise():
    noisy = [(0, 10, 0.5, 0.01, 0.01, 0.04), (1, 10, 0.5, 0.01, 0.3, 0.0009)]  # t = 0.05 vs t = 10
    plain = three_rounds(FGRPO(gain="in_round"), [noisy])
    np.testing.assert_allclose(plain.gains, [0.05, 10.0])
    shrunk = three_rounds(FGRPO(gain="in_round", shrink=True), [noisy])
    assert abs(shrunk.gains[0]) < 0.01 and shrunk.gains[1] == pytest.approx(10.0 * 100 / 101)


# --------------------------------------------------------------------------- the default cap (issue 16)


def liar_weights(strategy, rounds):
    """Client 0 reports reward 10^round (fake, ever-growing gain); the others a flat 0.5. Its weight per round."""
    weights = []
    for rnd, present in enumerate(rounds, start=1):
        replies = [reply(c, client_theta(c, rnd), 10 * (c + 1), 10.0**rnd if c == 0 else 0.5) for c in present]
        run_round(strategy, rnd, THETA, replies)
        last = strategy.last_aggregation
        assert math.isclose(sum(last.weights), 1.0, rel_tol=1e-9)
        weights.append(dict(zip(last.client_ids, last.weights)).get(0))
    return weights


def test_fgrpo_default_holds_a_liar_to_a_tilt_of_1_25_and_the_cap_to_one_and_a_half_equal_shares():
    """The liar holds 10 of 100 examples and reports 10^round; the others a flat 0.5 (gain ≈ 0, tilt ≈ 1)."""
    assert FGRPO().w_max == "auto" and FGRPO().max_tilt == 1.25
    default = liar_weights(FGRPO(), [[0, 1, 2, 3]] * 4)
    # Round 1, gain 0 at first sight: its data share, 0.1, raised to 0.1/0.96 by the cap that holds the
    # 40-example owner to 0.375. Then its tilt is 1.25 whatever it reports: 0.125/1.025, and again the
    # 40-example owner's excess over 0.375 is shared out, giving exactly 0.125 (the cap alone gave it 0.375).
    assert default[0] == pytest.approx(0.1 / 0.96)
    assert default[1:] == pytest.approx([0.125] * 3)
    capped = liar_weights(FGRPO(max_tilt="off"), [[0, 1, 2, 3]] * 4)  # the cap alone: 1.5/4
    assert capped[1:] == pytest.approx([0.375] * 3)
    uncapped = liar_weights(FGRPO(w_max=1.0, max_tilt="off"), [[0, 1, 2, 3]] * 4)  # the overrides still work
    assert uncapped[-1] > 0.99
    assert liar_weights(FGRPO(w_max=0.3, max_tilt="off"), [[0, 1, 2, 3]] * 4)[-1] == pytest.approx(0.3)


def test_fgrpo_max_tilt_holds_a_liar_near_its_data_share_below_the_cap():
    """max_tilt = 1.5: the liar (10 of 100 examples) gets at most 1.5× its prior against the flat others."""
    weights = liar_weights(FGRPO(max_tilt=1.5), [[0, 1, 2, 3]] * 4)
    # Tilts in [1/1.5, 1.5]: at most 1.5·0.1 / (1.5·0.1 + 0.9/1.5) = 0.2 whatever the others report; "auto" alone: 0.375.
    assert all(w <= 0.2 for w in weights[1:])
    assert weights[1:] == pytest.approx([1.5 * 0.1 / (1.5 * 0.1 + 0.9)] * 3, abs=0.005)  # the others' gains are ≈ 0
    assert FGRPO(max_tilt="off").max_tilt is None
    with pytest.raises(ConfigError, match="max_tilt"):
        FGRPO(max_tilt=0.9)


def test_fgrpo_default_with_two_clients_is_equal_weights():
    """K = 2: a cap below ½ is infeasible, so "auto" gives ½ each: FGRPO reduces to equal (not n_k) weights."""
    s = FGRPO()
    liar_weights(s, [[0, 1]] * 3)
    assert s.last_aggregation.weights == pytest.approx([0.5, 0.5])
    assert s.last_aggregation.gains[0] > 1  # the fake gain is there, it just buys nothing


def test_fgrpo_default_cap_follows_the_clients_of_each_round_under_partial_participation():
    """The liar absent some rounds, present with 1, 2 or 3 others: its weight is capped by that round's K."""
    rounds = [[0, 1, 2, 3], [1, 2], [0, 3], [0, 1, 2], [2, 3], [0, 1, 2, 3]]
    weights = liar_weights(FGRPO(), rounds)
    for present, weight in zip(rounds, weights):
        if 0 in present:
            k = len(present)
            assert weight <= max(1 / k, min(0.5, 1.5 / k)) + 1e-12
        else:
            assert weight is None
    assert weights[2] == pytest.approx(0.5)  # K = 2: ½ each, whatever it reports
    assert weights[3] == pytest.approx(0.2)  # K = 3 (10, 20, 30 examples): 1.25 × 1/6 against 5/6, below the cap ½
    assert weights[5] == pytest.approx(0.125)  # K = 4: max_tilt binds far below the cap 0.375
    assert liar_weights(FGRPO(max_tilt="off"), rounds)[5] == pytest.approx(0.375)


def test_fgrpo_accepts_auto_and_refuses_other_words():
    assert FGRPO(w_max="auto", w_min=0.9).w_max == "auto"  # w_min is clipped to 1/K per round
    with pytest.raises(ConfigError, match="w_max"):
        FGRPO(w_max="max")
