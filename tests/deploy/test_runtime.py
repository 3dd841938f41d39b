"""End to end: every method runs 2 rounds × 2 clients on the tiny model through the Flower app in-process."""

import json
import math

import numpy as np

import pytest

from fgrpo.config import METHODS, config_from_dict
from fgrpo.deploy.runtime import run_comparison, run_simulation


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_fgrpo_run_writes_rounds_clients_weights_and_adapter(tmp_path):
    from conftest import small_config_dict

    config = config_from_dict(small_config_dict(tmp_path))
    summary = run_simulation(config, progress=False)
    run_dir = tmp_path / "run"
    recs = records(run_dir)
    rounds = [r for r in recs if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all("global/acc_heldout" in r for r in rounds)
    assert {"global/acc/add", "global/acc/sort"} <= set(rounds[0])
    trained = [r for r in recs if r["kind"] == "client" and "agg/weight" in r]
    assert sorted({r["client"] for r in trained}) == [0, 1]
    for server_round in (1, 2):
        weights = [r["agg/weight"] for r in trained if r["round"] == server_round]
        assert sum(weights) == pytest.approx(1.0)
    # first participation: no history, gain 0
    assert all(r["agg/gain"] == 0.0 for r in trained if r["round"] == 1)
    # reward stats live on each client's own scale: add in [0, 10], sort in [-1, 1]
    by_client = {r["client"]: r for r in trained if r["round"] == 1}
    assert -1.0 <= by_client[1]["client/reward_mean"] <= 1.0
    assert 0.0 <= by_client[0]["client/reward_mean"] <= 10.0
    assert rounds[1]["comm/bytes_up"] > 0 and rounds[1]["comm/bytes_down"] == rounds[1]["comm/bytes_up"]
    assert summary["final/acc_heldout"] == rounds[-1]["global/acc_heldout"]
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    # The round's time splits into parts that are measured separately and cannot exceed it.
    for r in rounds[1:]:
        parts = [r["time/client_train_s"], r["time/aggregate_s"], r["time/eval_s"], r["time/wire_s"]]
        assert all(p > 0 for p in parts) and sum(parts) <= r["time/round_s"]
    train_s = {r["round"]: 0.0 for r in rounds[1:]}
    for r in trained:
        train_s[r["round"]] += r["client/train_s"]
    assert [r["time/client_train_s"] for r in rounds[1:]] == pytest.approx(list(train_s.values()))


@pytest.mark.slow
def test_every_method_runs_two_rounds(tmp_path):
    from conftest import small_config_dict

    config = config_from_dict(small_config_dict(tmp_path))
    summaries = run_comparison(config, list(METHODS), [0], tmp_path / "cmp", progress=False)
    assert [s["method"] for s in summaries] == list(METHODS)
    for method in METHODS:
        recs = records(tmp_path / "cmp" / method / "seed0")
        assert [r["round"] for r in recs if r["kind"] == "round"] == [0, 1, 2]
    central = records(tmp_path / "cmp" / "centralized" / "seed0")
    # centralized = one client holding the pooled data, doing the work of both clients
    assert {r["client"] for r in central if r["kind"] == "client"} == {0}
    from fgrpo.reporting.report import write_report

    report = write_report(tmp_path / "cmp")
    first_cells = {line.split("|")[1].strip() for line in report.read_text().splitlines() if line.startswith("| ")}
    assert set(METHODS) <= first_cells, f"methods without a row in the report's tables: {set(METHODS) - first_cells}"


@pytest.mark.slow
def test_same_seed_same_result(tmp_path):
    from conftest import small_config_dict

    a = run_simulation(config_from_dict(small_config_dict(tmp_path / "a")), progress=False)
    b = run_simulation(config_from_dict(small_config_dict(tmp_path / "b")), progress=False)
    def strip_timing(rs):
        return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rs if r["kind"] == "client"]

    ra = strip_timing(records(tmp_path / "a" / "run"))
    rb = strip_timing(records(tmp_path / "b" / "run"))
    assert ra == rb and a["final/acc_heldout"] == b["final/acc_heldout"]


def test_local_only_is_scored_on_its_own_split_and_on_the_global_set_and_sends_nothing(tmp_path):
    from conftest import small_config_dict

    data = small_config_dict(tmp_path)
    data["federation"] = {**data["federation"], "method": "local", "partition": {"scheme": "by_family"}}
    summary = run_simulation(config_from_dict(data), progress=False)
    rounds = [r for r in records(tmp_path / "run") if r["kind"] == "round"]
    assert all(r["comm/bytes_up"] == 0 and r["comm/bytes_down"] == 0 for r in rounds[1:])
    # by_family: each owner's own split holds one family, the global set both
    assert all(0.0 <= r["global/acc_global_set"] <= 1.0 for r in rounds)
    assert summary["final/acc_global_set"] == rounds[-1]["global/acc_global_set"]
    from fgrpo.reporting.report import write_report

    text = write_report(tmp_path / "run").read_text()
    assert "Final acc, global held-out set" in text and "0 B" in text


def test_fedavg_server_learning_rate_scales_the_aggregate_step(tmp_path):
    """θ ← θ + η (aggregate − θ): runs with η = 0.5, 1 and 2 lie on one line through θ₀."""
    import numpy as np

    from conftest import small_config_dict
    from fgrpo.federation.checkpoint import load_checkpoint

    finals = {}
    for eta in (0.5, 1.0, 2.0):
        data = small_config_dict(tmp_path / str(eta))
        # norm_clip off: in this tiny scenario one of the two clients can send a zero update (no reward
        # signal), which makes the round's lower-median norm 0 and the default clip would stop the step.
        data["federation"] = {**data["federation"], "method": "fedavg", "rounds": 1, "server_lr": eta, "defense": {"norm_clip": "off"}}
        data["training"] = {**data["training"], "prompts_per_step": 8}  # enough groups that some have reward spread
        run_simulation(config_from_dict(data), progress=False)
        finals[eta] = load_checkpoint(tmp_path / str(eta) / "run").arrays
    for key in finals[1.0]:
        one, two, half = (finals[e][key].astype(np.float64) for e in (1.0, 2.0, 0.5))
        np.testing.assert_allclose(half, 1.5 * one - 0.5 * two, atol=1e-6)
    assert any(not np.allclose(finals[1.0][k], finals[2.0][k]) for k in finals[1.0])  # the step moved something


@pytest.mark.parametrize("gain", ["standard_error", "in_round"])
def test_noise_aware_fgrpo_gains_run_end_to_end_and_log_finite_gains(tmp_path, gain):
    from conftest import small_config_dict

    data = small_config_dict(tmp_path)
    data["federation"] = {**data["federation"], "rounds": 2, "fgrpo": {"gain": gain, "shrink": True}}
    run_simulation(config_from_dict(data), progress=False)
    gains = [r["agg/gain"] for r in records(tmp_path / "run") if r["kind"] == "client" and "agg/gain" in r]
    assert len(gains) == 4 and all(math.isfinite(g) for g in gains)


# ---------------------------------------------------------------------- workers and threads


def test_execution_plan_splits_the_cores(tmp_path, monkeypatch):
    from conftest import small_config_dict

    import fgrpo.core.threads as threads
    from fgrpo.deploy.runtime import execution_plan

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)

    def plan(**sections):
        data = small_config_dict(tmp_path, **sections)
        data["runtime"] = sections.get("runtime", {})
        return execution_plan(config_from_dict(data))

    cpu = {"device": "cpu"}
    four = {"num_clients": 4, "min_train_clients": 1}
    assert plan(model=cpu, federation=four) == (2, 1)  # the quickstart's shape on a 2-core laptop
    assert plan(model=cpu, federation={**four, "method": "centralized"}) == (1, 2)  # one node: one worker, every core
    assert plan(model=cpu, federation=four, runtime={"workers": 1}) == (1, 2)
    assert plan(model=cpu, federation=four, runtime={"workers": 8}) == (4, 1)  # never more workers than nodes
    assert plan(model=cpu, federation=four, runtime={"threads": 2}) == (2, 2)  # the user's explicit choice
    assert plan(model={"device": "cuda"}, federation=four) == (1, 2)  # a GPU: one process holds the model
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert plan(model=cpu, federation=four, runtime={"workers": 1}) == (1, 1)  # the user's budget is honoured


@pytest.mark.slow
def test_two_workers_give_the_same_adapter_and_metrics_as_one(tmp_path):
    """The clients of a round run in two worker processes: same seed, same final adapter and metrics."""
    from safetensors.numpy import load_file

    from conftest import small_config_dict

    def run(workers: int):
        data = small_config_dict(tmp_path / f"w{workers}")
        data["federation"] = {**data["federation"], "rounds": 2, "local_steps": 2, "keep_optimizer_state": True}
        data["training"] = {**data["training"], "prompts_per_step": 8}  # enough groups that some have reward spread
        data["runtime"] = {"workers": workers, "threads": 1}  # one thread both ways: the same float reductions
        # In 2 steps one of the 2 clients may see no reward variance; its zero update would make the default
        # clip's lower median 0 and freeze the round (docs/robustness.md): this test is about workers.
        data["federation"]["defense"] = {"norm_clip": "off"}
        run_simulation(config_from_dict(data), progress=False)
        run_dir = tmp_path / f"w{workers}" / "run"
        return load_file(str(run_dir / "adapter" / "adapter_model.safetensors")), records(run_dir)

    (adapter1, records1), (adapter2, records2) = run(1), run(2)
    assert sorted(adapter1) == sorted(adapter2)
    for name in adapter1:
        np.testing.assert_allclose(adapter2[name], adapter1[name], rtol=1e-6, atol=1e-7)

    def results(rs):
        return [{k: v for k, v in r.items() if not k.endswith("_s") and not k.startswith("time/")} for r in rs if r["kind"] in ("round", "client")]

    assert results(records2) == results(records1)
    assert any(not np.allclose(adapter1[name], 0) for name in adapter1 if "lora_B" in name)  # training moved the adapter


def test_the_clientapp_takes_its_thread_budget_at_first_use(tmp_path):
    import torch

    from conftest import small_config_dict
    from fgrpo.config import dump_config
    from fgrpo.federation.clientapp import _shared_learner

    data = small_config_dict(tmp_path)
    data["runtime"] = {"threads": 1}
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _shared_learner(dump_config(config_from_dict(data)))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_supernodes_of_a_local_federation_share_the_cores(tmp_path, monkeypatch):
    import fgrpo.deploy.supervisor as supervisor

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("fgrpo.core.threads.available_cores", lambda: 8)
    nodes = [{"partition-id": i, "num-partitions": 4} for i in range(4)]
    federation = supervisor.LocalFederation(nodes, tmp_path)
    assert federation.threads == 2 and federation.env["OMP_NUM_THREADS"] == "2"
    assert supervisor.LocalFederation(nodes, tmp_path, threads=3).env["OMP_NUM_THREADS"] == "3"


def test_runs_of_a_comparison_share_one_worker_pool(tmp_path, monkeypatch):
    import fgrpo.core.threads as threads
    from conftest import small_config_dict
    from fgrpo.deploy.runtime import shared_pools, with_method

    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    data = small_config_dict(tmp_path)
    data["model"] = {**data["model"], "device": "cpu"}
    data["runtime"] = {"workers": "auto", "threads": 1}
    config = config_from_dict(data)
    with shared_pools() as pool_for:
        fgrpo, fedavg = (pool_for(with_method(config, m, 0, tmp_path / m)) for m in ("fgrpo", "fedavg"))
        assert fgrpo is fedavg and (fgrpo.workers, fgrpo.threads) == (2, 1)  # started once, not per run
        assert pool_for(with_method(config, "centralized", 0, tmp_path / "c")) is None  # one node: no workers


# ---------------------------------------------------------------------- user reward code and round timeouts

HOSTILE_REWARDS = {
    "exits_on_import": ("import sys\nsys.exit(0)\n", "called sys.exit(0)"),
    "interrupts_on_import": ("raise KeyboardInterrupt\n", "raised KeyboardInterrupt itself"),
    "ends_its_process": ("import os\ndef fn(prompts, completions, **kw):\n    os._exit(3)\n", "worker process"),
    "sleeps": ("import time\ndef fn(prompts, completions, **kw):\n    time.sleep(3600)\n", "round_timeout_s"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_REWARDS))
def test_reward_code_cannot_end_silence_or_hang_a_one_worker_run(tmp_path, monkeypatch, case):
    """One worker: a reward module that exits, interrupts, ends its process or never returns is one clear error."""
    import time

    from typer.testing import CliRunner

    from conftest import small_config_dict
    from fgrpo.cli import app
    from fgrpo.config import dump_config

    body, expected = HOSTILE_REWARDS[case]
    module = f"hostile_{case}_mod"
    (tmp_path / f"{module}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{__import__('os').environ.get('PYTHONPATH', '')}")  # for the worker
    # Only the sleeping reward needs the timeout; the others run in a worker because they are user code.
    timeout = {"round_timeout_s": 5.0} if case == "sleeps" else {}
    data = small_config_dict(tmp_path, federation={"num_clients": 1, "rounds": 1, "min_train_clients": 1, **timeout},
                             tasks={"rewards": [{"name": f"{module}:fn"}]})
    (tmp_path / "run.toml").write_text(dump_config(config_from_dict(data)))
    started = time.monotonic()
    result = CliRunner().invoke(app, ["run", str(tmp_path / "run.toml"), "--quiet"])
    assert time.monotonic() - started < 300  # the sleeping reward was stopped
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "summary.json").exists()


def test_fgrpo_run_applies_the_methods_tuned_values_as_compare_does(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import fgrpo.federation.server as server
    from conftest import small_config_dict
    from fgrpo.cli import app
    from fgrpo.config import dump_config

    ran = []

    def fake_run_federation(grid, config, run_dir, **kwargs):
        ran.append(config)
        return {"method": config.federation.method, "rounds": 1, "initial/acc_heldout": 0.0, "final/acc_heldout": 0.0, "wall_s": 0.0}

    monkeypatch.setattr(server, "run_federation", fake_run_federation)
    data = small_config_dict(tmp_path, federation={"method": "fedavg"})
    data["tuned"] = {"fedavg": {"values": {"grpo.learning_rate": 0.00421}}, "fgrpo": {"values": {"grpo.learning_rate": 0.9}}}
    (tmp_path / "scenario.toml").write_text(dump_config(config_from_dict(data)))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "scenario.toml"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert [config.grpo.learning_rate for config in ran] == [0.00421]  # fedavg's tuned value, not fgrpo's
    assert "[tuned.fedavg]" in result.output and "grpo.learning_rate = 0.00421" in result.output
