"""math-verify answer equivalence on a table of answer pairs, and the reasoning rewards."""

import pytest

from fgrpo.data.mathcheck import (
    length_penalty_reward,
    math_answer_correct,
    math_verify_reward,
    think_answer_format_reward,
)
from fgrpo.data.rewards import WeightedReward, compute_rewards
from fgrpo.data.tasks import Example, is_correct

# (reference answer as a dataset holds it, model completion): LaTeX forms,
# fractions vs decimals, units and degrees, sets, tuples, polynomials, and
# the three places an answer is looked for (<answer>, ####, \boxed{}).
EQUIVALENT = [
    ("5", "The answer is $\\boxed{5}$."),
    ("5", "<think>3x = 15</think><answer>5</answer>"),
    ("39", "48 - 9 = 39\n#### 39"),
    ("1234", "\\boxed{1,234}"),
    ("\\frac{5}{6}", "\\boxed{\\frac{5}{6}}"),
    ("\\frac{5}{6}", "\\boxed{\\dfrac{5}{6}}"),
    ("\\frac{1}{2}", "\\boxed{0.5}"),
    ("\\frac{1}{2}", "<answer>1/2</answer>"),
    ("\\frac{1}{4}", "$\\boxed{\\tfrac14}$"),
    ("0.25", "\\boxed{\\frac{1}{4}}"),
    ("9\\pi", "\\boxed{9\\pi}"),
    ("9\\pi", "\\boxed{\\pi \\cdot 9}"),
    ("13", "\\boxed{\\sqrt{169}}"),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}"),
    ("540", "\\boxed{540^\\circ}"),
    ("540", "\\boxed{540 \\text{ degrees}}"),
    ("36", "\\boxed{36 \\text{ cm}^2}"),
    ("18", "\\boxed{18\\text{ square units}}"),
    ("5", "\\boxed{x = 5}"),
    ("-3", "\\boxed{-3}"),
    ("x^2 + 2x + 1", "\\boxed{(x+1)^2}"),
    ("\\{1, 2\\}", "\\boxed{\\{2, 1\\}}"),
    ("(1, 3)", "\\boxed{(1,3)}"),
    ("50\\%", "\\boxed{50\\%}"),
    ("7", "So the sum of the roots is 7."),
    ("166", "<think>83 * 2 = 166</think><answer>$166</answer>"),
]
NOT_EQUIVALENT = [
    ("5", "\\boxed{6}"),
    ("5", "<think>the answer is 5</think><answer>6</answer>"),
    ("39", "#### 38"),
    ("\\frac{5}{6}", "\\boxed{\\frac{6}{5}}"),
    ("\\frac{1}{2}", "\\boxed{0.51}"),
    ("9\\pi", "\\boxed{9}"),
    ("13", "\\boxed{\\sqrt{168}}"),
    ("2\\sqrt{2}", "\\boxed{2\\sqrt{3}}"),
    ("-3", "\\boxed{3}"),
    ("x^2 + 2x + 1", "\\boxed{(x-1)^2}"),
    ("(1, 3)", "\\boxed{(3,1)}"),
    ("\\{1, 2\\}", "\\boxed{\\{1, 3\\}}"),
    ("1234", "\\boxed{123}"),
    ("5", ""),
    ("5", "I don't know."),
    ("7", "<answer></answer>"),
]


def test_table_is_large_enough():
    assert len(EQUIVALENT) + len(NOT_EQUIVALENT) >= 30


@pytest.mark.parametrize("reference, completion", EQUIVALENT)
def test_equivalent_forms_are_correct(reference, completion):
    assert math_answer_correct(reference, completion)


@pytest.mark.parametrize("reference, completion", NOT_EQUIVALENT)
def test_different_answers_are_wrong(reference, completion):
    assert not math_answer_correct(reference, completion)


def test_math_verify_reward_has_trl_signature_and_conversational_completions():
    completions = [[{"role": "assistant", "content": "\\boxed{\\frac{2}{4}}"}], [{"role": "assistant", "content": "\\boxed{3}"}]]
    extra = {"completion_ids": [[1], [2]], "trainer_state": None}
    assert math_verify_reward(["p", "q"], completions, answer=["0.5", "4"], **extra) == [1.0, 0.0]


def test_math_checker_drives_accuracy_while_exact_stays_textual():
    math_example = Example("Simplify 2/4.", "\\frac{1}{2}", "algebra", checker="math")
    exact_example = Example("Simplify 2/4.", "\\frac{1}{2}", "algebra")
    assert is_correct(math_example, "\\boxed{0.5}")
    assert not is_correct(exact_example, "\\boxed{0.5}")
    reward = WeightedReward([("math_verify", 1.0)])
    result = compute_rewards([math_example, math_example], ["\\boxed{0.5}", "\\boxed{2}"], reward)
    assert result.rewards.tolist() == [1.0, 0.0] and result.correct.tolist() == [True, False]


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>3 + 4 = 7</think><answer>7</answer>", 1.0),
        ("  <think>\nsteps\n</think>\n<answer> 7 </answer>\n", 1.0),
        ("<answer>7</answer>", 0.0),  # no reasoning block
        ("<think>steps</think>7", 0.0),  # no answer block
        ("<think>steps</think><answer></answer>", 0.0),  # empty answer
        ("<think>a</think><answer>7</answer> and more text", 0.0),  # trailing text
        ("The answer is 7.", 0.0),
    ],
)
def test_think_answer_format(completion, expected):
    assert think_answer_format_reward(None, [completion]) == [expected]


def test_length_penalty_is_dapo_soft_overlong_on_tokens_or_characters():
    ids = [[0] * n for n in (10, 12, 14, 16, 20)]
    # max 16, cache 4: free up to 12 tokens, then linear to -1 at 16 and beyond
    assert length_penalty_reward(None, ["x"] * 5, completion_ids=ids, max_length=16, soft_cache=4) == [
        0.0,
        0.0,
        -0.5,
        -1.0,
        -1.0,
    ]
    assert length_penalty_reward(None, ["abcd", "abcdefgh"], max_length=8, soft_cache=4) == [0.0, -1.0]
    # a window wider than the budget ramps over the whole budget
    assert length_penalty_reward(None, ["", "ab", "abcd"], max_length=4, soft_cache=128) == [0.0, -0.5, -1.0]
    with pytest.raises(ValueError, match="soft_cache"):
        length_penalty_reward(None, ["x"], max_length=4, soft_cache=-1)


def test_length_penalty_gets_max_length_from_the_rollout_budget():
    from fgrpo.config import TasksConfig
    from fgrpo.core.pipeline import build_reward

    tasks = TasksConfig(rewards=[{"name": "math_verify"}, {"name": "length_penalty", "weight": 0.5}])
    reward = build_reward(tasks, max_completion_length=8)
    example = Example("q", "7", "gsm8k")
    result = compute_rewards([example, example], ["\\boxed{7}", "\\boxed{7}"], reward, completion_ids=[[1] * 3, [1] * 8])
    assert result.rewards.tolist() == [1.0, 0.5]
