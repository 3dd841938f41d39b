"""FedSA-LoRA: the server averages LoRA A matrices, each owner's B stays on its node and personalizes its model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fgrpo.config import config_from_dict, dump_config
from fgrpo.federation import clientapp, wire
from fgrpo.federation.fedsa import personal_part, personalize, shared_part, upload_problem, with_global_b

A, B, BIAS = "layer.lora_A.default.weight", "layer.lora_B.default.weight", "head.bias"


def adapter(value: float) -> dict[str, np.ndarray]:
    return {A: np.full((2, 3), value, np.float32), B: np.full((4, 2), -value, np.float32), BIAS: np.full(4, value, np.float32)}


def test_a_only_uploads_average_a_with_fedavg_weights_and_leave_b_untouched():
    theta = adapter(0.5)
    uploads = [shared_part(adapter(v)) for v in (1.0, 3.0)]
    assert set(uploads[0]) == {A, BIAS}  # B is the owner's: it is not uploaded
    filled = [with_global_b(u, theta) for u in uploads]
    weights = (0.25, 0.75)  # n_k / Σ n
    average = {k: sum(w * f[k] for w, f in zip(weights, filled)) for k in theta}  # what FedAvg computes
    np.testing.assert_allclose(average[A], 2.5)  # 0.25·1 + 0.75·3
    np.testing.assert_allclose(average[BIAS], 2.5)
    np.testing.assert_array_equal(average[B], theta[B])  # θ_t's B: no client moved it


def test_an_owner_model_is_the_global_a_with_its_own_b():
    mine = personal_part(adapter(7.0))
    assert set(mine) == {B}
    model = personalize(adapter(1.0), mine)
    np.testing.assert_array_equal(model[A], adapter(1.0)[A])
    np.testing.assert_array_equal(model[B], mine[B])
    np.testing.assert_array_equal(personalize(adapter(1.0), None)[B], adapter(1.0)[B])  # before its first round


def test_upload_problem_names_what_is_wrong():
    theta = adapter(0.0)
    assert upload_problem(shared_part(adapter(1.0)), theta) is None
    assert "carries B matrices" in upload_problem(adapter(1.0), theta)
    assert "missing" in upload_problem({A: theta[A]}, theta)
    assert "wrong shape" in upload_problem({A: np.zeros((3, 3), np.float32), BIAS: theta[BIAS]}, theta)


def fedsa_config(tmp_path, **federation):
    from conftest import small_config_dict

    fed = {"method": "fedsa", "rounds": 2, "local_steps": 2, "min_train_clients": 1, **federation}
    # partial credit and 4 × 8 completions a step: rewards that vary within groups, so every step has a gradient
    data = small_config_dict(tmp_path, federation=fed, training={"prompts_per_step": 4}, grpo={"num_generations": 8})
    data["tasks"]["rewards"] = [{"name": "partial_credit"}]
    return config_from_dict(data)


def run(app, config):
    from fgrpo.deploy.runtime import node_configs
    from fgrpo.federation.inprocess import InProcessGrid
    from fgrpo.federation.server import run_federation

    grid = InProcessGrid(app, node_configs(config), run_config={wire.CONFIG_KEY: dump_config(config)})
    return run_federation(grid, config, Path(config.output.dir), progress=False)


def records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_the_server_refuses_any_upload_but_the_a_matrices_and_goes_on(tmp_path):
    """Client 0 uploads its B too, client 1 a wrongly shaped A: both are failures, client 2's A is averaged."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        arrays = {k: v.numpy() + np.float32(0.01) for k, v in msg.content[wire.ARRAYS].items()}
        sent = arrays if pid == 0 else shared_part(arrays)
        if pid == 1:
            sent = {k: (v[:1] if "lora_A" in k else v) for k, v in sent.items()}
        metrics = {"client-id": pid, "num-examples": 10, "reward-mean": 0.5, "reward-std": 0.1, "accuracy": 0.5,
                   "train-time": 0.01, "unit-weight": 1}
        record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in sent.items()})
        return Message(RecordDict({wire.ARRAYS: record, wire.METRICS: MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        metrics = {"client-id": pid, "num-examples": 4, "acc_heldout": 0.5, "acc/add": 0.5, "n/add": 4}
        return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=msg)

    app.query()(clientapp.client_init)
    config = fedsa_config(tmp_path, num_clients=3, rounds=1)
    summary = run(app, config)
    assert summary["rounds"] == 1
    reasons = {r["client"]: r["reason"] for r in records(Path(config.output.dir), "failure")}
    assert set(reasons) == {0, 1}
    assert "carries B matrices" in reasons[0] and "wrong shape" in reasons[1]
    assert [r["client"] for r in records(Path(config.output.dir), "client") if "agg/weight" in r] == [2]


def test_two_rounds_in_process_b_stays_on_each_node_and_personalizes_it(tmp_path, monkeypatch):
    """The tiny model, 2 rounds of 2 steps: replies carry A only; each node trains and evaluates with its own B."""
    starts: dict[tuple[int, int], dict] = {}
    evaluated: list[tuple[int, dict]] = []
    real_round, real_eval = clientapp.local_round, clientapp.evaluate_arrays

    def spy_round(learner, start, data, **kwargs):
        starts[(data.client_id, kwargs["seed"])] = {k: v.copy() for k, v in start.items()}
        return real_round(learner, start, data, **kwargs)

    def spy_eval(learner, arrays, heldout, max_len):
        evaluated.append((len(evaluated), {k: v.copy() for k, v in arrays.items()}))
        return real_eval(learner, arrays, heldout, max_len)

    monkeypatch.setattr(clientapp, "local_round", spy_round)
    monkeypatch.setattr(clientapp, "evaluate_arrays", spy_eval)
    uploads: list[set[str]] = []
    kept: list[tuple[int, dict]] = []  # (client, its B after each round it trained)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = clientapp.client_train(msg, context)
        uploads.append(set(reply.content[wire.ARRAYS].keys()))
        kept.append((int(context.node_config["partition-id"]), wire.record_to_arrays(context.state[wire.PERSONAL_KEY])))
        return reply

    app.evaluate()(clientapp.client_evaluate)
    app.query()(clientapp.client_init)
    config = fedsa_config(tmp_path)
    summary = run(app, config)
    assert summary["rounds"] == 2 and not records(Path(config.output.dir), "failure")
    assert len(uploads) == 4 and all(keys and not any("lora_B" in k for k in keys) for keys in uploads)
    assert all(any("lora_A" in k for k in keys) for keys in uploads)
    # Each node kept trained, non-zero B matrices of its own, and they differ between the owners.
    first = dict(kept[:2])
    final = dict(kept[2:])
    assert set(first) == set(final) == {0, 1}
    for b in [*first.values(), *final.values()]:
        assert b and all("lora_B" in k for k in b) and any(np.abs(v).max() > 0 for v in b.values())
    assert any(not np.array_equal(final[0][k], final[1][k]) for k in final[0])
    # Round 2 trained from the sent global A with the node's own B from round 1.
    round2 = list(starts.values())[2:]
    for start in round2:
        b = {k: v for k, v in start.items() if "lora_B" in k}
        assert any(all(np.array_equal(b[k], mine[k]) for k in mine) for mine in first.values())
    a_sent = [{k: v for k, v in start.items() if "lora_A" in k} for start in round2]
    assert all(np.array_equal(a_sent[0][k], a_sent[1][k]) for k in a_sent[0])  # one global A for both
    # The last evaluation scored each owner's personalized model: the global A with its final B.
    for _, arrays in evaluated[-2:]:
        assert any(all(np.array_equal(arrays[k], mine[k]) for k in mine) for mine in final.values())
    # The server's adapter: the averaged A and θ₀'s B (peft's zeros); the personalized models stay per owner.
    from safetensors.numpy import load_file

    saved = load_file(str(Path(config.output.dir) / "adapter" / "adapter_model.safetensors"))
    assert any("lora_A" in k and np.abs(v).max() > 0 for k, v in saved.items())
    assert all(np.abs(v).max() == 0 for k, v in saved.items() if "lora_B" in k)
    assert all(r["client/update_norm"] > 0 for r in records(Path(config.output.dir), "client") if "client/update_norm" in r)
    rounds = records(Path(config.output.dir), "round")
    assert rounds[1]["comm/bytes_up"] < rounds[1]["comm/bytes_down"]  # A goes up; A and B come down
