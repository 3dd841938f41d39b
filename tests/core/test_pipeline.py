import pytest

from fgrpo.federation.client import all_client_data, pooled_data
from fgrpo.config import config_from_dict
from fgrpo.errors import ConfigError
from fgrpo.core.pipeline import build_task_pool, build_task_splits
from fgrpo.data.tasks import SAMPLE_GSM8K


def prompts(examples) -> set[str]:
    return {ex.prompt for ex in examples}


def test_no_test_prompt_reaches_train_or_validation(small_config):
    # sort at difficulty 1 has 10 prompts: train repeats prompts, so disjointness is not luck
    data = small_config.tasks.model_dump()
    data["families"].append({**data["families"][1], "difficulty": 1})
    data["validation_per_family"] = 5
    data["files"] = [{"path": str(SAMPLE_GSM8K), "prompt_key": "question", "validation_fraction": 0.3}]
    tasks = type(small_config.tasks).model_validate(data)
    splits = build_task_splits(tasks)
    assert splits.validation and splits.test and splits.train
    assert not prompts(splits.test) & prompts(splits.train)
    assert not prompts(splits.test) & prompts(splits.validation)
    assert not prompts(splits.validation) & prompts(splits.train)
    assert {ex.family for ex in splits.validation} == {"add", "sort", "jsonl"}
    # the held-out test set does not change when a validation split is carved
    assert build_task_pool(tasks)[1] == splits.test
    unsplit = build_task_splits(type(tasks).model_validate({**tasks.model_dump(), "validation_per_family": 0}))
    assert unsplit.test == splits.test and not [ex for ex in unsplit.validation if ex.family != "jsonl"]


def test_clients_evaluate_on_their_share_of_the_chosen_split(small_config):
    data = small_config.model_dump()
    data["federation"]["partition"]["scheme"] = "by_family"
    config = config_from_dict(data)
    shares = all_client_data(config, 2)
    pooled = build_task_splits(config.tasks)
    assert sorted(p for s in shares for p in prompts(s.heldout("validation"))) == sorted(prompts(pooled.validation))
    assert all(s.heldout("test") == s.test for s in shares)
    for share in shares:  # by_family: a client's validation follows its own families
        assert {ex.family for ex in share.validation} == {ex.family for ex in share.train}
    central = pooled_data(config)
    assert central.heldout("validation") == pooled.validation


def test_validation_split_without_validation_prompts_is_an_error(small_config):
    tasks = type(small_config.tasks).model_validate({**small_config.tasks.model_dump(), "validation_per_family": 0})
    with pytest.raises(ConfigError, match="validation_per_family"):
        build_task_splits(tasks).heldout("validation")


def test_evaluation_split_is_typed(small_config):
    data = small_config.model_dump()
    with pytest.raises(ConfigError, match="evaluation.split"):
        config_from_dict({**data, "evaluation": {"split": "val"}})
    with pytest.raises(ConfigError, match="unknown key 'evaluation.splits'"):
        config_from_dict({**data, "evaluation": {"splits": "test"}})


def test_an_unknown_reward_option_is_refused_naming_its_key():
    from fgrpo.config import TasksConfig
    from fgrpo.core.pipeline import build_reward

    misspelt = TasksConfig(rewards=[{"name": "exact_match"}, {"name": "length_penalty", "kwargs": {"max_lenght": 64}}])
    with pytest.raises(ConfigError, match=r"tasks.rewards\[1\].kwargs: max_lenght: not an option of length_penalty_reward "
                                          r"\(its options: completion_ids, max_length, soft_cache\)"):
        build_reward(misspelt)
    with pytest.raises(ConfigError, match=r"tasks.rewards\[0\].kwargs: strict: not an option of exact_match_reward \(its options: none\)"):
        build_reward(TasksConfig(rewards=[{"name": "exact_match", "kwargs": {"strict": True}}]))
    fitting = build_reward(TasksConfig(rewards=[{"name": "length_penalty", "kwargs": {"soft_cache": 4}}]), 16)
    assert fitting.score(["p"], ["x" * 16], {"answer": ["1"]})[0][0] == -1.0  # max_length 16 bound, 16 chars: −1


@pytest.mark.parametrize("verifier", ["exact", "math"])
def test_chat_style_reads_gsm8k_answers_from_sentences(verifier):
    """With a chat model, data files keep their own words and their answers are read from the reply's sentence."""
    from fgrpo.data.tasks import is_correct

    tasks = {
        "families": [],
        "sources": [{"name": "gsm8k", "path": str(SAMPLE_GSM8K), "verifier": verifier}],
        "prompt_style": "chat",
    }
    splits = build_task_splits(config_from_dict({"tasks": tasks}).tasks)
    example = splits.test[0]
    assert example.answer_style == "sentence" and "The answer is" not in example.prompt
    reply = f"First I add the numbers, 3 + 4 = 7, then more steps. The answer is {example.answer}."
    assert is_correct(example, reply)
    assert not is_correct(example, f"The answer is {example.answer}1.")
