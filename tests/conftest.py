"""Shared fixtures: a small, fast config on the built-in tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fgrpo.config import Config, config_from_dict

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """Warm-started tiny checkpoints are cached per test session unless FGRPO_CACHE is set (CI sets it)."""
    if "FGRPO_CACHE" not in os.environ:
        os.environ["FGRPO_CACHE"] = str(tmp_path_factory.mktemp("fgrpo-cache"))
    yield


@pytest.fixture(autouse=True)
def _idle_machine(request, monkeypatch):
    """The thread policy sees an idle machine, so a plan does not change with what else runs beside the tests
    (tests marked `machine_load` read the real load)."""
    if request.node.get_closest_marker("machine_load") is None:
        monkeypatch.setattr("fgrpo.core.threads.busy_cores", lambda interval_s=0.05: 0.0)


def small_config_dict(tmp: Path, **sections) -> dict:
    base = {
        "model": {"source": "tiny", "warm_start": {"steps": 30, "batch_size": 32}, "lora": {"rank": 4, "alpha": 8}},
        "tasks": {
            "families": [
                {"name": "add", "difficulty": 1, "reward_scale": [0.0, 10.0]},
                {"name": "sort", "difficulty": 2, "reward_scale": [-1.0, 1.0]},
            ],
            "train_per_family": 40,
            "test_per_family": 8,
        },
        "grpo": {"num_generations": 4, "max_completion_length": 4},
        "training": {"steps": 2, "prompts_per_step": 2, "eval_every": 0, "eval_pass_k": 2},
        "federation": {"num_clients": 2, "rounds": 2, "local_steps": 1, "min_train_clients": 2},
        # Clients one after another in the test process: starting worker processes costs seconds per run;
        # tests/deploy/test_runtime.py runs the same scenario on workers and checks it gives the same result.
        "runtime": {"workers": 1},
        "output": {"dir": str(tmp / "run")},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return base


@pytest.fixture
def small_config(tmp_path) -> Config:
    return config_from_dict(small_config_dict(tmp_path))
