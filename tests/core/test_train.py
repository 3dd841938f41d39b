"""End to end on the tiny model: a learner step, `fgrpo train`, evaluation helpers."""

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from fgrpo.cli import app
from fgrpo.errors import RewardError
from fgrpo.core.evaluate import pass_at_k
from fgrpo.core.learner import GRPOLearner
from fgrpo.core.model import get_trainable_arrays
from fgrpo.core.pipeline import build_reward, build_task_pool, load_policy
from fgrpo.data.rewards import WeightedReward


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)


def test_learner_step_updates_adapter_and_reports_metrics(small_config):
    train, _ = build_task_pool(small_config.tasks)
    model, tokenizer = load_policy(small_config.model, small_config.tasks, seed=0)
    def length_reward(prompts, completions, **kwargs):  # varies within a group, so advantages are non-zero
        return [float(len(c)) for c in completions]

    grpo = small_config.grpo.model_copy(update={"learning_rate": 1e-2})
    learner = GRPOLearner(model, tokenizer, grpo, WeightedReward([(length_reward, 1.0)]))
    before = get_trainable_arrays(model)
    metrics = learner.step(train[:2] + train[-2:])  # both families
    after = get_trainable_arrays(model)
    assert any(not np.allclose(before[k], after[k]) for k in before)
    assert 0 <= metrics["train/accuracy"] <= 1
    assert metrics["train/completion_len"] >= 1
    assert {"train/reward/add", "train/reward/sort", "train/kl", "train/clip_frac", "train/tokens_per_s"} <= set(metrics)


def test_learner_with_kl_uses_base_model_as_reference(small_config):
    train, _ = build_task_pool(small_config.tasks)
    model, tokenizer = load_policy(small_config.model, small_config.tasks, seed=0)
    grpo = small_config.grpo.model_copy(update={"beta": 0.1, "num_iterations": 2, "learning_rate": 5e-2})
    def length_reward(prompts, completions, **kwargs):
        return [float(len(c)) for c in completions]

    learner = GRPOLearner(model, tokenizer, grpo, WeightedReward([(length_reward, 1.0)]))
    assert learner.reference is None  # LoRA: adapters disabled = reference, no copy
    learner.step(train[:4])
    metrics = learner.step(train[:4])
    assert metrics["train/kl"] > 0  # the adapter moved away from the base model


def test_kept_optimizer_state_continues_adamw_exactly(small_config):
    """Two rounds with the kept state = two steps of one run; a fresh optimizer takes a different second step."""
    from fgrpo.federation.client import ClientData, local_round
    from fgrpo.core.learner import seeded

    train, _ = build_task_pool(small_config.tasks)
    model, tokenizer = load_policy(small_config.model, small_config.tasks, seed=0)

    def length_reward(prompts, completions, **kwargs):  # varies within a group, so every step moves the adapter
        return [float(len(c)) for c in completions]

    learner = GRPOLearner(model, tokenizer, small_config.grpo, WeightedReward([(length_reward, 1.0)]))
    start = get_trainable_arrays(model)
    data = ClientData(0, train[:2], [])

    def two_rounds(keep: bool) -> dict:
        arrays, _ = local_round(learner, start, data, local_steps=1, prompts_per_step=2, seed=1)
        state = learner.optimizer_state_arrays() if keep else None
        arrays, _ = local_round(learner, dict(arrays), data, local_steps=1, prompts_per_step=2, seed=2, optimizer_state=state)
        return {k: v.copy() for k, v in arrays.items()}

    kept, fresh = two_rounds(keep=True), two_rounds(keep=False)
    from fgrpo.core.model import set_trainable_arrays

    set_trainable_arrays(model, start)
    learner.reset_optimizer()
    for seed in (1, 2):  # what local_round does per round, without the reset in between
        with seeded(seed):
            learner.step(train[:2])
    continuous = get_trainable_arrays(model)
    assert all(np.allclose(kept[k], continuous[k], atol=1e-7) for k in continuous)
    assert any(not np.allclose(fresh[k], continuous[k], atol=1e-6) for k in continuous)
    assert learner.optimizer_state_arrays().keys() == {f"{k}/{s}" for k in continuous for s in ("step", "exp_avg", "exp_avg_sq")}


def test_reward_function_that_raises_is_named(small_config):
    train, _ = build_task_pool(small_config.tasks)
    model, tokenizer = load_policy(small_config.model, small_config.tasks, seed=0)

    def broken_reward(prompts, completions, **kwargs):
        raise KeyError("oops")

    learner = GRPOLearner(model, tokenizer, small_config.grpo, WeightedReward([(broken_reward, 1.0)]))
    with pytest.raises(RewardError, match="broken_reward"):
        learner.step(train[:2])


def test_fgrpo_train_cli_writes_results(tmp_path):
    from conftest import small_config_dict
    import tomli_w

    config_path = tmp_path / "c.toml"
    config_path.write_text(tomli_w.dumps(small_config_dict(tmp_path)))
    result = CliRunner().invoke(app, ["train", str(config_path), "--quiet"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in evals] == [0, 2] and len(steps) == 2
    assert {"eval/acc/add", "eval/acc/sort", "eval/pass@2"} <= set(evals[0])
    assert (run_dir / "config.toml").exists() and (run_dir / "adapter" / "adapter_config.json").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final/acc_heldout"] == evals[-1]["eval/acc_heldout"]
    # same seed, same run: repeatable
    again = CliRunner().invoke(app, ["train", str(config_path), "--quiet", "--overwrite", "-o", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    records2 = [json.loads(l) for l in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("train/reward_mean") for r in records2] == [r.get("train/reward_mean") for r in records]


def test_cli_reports_config_errors_without_traceback(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[grpo]\nnum_generation = 4\n")
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    assert "num_generation" in result.output and "Traceback" not in result.output


def test_existing_results_dir_is_refused(tmp_path, small_config):
    from fgrpo.errors import ConfigError
    from fgrpo.reporting.results import prepare_run_dir

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="already exists.*--overwrite"):
        prepare_run_dir(tmp_path / "run")


def test_local_round_reports_noise_statistics_and_the_in_round_probe_leaves_training_unchanged(small_config):
    """reward-mean-var is the squared standard error; measuring the in-round gain does not change θ_k."""
    import numpy as np

    from fgrpo.federation.client import ClientData, in_round_probe, local_round

    train, _ = build_task_pool(small_config.tasks)
    model, tokenizer = load_policy(small_config.model, small_config.tasks, seed=0)

    def length_reward(prompts, completions, **kwargs):
        return [float(len(c)) for c in completions]

    learner = GRPOLearner(model, tokenizer, small_config.grpo, WeightedReward([(length_reward, 1.0)]))
    start = get_trainable_arrays(model)
    data = ClientData(0, train[:12], [])
    plain, metrics = local_round(learner, start, data, local_steps=2, prompts_per_step=3, seed=5)
    plain = {k: v.copy() for k, v in plain.items()}
    probed, probed_metrics = local_round(learner, start, data, local_steps=2, prompts_per_step=3, seed=5, measure_in_round=True)
    for key in plain:
        np.testing.assert_array_equal(plain[key], probed[key])
    assert metrics["reward-mean"] == probed_metrics["reward-mean"]
    assert metrics["reward-mean-var"] > 0 and "gain-inround" not in metrics
    assert np.isfinite(probed_metrics["gain-inround"]) and probed_metrics["gain-inround-var"] >= 0
    # the probe uses none of the round's training prompts
    import random

    rng = random.Random(5)
    batches = [rng.sample(data.train, 3) for _ in range(2)]
    probe = in_round_probe(data.train, batches, 3, 5)
    assert not {id(ex) for ex in probe} & {id(ex) for batch in batches for ex in batch}


def test_nan_probabilities_while_sampling_name_the_step_and_the_cause(small_config):
    import torch

    from fgrpo.core.model import trainable_parameters
    from fgrpo.errors import TrainingError

    train, _ = build_task_pool(small_config.tasks)
    model, tokenizer = load_policy(small_config.model, small_config.tasks, seed=0)
    learner = GRPOLearner(model, tokenizer, small_config.grpo, build_reward(small_config.tasks))
    learner.step(train[:2])
    with torch.no_grad():  # what a diverged update leaves behind
        for parameter in trainable_parameters(model).values():
            parameter.fill_(float("nan"))
    lora = small_config.model.lora
    scale = re.escape(f"model.lora.alpha / rank = {lora.alpha:g} / {lora.rank} = {lora.alpha / lora.rank:g} too large")
    with pytest.raises(TrainingError, match=rf"sampling at GRPO step 2: .*NaN or Inf.*grpo.learning_rate = .*{scale}"):
        learner.step(train[:2])


def test_fgrpo_train_runs_on_the_threads_its_config_gives(small_config, tmp_path, monkeypatch):
    """runtime.threads is the torch budget of `fgrpo train`'s one process (was ignored: torch took every core,
    and two runs side by side each spun two threads on a 2-core machine)."""
    import torch

    import fgrpo.core.train as train

    seen = []
    real_build = train.build_learner

    def build_and_look(config, seed):
        seen.append(torch.get_num_threads())
        return real_build(config, seed)

    monkeypatch.setattr(train, "build_learner", build_and_look)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        config = small_config.model_copy(deep=True)
        config.runtime.threads = 1
        config.output.dir = str(tmp_path / "one-thread")
        config.training.steps = 1
        train.run_training(config, progress=False)
    finally:
        torch.set_num_threads(before)
    assert seen == [1]
