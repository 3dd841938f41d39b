"""A client's local round and its helpers, and what the ClientApp does to an upload."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fgrpo.config import config_from_dict
from fgrpo.federation import wire
from fgrpo.federation.client import ClientData, local_round, pooled_std, round_seed
from fgrpo.federation.clientapp import encode_upload, simulate_attack


def test_pooled_std_of_equal_batches_equals_the_std_of_their_union():
    rng = np.random.default_rng(3)
    batches = [rng.normal(loc, 2.0, size=16) for loc in (0.0, 1.5, -3.0)]
    means, stds = [b.mean() for b in batches], [b.std() for b in batches]  # population stds
    assert pooled_std(means, stds) == pytest.approx(np.concatenate(batches).std(), rel=1e-12)
    assert pooled_std([2.0], [0.0]) == 0.0
    assert pooled_std([1.0, 1.0], [0.0, 0.0]) == 0.0  # never the sqrt of a tiny negative


def test_round_seed_is_deterministic_distinct_and_a_valid_seed():
    seeds = {round_seed(s, k, t) for s in range(3) for k in range(20) for t in range(20)}
    assert len(seeds) == 3 * 20 * 20
    assert round_seed(0, 5, 7) == round_seed(0, 5, 7)
    assert all(0 <= s < 2**31 for s in seeds)
    assert round_seed(10**12, 10**6, 10**3) < 2**31


def test_local_round_is_seeded_starts_from_the_given_arrays_and_reports_its_statistics(small_config):
    from fgrpo.core.model import get_trainable_arrays
    from fgrpo.core.pipeline import build_learner, build_task_pool

    learner = build_learner(small_config, 0)
    train, test = build_task_pool(small_config.tasks)
    data = ClientData(0, train, test)
    start = get_trainable_arrays(learner.model)

    def run(seed, begin=start):
        arrays, metrics = local_round(learner, begin, data, local_steps=2, prompts_per_step=2, seed=seed)
        return {k: v.copy() for k, v in arrays.items()}, metrics

    first, metrics = run(11)
    again, metrics_again = run(11)
    assert set(first) == set(start) and all(first[k].shape == start[k].shape for k in start)
    assert all(np.array_equal(first[k], again[k]) for k in first), "same seed, same start: same θ_k"
    shifted, _ = run(11, {k: v + 1.0 for k, v in start.items()})
    assert all(not np.array_equal(first[k], shifted[k]) for k in first), "the round starts from the arrays it is given"
    assert {wire.REWARD_MEAN, wire.REWARD_STD, wire.ACCURACY, wire.TRAIN_TIME} <= set(metrics)
    assert metrics[wire.REWARD_MEAN] == metrics_again[wire.REWARD_MEAN]
    assert metrics[wire.REWARD_STD] >= 0 and 0 <= metrics[wire.ACCURACY] <= 1


def attack_config(**attack):
    return config_from_dict({"federation": {"num_clients": 3, "attack": {"clients": [1], **attack}}})


def test_simulate_attack_scales_the_attackers_update_and_lies_about_its_reward():
    start = {"w": np.array([1.0, 2.0], np.float32)}
    trained = {"w": np.array([2.0, 0.0], np.float32)}
    metrics = {wire.REWARD_MEAN: 0.3}
    honest = simulate_attack(attack_config(update_scale=10.0, reward_growth=3.0), 0, 2, start, trained, metrics)
    assert honest == (trained, metrics)
    arrays, lied = simulate_attack(attack_config(update_scale=10.0, reward_growth=3.0), 1, 2, start, trained, metrics)
    np.testing.assert_array_equal(arrays["w"], np.array([11.0, -18.0], np.float32))  # θ + 10 (θ_k − θ)
    assert arrays["w"].dtype == np.float32
    assert lied[wire.REWARD_MEAN] == 9.0 and metrics[wire.REWARD_MEAN] == 0.3  # 3^round; the input is not mutated
    _, first_round = simulate_attack(attack_config(reward_growth=3.0), 1, 0, start, trained, metrics)
    assert first_round[wire.REWARD_MEAN] == 3.0  # round 0 counts as round 1


def test_encode_upload_passes_through_or_compresses_with_error_feedback_in_the_nodes_state():
    from fgrpo.federation.compression import apply_delta, decode_delta

    rng = np.random.default_rng(0)
    start = {"w": rng.standard_normal(300).astype(np.float32)}
    trained = {"w": start["w"] + rng.standard_normal(300).astype(np.float32) * 1e-2}
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    plain = config_from_dict({})
    assert encode_upload(plain, start, trained, context) is trained and wire.RESIDUAL_KEY not in context.state

    int8 = config_from_dict({"federation": {"compression": {"codec": "int8", "error_feedback": True}}})
    encoded = encode_upload(int8, start, trained, context)
    decoded = apply_delta(start, decode_delta(encoded, start, "int8", int8.federation.compression.block_size))
    residual = wire.record_to_arrays(context.state[wire.RESIDUAL_KEY])
    # What was not sent is kept for the next upload: sent + residual = the true update.
    np.testing.assert_allclose(decoded["w"] - start["w"] + residual["w"], trained["w"] - start["w"], atol=1e-6)
    assert np.abs(decoded["w"] - trained["w"]).max() > 0  # int8 is lossy: the residual is not trivially zero
