import functools
import sys
import textwrap

import numpy as np
import pytest

from fgrpo.errors import ConfigError, RewardError
from fgrpo.data.rewards import (
    REWARD_FUNCTIONS,
    WeightedReward,
    apply_reward_scale,
    call_reward_function,
    compute_rewards,
    exact_match_reward,
    format_reward,
    partial_credit_reward,
    resolve_reward_function,
)
from fgrpo.data.tasks import Example


def columns_of(examples):
    return {key: [ex.columns()[key] for ex in examples] for key in ("answer", "family", "reward_scale")}


ADD = Example("12+34=", "46", "add")
REV = Example("rev 120=", "021", "reverse")
SORT = Example("sort 3142=", "1234", "sort")
GSM = Example("word problem", "1234", "gsm8k")


def test_exact_match_reward():
    examples = [ADD, ADD, ADD, REV, REV, GSM, GSM]
    completions = ["46", "046", "45", "021", "21", "so\n#### 1,234", "\\boxed{1234.0}"]
    assert exact_match_reward([ex.prompt for ex in examples], completions, **columns_of(examples)) == [
        1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0,
    ]


def test_partial_credit_reward():
    examples = [ADD, ADD, ADD, ADD, Example("1+122=", "123", "add"), SORT, SORT, SORT, ADD]
    completions = ["46", "45", "146", "x", "23", "1234", "1243", "12", ""]
    scores = partial_credit_reward(None, completions, **columns_of(examples))
    # 46 vs 46; 45: units wrong (1/2); 146: right-aligned 2 of 3; "x": 0 of 2; 23 vs 123 right-aligned 2/3;
    # sort compares from the left: 1243 2/4, 12 2/4; empty completion: 0
    assert scores == pytest.approx([1.0, 0.5, 2 / 3, 0.0, 2 / 3, 1.0, 0.5, 0.5, 0.0])


def test_partial_credit_is_one_only_for_exact_match():
    examples = [Example("rev 007=", "700", "reverse")] * 4
    scores = partial_credit_reward(None, ["700", "7000", "70", "0700"], **columns_of(examples))
    assert scores[0] == 1.0 and all(s < 1.0 for s in scores[1:])
    assert scores == pytest.approx([1.0, 3 / 4, 2 / 3, 1 / 4])


def test_format_reward():
    examples = [ADD, ADD, ADD, ADD, SORT, GSM, GSM, GSM]
    completions = ["99", "99 apples", "", "-3", "0012", "#### 1,234", "#### 2.5", "#### about ten"]
    assert format_reward(None, completions, **columns_of(examples)) == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    # without a family column: loaded-data rule (any number)
    assert format_reward(None, ["12", "x"]) == [1.0, 0.0]


def test_conversational_completions():
    examples = [ADD, ADD]
    completions = [[{"role": "assistant", "content": "46"}], [{"role": "assistant", "content": "47"}]]
    columns = columns_of(examples)
    assert exact_match_reward(None, completions, **columns) == [1.0, 0.0]
    assert partial_credit_reward(None, completions, **columns) == [1.0, 0.5]
    assert format_reward(None, completions, **columns) == [1.0, 1.0]
    result = compute_rewards(examples, completions, WeightedReward([("exact_match", 1.0)]))
    assert result.correct.tolist() == [True, False]


def test_builtins_tolerate_trl_kwargs():
    extra = {"completion_ids": [[1, 2]], "trainer_state": object(), "reward_scale": [(0.0, 1.0)]}
    # The answer-checking built-ins score a right answer 1.0; the shaping ones
    # (reasoning format, length) score its form, not its value: 0.0 here.
    expected = {"think_answer_format": [0.0], "length_penalty": [0.0]}
    for name, fn in REWARD_FUNCTIONS.items():
        got = fn(prompts=["12+34="], completions=["46"], answer=["46"], family=["add"], **extra)
        assert got == expected.get(name, [1.0]), name


def test_missing_answer_column_names_the_function():
    with pytest.raises(RewardError, match="exact_match_reward.*needs the dataset column 'answer'"):
        call_reward_function(exact_match_reward, ["p"], ["1"], {"family": ["add"]})


def trl_style_reward(prompts, completions, answer, **kwargs):
    """Written for TRL: reads a column by name, ignores the rest."""
    return [1.0 if c.strip() == a else -1.0 for c, a in zip(completions, answer)]


def test_trl_style_user_function_works_unchanged():
    examples = [ADD, ADD, GSM]
    values = call_reward_function(trl_style_reward, [ex.prompt for ex in examples], ["46", "4", "1234"], columns_of(examples))
    assert values.tolist() == [1.0, -1.0, 1.0]
    result = compute_rewards(examples, ["46", "4", "1234"], WeightedReward([(trl_style_reward, 0.5)]))
    assert result.scores.tolist() == [0.5, -0.5, 0.5]
    assert list(result.per_function) == ["trl_style_reward"]


def test_call_reward_function_accepts_none_and_arrays():
    values = call_reward_function(lambda prompts, completions, **kw: [None, 0.5, 1], ["a"] * 3, ["a"] * 3, {})
    assert np.isnan(values[0]) and values[1:].tolist() == [0.5, 1.0]
    values = call_reward_function(lambda prompts, completions, **kw: np.array([0.25, 2.0]), ["a"] * 2, ["a"] * 2, {})
    assert values.tolist() == [0.25, 2.0]


def raises_reward(prompts, completions, **kwargs):
    raise ZeroDivisionError("boom")


def nan_reward(prompts, completions, **kwargs):
    return [0.0, float("nan")]


def inf_reward(prompts, completions, **kwargs):
    return [float("-inf"), 0.0]


def short_reward(prompts, completions, **kwargs):
    return [1.0]


def text_reward(prompts, completions, **kwargs):
    return [1.0, "1.0"]


def scalar_reward(prompts, completions, **kwargs):
    return 1.0


@pytest.mark.parametrize(
    "fn, message",
    [
        (raises_reward, r"reward function raises_reward raised ZeroDivisionError: boom"),
        (nan_reward, r"reward function nan_reward returned nan at index 1: rewards must be finite"),
        (inf_reward, r"reward function inf_reward returned -inf at index 0"),
        (short_reward, r"reward function short_reward returned 1 values, expected 2"),
        (text_reward, r"reward function text_reward returned a non-numeric value at index 1: '1.0' \(str\)"),
        (scalar_reward, r"reward function scalar_reward must return a list of 2 floats, got float"),
    ],
)
def test_call_reward_function_errors_name_the_function(fn, message):
    with pytest.raises(RewardError, match=message) as info:
        call_reward_function(fn, ["p", "q"], ["a", "b"], {})
    if fn is raises_reward:
        assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_call_reward_function_names_partials_by_repr():
    fn = functools.partial(nan_reward)
    with pytest.raises(RewardError, match=r"reward function functools.partial\(<function nan_reward"):
        call_reward_function(fn, ["p", "q"], ["a", "b"], {})


def test_weighted_reward_combines_with_weights():
    reward = WeightedReward([("exact_match", 1.0), ("format", 0.25), (partial_credit_reward, -0.5)])
    examples = [ADD, ADD, ADD]
    scores, per_function = reward.score(None, ["46", "45", "no"], columns_of(examples))
    assert list(per_function) == ["exact_match", "format", "partial_credit"]
    assert per_function["format"].tolist() == [1.0, 1.0, 0.0]
    # 1 + 0.25 - 0.5 ; 0 + 0.25 - 0.25 ; 0
    assert scores.tolist() == pytest.approx([0.75, 0.0, 0.0])


def test_weighted_reward_ignores_none_like_trl():
    def sometimes(prompts, completions, **kwargs):
        return [None, 1.0, None]

    reward = WeightedReward([(sometimes, 2.0), ("exact_match", 1.0)])
    scores, per_function = reward.score(None, ["46", "46", "0"], columns_of([ADD] * 3))
    assert scores.tolist() == [1.0, 3.0, 0.0]
    assert np.isnan(per_function["sometimes"][[0, 2]]).all()

    never = WeightedReward([(sometimes, 1.0)])
    with pytest.raises(RewardError, match=r"every reward function \(sometimes\) returned None for completion\(s\) \[0, 2\]"):
        never.score(None, ["a", "b", "c"], {})


def test_weighted_reward_duplicate_names_and_bad_weights():
    reward = WeightedReward([("exact_match", 1.0), (exact_match_reward, 1.0)])
    assert [term.name for term in reward.terms] == ["exact_match", "exact_match#2"]
    with pytest.raises(ConfigError, match="at least one"):
        WeightedReward([])
    with pytest.raises(ConfigError, match="must be finite"):
        WeightedReward([("format", float("nan"))])


@pytest.mark.parametrize(
    "scale, expected",
    [((0.0, 1.0), [0.0, 0.5, 1.0]), ((0.0, 10.0), [0.0, 5.0, 10.0]), ((-1.0, 1.0), [-1.0, 0.0, 1.0])],
)
def test_apply_reward_scale(scale, expected):
    assert apply_reward_scale(np.array([0.0, 0.5, 1.0]), [scale] * 3).tolist() == expected


def test_apply_reward_scale_per_sample_and_length_check():
    out = apply_reward_scale(np.array([1.0, 1.0, 0.0]), [(0, 1), (0, 10), (-1, 1)])
    assert out.tolist() == [1.0, 10.0, -1.0]
    with pytest.raises(RewardError, match="2 scores but 1 reward scales"):
        apply_reward_scale(np.array([0.0, 1.0]), [(0, 1)])


def test_compute_rewards_maps_each_example_to_its_scale():
    examples = [
        Example("1+1=", "2", "add", (0.0, 1.0)),
        Example("1+1=", "2", "add", (0.0, 10.0)),
        Example("1+1=", "2", "add", (-1.0, 1.0)),
        Example("rev 12=", "21", "reverse", (-1.0, 1.0)),
    ]
    seen_prompts = []

    def spy(prompts, completions, **kwargs):
        seen_prompts.extend(prompts)
        assert kwargs["reward_scale"][1] == (0.0, 10.0)
        return [0.0] * len(completions)

    reward = WeightedReward([("exact_match", 1.0), (spy, 1.0)])
    result = compute_rewards(examples, ["2", "2", "3", "21"], reward)
    assert result.scores.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert result.rewards.tolist() == [1.0, 10.0, -1.0, 1.0]
    assert result.correct.tolist() == [True, True, False, True]
    assert result.correct.dtype == bool
    assert seen_prompts == ["1+1=", "1+1=", "1+1=", "rev 12="]
    with pytest.raises(RewardError, match="1 completions for 4 examples"):
        compute_rewards(examples, ["2"], reward)


def test_resolve_registered_and_import_path(tmp_path, monkeypatch):
    assert resolve_reward_function("exact_match") is exact_match_reward
    assert resolve_reward_function("fgrpo.data.rewards:format_reward") is format_reward
    (tmp_path / "my_rewards_mod.py").write_text(
        textwrap.dedent(
            """
            THRESHOLD = 3

            def short(prompts, completions, **kwargs):
                return [float(len(c) <= THRESHOLD) for c in completions]

            class Holder:
                @staticmethod
                def longer(prompts, completions, **kwargs):
                    return [float(len(c)) for c in completions]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards_mod", raising=False)
    short = resolve_reward_function("my_rewards_mod:short")
    assert call_reward_function(short, None, ["ab", "abcd"], {}).tolist() == [1.0, 0.0]
    longer = resolve_reward_function("my_rewards_mod:Holder.longer")
    assert WeightedReward([("my_rewards_mod:short", 1.0), (longer, 1.0)]).score(None, ["ab"], {})[0].tolist() == [3.0]

    with pytest.raises(ConfigError, match=r"'my_rewards_mod:THRESHOLD' is a int, not a callable"):
        resolve_reward_function("my_rewards_mod:THRESHOLD")
    with pytest.raises(ConfigError, match=r"module 'my_rewards_mod' has no attribute 'nope'"):
        resolve_reward_function("my_rewards_mod:nope")


def test_resolve_errors():
    with pytest.raises(ConfigError, match=r"unknown reward function 'exactmatch': use one of exact_match, partial_credit, format"):
        resolve_reward_function("exactmatch")
    with pytest.raises(ConfigError, match=r"cannot import module 'no_such_module_xyz' \(ModuleNotFoundError"):
        resolve_reward_function("no_such_module_xyz:fn")
    with pytest.raises(ConfigError, match=r"module 'fgrpo.data.rewards' has no attribute 'missing'"):
        resolve_reward_function("fgrpo.data.rewards:missing")


def test_owner_rewards_score_each_example_with_its_owners_functions():
    from fgrpo.data.rewards import OwnerRewards, WeightedReward

    reward = OwnerRewards({"a": WeightedReward([("exact_match", 1.0)]), "b": WeightedReward([("format", 2.0)])})
    columns = {"answer": ["12", "12", "12"], "family": ["add"] * 3, "owner": ["a", "b", "a"]}
    scores, per_function = reward.score(["p"] * 3, ["13", "13", "12"], columns)
    np.testing.assert_array_equal(scores, [0.0, 2.0, 1.0])
    np.testing.assert_array_equal(per_function["exact_match"], [0.0, np.nan, 1.0])
    with pytest.raises(RewardError, match="no reward functions for owner 'c'"):
        reward.score(["p"], ["1"], {"answer": ["1"], "owner": ["c"]})
    with pytest.raises(RewardError, match="carry no 'owner' column"):
        reward.score(["p"], ["1"], {"answer": ["1"]})


def test_term_values_and_weights_rebuild_the_reward_on_each_examples_scale():
    """compute_rewards keeps TRL's rewards_per_func apart (for normalize_then_sum): low + Σ w_k term_k = reward."""
    from fgrpo.data.rewards import compute_rewards

    reward = WeightedReward([("exact_match", 1.0), ("format", 0.25), (partial_credit_reward, -0.5)])
    scaled = Example("12+34=", "46", "add", reward_scale=(-1.0, 9.0))
    result = compute_rewards([ADD, scaled, ADD], ["46", "45", "no"], reward)
    assert result.term_rewards.shape == (3, 3) and result.term_weights.tolist() == [1.0, 0.25, -0.5]
    low = np.array([0.0, -1.0, 0.0])
    np.testing.assert_allclose(low + np.nansum(result.term_rewards * result.term_weights, axis=1), result.rewards)
    np.testing.assert_allclose(result.term_rewards[1], 10 * np.array([0.0, 1.0, 0.5]))  # (high − low) · r_k


def test_owner_rewards_keep_one_term_per_owner_and_function():
    from fgrpo.data.rewards import OwnerRewards

    reward = OwnerRewards({"a": WeightedReward([("exact_match", 1.0)]), "b": WeightedReward([("exact_match", 3.0)])})
    columns = {"answer": ["12", "12", "12"], "family": ["add"] * 3, "owner": ["a", "b", "a"]}
    terms = reward.score_terms(["p"] * 3, ["13", "12", "12"], columns)
    assert terms.weights.tolist() == [1.0, 3.0]  # the same function, each owner's weight
    np.testing.assert_array_equal(terms.values, [[0.0, np.nan], [np.nan, 1.0], [1.0, np.nan]])
    np.testing.assert_array_equal(terms.scores, [0.0, 3.0, 1.0])


def test_what_leaves_a_node_about_a_reward_quotes_none_of_its_text(tmp_path, monkeypatch):
    from fgrpo.data.node_spec import public_message

    secret = "SECRET-ANSWER-5-6"

    def raises(prompts, completions, **kwargs):
        raise ValueError(f"expected {secret}")

    def returns_text(prompts, completions, **kwargs):
        return [secret for _ in completions]

    for fn in (raises, returns_text):
        with pytest.raises(RewardError) as failed:
            call_reward_function(fn, ["p"], ["c"], {})
        assert secret in str(failed.value) and secret not in public_message(failed.value)
        assert f"reward function {fn.__qualname__}" in public_message(failed.value)
    (tmp_path / "broken_on_import.py").write_text(f"raise RuntimeError('{secret}')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as failed:
        resolve_reward_function("broken_on_import:reward")
    assert public_message(failed.value) == (
        "reward function 'broken_on_import:reward': cannot import module 'broken_on_import' "
        "(RuntimeError; its message stays in the node's log)"
    )

def exiting_reward(prompts, completions, **kwargs):
    sys.exit(0)


def interrupting_reward(prompts, completions, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "fn, message",
    [
        (exiting_reward, r"reward function exiting_reward called sys.exit\(0\); user code must not end the run"),
        (interrupting_reward, r"reward function interrupting_reward raised KeyboardInterrupt itself"),
    ],
)
def test_a_reward_that_exits_or_interrupts_is_one_reward_error(fn, message):
    with pytest.raises(RewardError, match=message):
        call_reward_function(fn, ["p"], ["a"], {})


def test_a_real_ctrl_c_during_a_reward_still_stops_the_run():
    import os
    import signal

    def pressed_ctrl_c(prompts, completions, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C arrives while the reward runs
        return [1.0]

    with pytest.raises(KeyboardInterrupt):
        call_reward_function(pressed_ctrl_c, ["p"], ["a"], {})
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's handler is back


@pytest.mark.parametrize(
    "body, message",
    [
        ("import sys\nsys.exit(0)\n", r"module 'exits_on_import_mod', while being imported, called sys.exit\(0\)"),
        ("raise KeyboardInterrupt\n", r"module 'exits_on_import_mod', while being imported, raised KeyboardInterrupt"),
    ],
)
def test_a_reward_module_that_exits_or_interrupts_on_import_is_one_config_error(tmp_path, monkeypatch, body, message):
    (tmp_path / "exits_on_import_mod.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "exits_on_import_mod", raising=False)
    with pytest.raises(ConfigError, match=message):
        resolve_reward_function("exits_on_import_mod:fn")


def test_rewards_read_chat_replies_through_the_answer_style_column():
    """compute_rewards hands each example's answer_style to the reward functions: a chat reply's stated
    answer is scored, and the format reward asks for a stated answer, not a number written last."""
    from fgrpo.data.tasks import with_prompt_style

    example = with_prompt_style([Example("7*8=", "56", "mul")], "chat")[0]
    replies = ["7 times 8 is 56. The answer is 56.", "7 times 8 is 56", "The answer is 54.", "I do not know."]
    reward = WeightedReward([("exact_match", 1.0), ("format", 0.5)])
    scored = compute_rewards([example] * 4, replies, reward)
    assert list(scored.rewards) == [1.5, 1.0, 0.5, 0.0]
