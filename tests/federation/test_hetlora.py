"""HetLoRA's rank-wise aggregation on hand-made matrices: truncate, pad, and the coverage correction."""

from __future__ import annotations

import numpy as np
import pytest

from fgrpo.federation.hetlora import (
    pad_to_full,
    rank_coverage,
    rankwise_average,
    rankwise_correction,
    truncate,
    zero_beyond,
)

A, B, BIAS = "layer.lora_A.default.weight", "layer.lora_B.default.weight", "head.bias"


def adapter(rank: int, value: float, out: int = 2, inp: int = 3) -> dict[str, np.ndarray]:
    """A (rank, in) whose row j is value + j, B (out, rank) whose column j is −(value + j), a non-LoRA bias."""
    rows = value + np.arange(rank, dtype=np.float32)
    return {A: np.repeat(rows[:, None], inp, axis=1), B: -np.repeat(rows[None, :], out, axis=0), BIAS: np.full(out, value, np.float32)}


def test_truncate_and_pad_keep_the_first_components_and_fill_the_rest_from_theta():
    full = adapter(4, 10.0)
    low = truncate(full, 2)
    assert low[A].shape == (2, 3) and low[B].shape == (2, 2) and low[BIAS].shape == (2,)
    np.testing.assert_array_equal(low[A][:, 0], [10, 11])
    theta = adapter(4, 0.0)
    padded = pad_to_full(low, theta)
    np.testing.assert_array_equal(padded[A][:, 0], [10, 11, 2, 3])  # components 2, 3: θ_t's (a zero update)
    np.testing.assert_array_equal(padded[B][0], [-10, -11, -2, -3])
    zeroed = zero_beyond(full, 1)
    np.testing.assert_array_equal(zeroed[A][:, 0], [10, 0, 0, 0])
    np.testing.assert_array_equal(zeroed[B][0], [-10, 0, 0, 0])


def test_coverage_is_the_weight_of_the_clients_that_have_each_component():
    # ranks 4, 2, 1 with weights 0.5, 0.3, 0.2: component 0 all, 1 the first two, 2 and 3 the first only
    np.testing.assert_allclose(rank_coverage([4, 2, 1], [0.5, 0.3, 0.2], 4), [1.0, 0.8, 0.5, 0.5])


def test_equal_ranks_leave_the_weighted_average_unchanged():
    theta = adapter(4, 0.0)
    uploads = [adapter(4, v) for v in (1.0, 5.0)]
    fedavg = {k: 0.25 * uploads[0][k] + 0.75 * uploads[1][k] for k in theta}
    corrected = rankwise_correction(theta, fedavg, [4, 4], [0.25, 0.75])
    for key in theta:
        np.testing.assert_allclose(corrected[key], fedavg[key], rtol=1e-6)


def test_mixed_ranks_average_each_component_over_the_clients_that_have_it():
    theta = adapter(4, 0.0)
    ranks, weights = [4, 2, 1], [0.5, 0.3, 0.2]
    uploads = [truncate(adapter(4, v), r) for v, r in zip((1.0, 3.0, 7.0), ranks)]
    padded = [pad_to_full(u, theta) for u in uploads]
    strategy = {k: sum(w * p[k] for w, p in zip(weights, padded)) for k in theta}  # what FedAvg computes
    corrected = rankwise_correction(theta, strategy, ranks, weights)
    # Hand values of A's column 0 (row j of upload k is v_k + j):
    # j=0: (0.5·1 + 0.3·3 + 0.2·7)/1 = 2.8; j=1: (0.5·2 + 0.3·4)/0.8 = 2.75; j=2: 3 (client 0 only); j=3: 4
    np.testing.assert_allclose(corrected[A][:, 0], [2.8, 2.75, 3.0, 4.0], rtol=1e-6)
    np.testing.assert_allclose(corrected[B][1], [-2.8, -2.75, -3.0, -4.0], rtol=1e-6)
    np.testing.assert_allclose(corrected[BIAS], [2.8, 2.8], rtol=1e-6)  # not a LoRA matrix: the plain average
    reference = rankwise_average(theta, uploads, ranks, weights)
    for key in theta:
        np.testing.assert_allclose(corrected[key], reference[key], rtol=1e-6)
    # Zero-padding alone (without the correction) would shrink components 1..3 toward θ_t:
    assert strategy[A][1, 0] == pytest.approx(0.5 * 2 + 0.3 * 4 + 0.2 * 1)  # client 2's θ_t value 1, not its own


def test_a_component_no_client_trained_keeps_theta():
    theta = adapter(4, 0.0)
    uploads = [truncate(adapter(4, 9.0), 2)]
    corrected = rankwise_correction(theta, pad_to_full(uploads[0], theta), [2], [1.0])
    np.testing.assert_allclose(corrected[A][:, 0], [9, 10, 2, 3])


def test_three_owners_of_ranks_2_4_8_train_in_process_and_the_server_keeps_rank_8(tmp_path):
    """End to end on the tiny model: each owner uploads its own rank, the server aggregates rank-wise at rank 8."""
    import json

    from conftest import small_config_dict
    from safetensors.numpy import load_file

    from fgrpo.config import config_from_dict
    from fgrpo.deploy.runtime import run_simulation

    owners = [{"families": [{"name": "add", "difficulty": 1}], "lora_rank": r} for r in (2, 4, 8)]
    data = small_config_dict(
        tmp_path,
        model={"lora": {"rank": 8, "alpha": 16}},
        federation={"method": "fedavg", "num_clients": 3, "min_train_clients": 3, "rounds": 1, "clients": owners},
    )
    data["tasks"]["train_per_family"] = 16
    summary = run_simulation(config_from_dict(data), progress=False)
    assert summary["rounds"] == 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["kind"] == "failure"]
    trained = {r["client"]: r["client/lora_rank"] for r in records if r["kind"] == "client" and "client/lora_rank" in r}
    assert trained == {0: 2, 1: 4, 2: 8}
    adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    a_shapes = {v.shape[0] for k, v in adapter.items() if "lora_A" in k}
    assert a_shapes == {8}  # the server's adapter stays at the largest rank


def test_mixed_ranks_are_refused_by_methods_that_are_no_weighted_average_and_above_the_servers_rank(tmp_path):
    from conftest import small_config_dict

    from fgrpo.config import config_from_dict
    from fgrpo.errors import ConfigError

    def config(method, ranks, **federation):
        owners = [{"families": [{"name": "add", "difficulty": 1}], "lora_rank": r} for r in ranks]
        fed = {"method": method, "num_clients": len(ranks), "min_train_clients": 1, "clients": owners, **federation}
        return config_from_dict(small_config_dict(tmp_path, model={"lora": {"rank": 8}}, federation=fed))

    with pytest.raises(ConfigError, match="fedadam.*cannot aggregate mixed LoRA ranks"):
        config("fedadam", [4, 8])
    with pytest.raises(ConfigError, match=r"lora_rank = 16 exceeds model.lora.rank = 8"):
        config("fedavg", [16, 8])
    with pytest.raises(ConfigError, match="compression"):
        config("fgrpo", [4, 8], compression={"codec": "int8"})
    assert config("fedadam", [8, 8]).federation.method == "fedadam"  # equal ranks: every method


def test_an_upload_is_accepted_only_in_the_shape_of_its_declared_rank():
    from fgrpo.federation.hetlora import rank_problem

    theta = adapter(4, 0.0)
    assert rank_problem(2, truncate(adapter(4, 1.0), 2), theta, allow_lower=True) is None
    assert "expected (2, 3) at lora-rank 2" in rank_problem(2, truncate(adapter(4, 1.0), 3), theta, allow_lower=True)
    assert "[1, 4]" in rank_problem(5, adapter(4, 1.0), theta, allow_lower=True)
    assert "cannot aggregate mixed" in rank_problem(2, truncate(adapter(4, 1.0), 2), theta, allow_lower=False)
    assert "missing" in rank_problem(4, {A: theta[A]}, theta, allow_lower=True)
