"""fgrpo tune: search spaces, the scenario file's [tuned] block, and tuning that never sees the test set."""

from __future__ import annotations

import pytest

from fgrpo.config import config_from_dict, load_config
from fgrpo.errors import ConfigError
from fgrpo.config import apply_tuned, with_values
from fgrpo.tuning import SEARCH_SPACES, trial_config, write_tuned
from fgrpo.config import METHODS, TunedMethod


def test_every_method_has_a_search_space_with_the_client_learning_rate():
    assert set(SEARCH_SPACES) == set(METHODS)
    for method, space in SEARCH_SPACES.items():
        assert space[0].key == "grpo.learning_rate"
        assert all(p.low < p.high for p in space)
        config = config_from_dict({})
        with_values(config, {p.key: p.low for p in space}, method)  # every key is a real config key


def test_tuned_values_apply_only_to_their_method():
    config = config_from_dict({"tuned": {"fgrpo": {"values": {"grpo.learning_rate": 0.0042}, "trials": 3, "seeds": [0]}}})
    assert apply_tuned(config, "fgrpo").grpo.learning_rate == 0.0042
    assert apply_tuned(config, "fedavg").grpo.learning_rate == config.grpo.learning_rate
    # a misspelt key is refused when the config is read, not only when (or if) its method runs
    with pytest.raises(ConfigError, match=r"\[tuned.fedavg\] values: 'grpo.learnin_rate' is not a numeric config key"):
        config_from_dict({"tuned": {"fedavg": {"values": {"grpo.learnin_rate": 0.1}}}})
    for key in ("grpo", "grpo.loss_type", "tasks.rewards", "federation.clients.size"):  # a section, a word, a list
        with pytest.raises(ConfigError, match="not a numeric config key"):
            config_from_dict({"tuned": {"fedavg": {"values": {key: 0.1}}}})
    out_of_range = config_from_dict({"tuned": {"fedavg": {"values": {"grpo.learning_rate": 5.0}}}})
    with pytest.raises(ConfigError, match=r"(?s)\[tuned.fedavg\].*grpo.learning_rate"):
        apply_tuned(out_of_range, "fedavg")
    with pytest.raises(ConfigError, match="unknown method"):
        config_from_dict({"tuned": {"fedbanana": {}}})


def test_a_trial_is_scored_on_validation_never_on_test(tmp_path):
    config = config_from_dict({"tuned": {"fgrpo": {"values": {"grpo.learning_rate": 0.0042}}}})
    trial = trial_config(config, "fedavg", 3, {"grpo.learning_rate": 0.001}, tmp_path / "t")
    assert trial.evaluation.split == "validation"
    assert trial.federation.method == "fedavg" and trial.training.seed == 3
    assert trial.grpo.learning_rate == 0.001 and trial.tuned == {} and not trial.output.save_adapter


def test_write_tuned_keeps_the_users_text_and_replaces_its_own_block(tmp_path):
    path = tmp_path / "scenario.toml"
    path.write_text("# my scenario\n[grpo]\nlearning_rate = 0.002  # why this\n")
    write_tuned(path, {"fedavg": TunedMethod(values={"grpo.learning_rate": 0.003}, trials=4, seeds=[0], rounds=2)})
    write_tuned(path, {"fgrpo": TunedMethod(values={"federation.fgrpo.temperature": 2.5}, trials=4, seeds=[0], rounds=2)})
    write_tuned(path, {"fedavg": TunedMethod(values={"grpo.learning_rate": 0.001}, trials=4, seeds=[0], rounds=2)})
    text = path.read_text()
    assert text.startswith("# my scenario\n[grpo]\nlearning_rate = 0.002  # why this\n")
    assert text.count("# >>> tuned by") == 1 and text.count("[tuned.fedavg.values]") == 1
    config = load_config(path)
    assert config.tuned["fedavg"].values == {"grpo.learning_rate": 0.001}  # re-tuned
    assert config.tuned["fgrpo"].values == {"federation.fgrpo.temperature": 2.5}  # kept
    assert config.tuned["fgrpo"].budget_text() == "4 trials × 1 seed × 2 rounds on validation"
    assert TunedMethod().budget_text() == "not tuned (the scenario's values)"


def test_write_tuned_refuses_tables_it_does_not_own(tmp_path):
    path = tmp_path / "scenario.toml"
    path.write_text('[tuned.fedavg.values]\n"grpo.learning_rate" = 0.001\n')
    before = path.read_text()
    with pytest.raises(ConfigError, match="its own \\[tuned"):
        write_tuned(path, {"fgrpo": TunedMethod(values={}, trials=1)})
    assert path.read_text() == before


def test_tuning_runs_evaluate_validation_prompts_only_and_never_a_test_prompt(tmp_path, monkeypatch):
    """Every prompt any tuning run scores is a validation prompt; the test set is never evaluated."""
    from conftest import small_config_dict

    import fgrpo.core.evaluate as evaluate_module
    from fgrpo.core.pipeline import build_task_splits
    from fgrpo.tuning import tune_method

    data = small_config_dict(tmp_path)
    data["tasks"]["validation_per_family"] = 6
    data["federation"]["rounds"] = 1
    config = config_from_dict(data)
    splits = build_task_splits(config.tasks)
    seen: list[str] = []
    original = evaluate_module.evaluate

    def spy(model, tokenizer, examples, *args, **kwargs):
        seen.extend(ex.prompt for ex in examples)
        return original(model, tokenizer, examples, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate", spy)
    import fgrpo.federation.client as client_module

    monkeypatch.setattr(client_module, "evaluate", spy)
    tuned = tune_method(config, "fedavg", trials=2, seeds=[0], out_dir=tmp_path / "tune")
    assert seen, "the spy saw no evaluation: the test would prove nothing"
    test_prompts = {ex.prompt for ex in splits.test}
    validation_prompts = {ex.prompt for ex in splits.validation}
    assert not set(seen) & test_prompts
    assert set(seen) <= validation_prompts
    assert tuned.trials == 2 and set(tuned.values) == {"grpo.learning_rate", "federation.server_lr"}
    assert 0.0 <= tuned.best_value <= 1.0
