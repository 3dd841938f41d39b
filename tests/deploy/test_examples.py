"""The shipped recipes: every config validates, its data exists, and recipe (b) runs end to end
(2 rounds) with its model swapped for a tiny Qwen2 checkpoint and its sizes shrunk."""

import json
from pathlib import Path

import pytest

from fgrpo.config import load_config
from fgrpo.deploy.runtime import run_simulation
from tiny_models import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "examples").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_validates_and_its_files_exist(path):
    config = load_config(path)
    for source in config.tasks.sources:
        assert (ROOT / source.path).is_file(), f"{path.name}: {source.path} missing"


def test_recipes_b_and_c_name_real_models_and_reasoning_rewards():
    b = load_config(ROOT / "examples" / "gsm8k_qwen05b_4clients.toml")
    c = load_config(ROOT / "examples" / "math_subjects_qwen15b.toml")
    assert b.model.source == "Qwen/Qwen2.5-0.5B-Instruct" and b.federation.num_clients == 4
    assert c.model.source == "Qwen/Qwen2.5-1.5B-Instruct" and c.tasks.sources[0].family_column == "subject"
    for config in (b, c):
        assert config.model.gradient_checkpointing and config.tasks.rewards[0].name == "math_verify"


@pytest.mark.slow
def test_recipe_b_runs_two_rounds_on_a_tiny_qwen2(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe's data path is relative to the repository
    folder = save_tiny_checkpoint("qwen2", tmp_path / "qwen2")
    overrides = {
        "model": {"source": str(folder), "dtype": "float32", "gradient_checkpointing": False, "lora": {"rank": 4}},
        "grpo": {"num_generations": 2, "max_completion_length": 6},
        "training": {"prompts_per_step": 2},
        "federation": {"num_clients": 2, "rounds": 2, "local_steps": 1, "min_train_clients": 2},
        "output": {"dir": str(tmp_path / "run")},
    }
    config = load_config(ROOT / "examples" / "gsm8k_qwen05b_4clients.toml", overrides)
    summary = run_simulation(config, progress=False)
    assert summary["rounds"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    client = next(r for r in records if r["kind"] == "client" and "client/reward_mean" in r)
    # math_verify + 0.2 format + 0.5 length penalty: the reward lies in [-0.5, 1.2]
    assert -0.5 <= client["client/reward_mean"] <= 1.2


def load_example(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_robustness_reads_a_comparisons_finished_run_with_the_same_config_instead_of_running_it(tmp_path):
    from fgrpo.config import dump_config
    from fgrpo.deploy.runtime import with_method

    robustness = load_example("robustness")
    config = robustness.cell_config({}, "defaults", "honest", "fedavg", 1, tmp_path / "robustness")
    compare_run = tmp_path / "qs5" / "fedavg" / "seed1"
    compare_run.mkdir(parents=True)
    (compare_run / "config.toml").write_text(dump_config(with_method(config, "fedavg", 1, compare_run)))
    (compare_run / "summary.json").write_text(json.dumps({"final/acc_heldout": 0.625}))
    summary, run_dir = robustness.run_or_read(config, reuse=tmp_path / "qs5")
    assert summary["final/acc_heldout"] == 0.625 and run_dir == compare_run
    # any other setting (here: the attacked case) is a different run, never read from there
    attacked = robustness.cell_config({}, "defaults", "attacked", "fedavg", 1, tmp_path / "robustness")
    assert not robustness.finished_as(attacked, compare_run)
