import json
import random
import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fgrpo.errors import ConfigError, DataError
from fgrpo.data.tasks import (
    FAMILIES,
    SAMPLE_GSM8K,
    Example,
    FamilySpec,
    answer_is_numeric,
    _distinct_weighted_sample,
    carve_validation,
    completion_text,
    extract_answer,
    generate_examples,
    is_correct,
    load_jsonl,
    make_splits,
    normalize_answer,
)


def reference_answer(family: str, prompt: str) -> str:
    """Recompute an answer from the prompt text alone, independently of the generators."""
    body = prompt[:-1]  # drop the trailing "="
    if family in ("add", "sub", "mul"):
        a, op, b = re.fullmatch(r"(\d+)([+\-*])(\d+)", body).groups()
        return str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])
    if family == "sort":
        return "".join(sorted(body.removeprefix("sort ")))
    if family == "reverse":
        return body.removeprefix("rev ")[::-1]
    if family == "count":
        target, text = re.fullmatch(r"count (\d) in (\d+)", body).groups()
        return str(text.count(target))
    if family == "max":
        return str(max(int(v) for v in body.removeprefix("max ").split()))
    raise AssertionError(family)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("difficulty", [1, 2, 3, 5])
def test_generated_answers_are_right(family, difficulty):
    examples = generate_examples(family, 200, seed=7, difficulty=difficulty)
    assert len(examples) == 200
    for ex in examples:
        assert ex.family == family and ex.reward_scale == (0.0, 1.0)
        assert ex.answer == reference_answer(family, ex.prompt), ex
        assert ex.prompt.endswith("=") and len(ex.prompt) <= 40
        assert all(c in string.printable and c not in "\n\r\t\x0b\x0c" for c in ex.prompt)
        assert is_correct(ex, ex.answer)


def test_family_specifics():
    subs = generate_examples("sub", 500, seed=1, difficulty=3)
    assert all(int(ex.answer) >= 0 for ex in subs)  # a >= b by design
    muls = generate_examples("mul", 100, seed=1, difficulty=2)
    assert all(len(ex.prompt[:-1].split("*")[1]) == 1 for ex in muls)  # second factor one digit
    muls = generate_examples("mul", 100, seed=1, difficulty=4)
    assert all(len(ex.prompt[:-1].split("*")[1]) in (1, 2) for ex in muls)
    assert any(len(ex.prompt[:-1].split("*")[1]) == 2 for ex in muls)
    # sort / reverse keep leading zeros in their answers
    assert any(ex.answer.startswith("0") and len(ex.answer) == 3 for ex in generate_examples("sort", 200, 3, 3))
    counts = [int(ex.answer) for ex in generate_examples("count", 300, seed=2, difficulty=4)]
    assert 0.3 < sum(c > 0 for c in counts) / len(counts) < 0.95  # not mostly zeros


def test_examples_from_documented_prompts():
    add = Example("12+34=", "46", "add")
    assert reference_answer("add", add.prompt) == "46"
    assert reference_answer("sub", "52-17=") == "35"
    assert reference_answer("mul", "23*4=") == "92"
    assert reference_answer("sort", "sort 3142=") == "1234"
    assert reference_answer("count", "count 3 in 32133=") == "3"
    assert reference_answer("reverse", "rev 123=") == "321"


def test_determinism_by_seed():
    a = generate_examples("add", 50, seed=3)
    assert a == generate_examples("add", 50, seed=3)
    assert a != generate_examples("add", 50, seed=4)


@pytest.mark.parametrize("family", ["add", "sort", "reverse", "max"])
def test_difficulty_changes_lengths(family):
    lengths = {d: {len(ex.prompt) for ex in generate_examples(family, 50, seed=0, difficulty=d)} for d in (2, 3, 6)}
    assert max(lengths[2]) < min(lengths[3]) and max(lengths[3]) < min(lengths[6])


def test_unknown_family_and_bad_difficulty():
    with pytest.raises(ConfigError, match=r"unknown task family 'division' \(valid: add, sub, mul, sort"):
        generate_examples("division", 3, seed=0)
    with pytest.raises(ConfigError, match=r"difficulty 13 is out of range for family 'add' \(supported: 1..12\)"):
        generate_examples("add", 3, seed=0, difficulty=13)
    with pytest.raises(ConfigError, match="difficulty 0"):
        generate_examples("sort", 3, seed=0, difficulty=0)
    with pytest.raises(ConfigError, match="reward_scale"):
        generate_examples("add", 3, seed=0, reward_scale=(1.0, 0.0))


def test_make_splits_disjoint_sizes_and_deterministic():
    specs = [FamilySpec("add", 2), FamilySpec("sort", 3, (0.0, 10.0), weight=0.5), FamilySpec("count", 2)]
    train, test = make_splits(specs, n_train=200, n_test=40, seed=5)
    by_family = lambda xs, f: [x for x in xs if x.family == f]  # noqa: E731
    assert [len(by_family(train, f)) for f in ("add", "sort", "count")] == [200, 100, 200]
    assert [len(by_family(test, f)) for f in ("add", "sort", "count")] == [40, 20, 40]
    assert not {x.prompt for x in train} & {x.prompt for x in test}
    assert len({x.prompt for x in test}) == len(test)
    assert all(x.reward_scale == (0.0, 10.0) for x in by_family(train + test, "sort"))
    assert (train, test) == make_splits(specs, 200, 40, seed=5)
    assert (train, test) != make_splits(specs, 200, 40, seed=6)
    # adding a family leaves the others' examples unchanged
    more_train, more_test = make_splits([FamilySpec("sub", 2), *specs], 200, 40, seed=5)
    assert by_family(more_train, "add") == by_family(train, "add")
    assert by_family(more_test, "sort") == by_family(test, "sort")


def test_train_validation_and_test_follow_the_generators_distribution():
    # `count` at difficulty 2 has 1000 prompts and its generator favours digits that occur. Train used to stay
    # distinct until the space ran out, which made it uniform: answer 0 in 83% of train and validation prompts
    # against 41% of test prompts, so a recipe chosen on validation learned "0" and failed on test.
    train, test = make_splits([FamilySpec("count", 2)], n_train=1000, n_test=100, seed=1234)
    rest, validation = carve_validation(train, per_family=40, seed=1234)
    generator = generate_examples("count", 5000, seed=7, difficulty=2)

    def zero_share(examples):
        return sum(ex.answer == "0" for ex in examples) / len(examples)

    # Measured: generator 39%, train 50%, validation 52%, test 45% (disjoint splits of a small space cannot be
    # exact: test takes the generator's most frequent prompts first, so train has fewer of them).
    for examples in (train, rest, validation, test):
        assert abs(zero_share(examples) - zero_share(generator)) < 0.15
    assert abs(zero_share(train) - zero_share(test)) < 0.1
    assert abs(zero_share(validation) - zero_share(test)) < 0.15
    assert len({x.prompt for x in train}) < len(train)  # repeats as the generator makes them


def test_make_splits_small_space_repeats_train_never_overlaps_test():
    # sort at difficulty 1 has 10 prompts: test takes at most half, train repeats the rest
    train, test = make_splits([FamilySpec("sort", 1)], n_train=30, n_test=8, seed=0)
    assert len(test) == 5 and len({x.prompt for x in test}) == 5
    assert len(train) == 30 and len({x.prompt for x in train}) == 5
    assert not {x.prompt for x in train} & {x.prompt for x in test}


def test_make_splits_same_family_twice_stays_disjoint():
    specs = [FamilySpec("reverse", 2, (0.0, 1.0)), FamilySpec("reverse", 2, (-1.0, 1.0))]
    train, test = make_splits(specs, n_train=60, n_test=40, seed=0)
    assert not {x.prompt for x in train} & {x.prompt for x in test}
    assert len({x.prompt for x in test}) == len(test) == 70  # 40, then half of the 60 left


def test_carve_validation_is_disjoint_sized_and_deterministic():
    train, test = make_splits([FamilySpec("add", 2), FamilySpec("sort", 1)], n_train=200, n_test=4, seed=3)
    rest, validation = carve_validation(train, per_family=30, seed=3)
    by_family = lambda xs, f: [x for x in xs if x.family == f]  # noqa: E731
    assert len(by_family(validation, "add")) == 30
    # sort at difficulty 1: 10 prompts, test took 4, train repeats the other 6; half of them are carved
    assert len(by_family(validation, "sort")) == 3
    assert len({x.prompt for x in validation}) == len(validation)
    assert not {x.prompt for x in rest} & {x.prompt for x in validation}  # every copy of a carved prompt left train
    carved = {x.prompt for x in validation}
    assert len(rest) == len(train) - sum(x.prompt in carved for x in train)  # only the carved prompts left
    assert len({x.prompt for x in by_family(rest, "sort")}) == 3
    assert (rest, validation) == carve_validation(train, per_family=30, seed=3)
    assert carve_validation(train, per_family=0, seed=3) == (train, [])
    with pytest.raises(ConfigError, match=">= 0"):
        carve_validation(train, per_family=-1, seed=3)


def test_distinct_weighted_sample_prefers_heavy_items_and_is_plain_sample_at_weight_one():
    items = [f"p{i}" for i in range(20)]
    assert _distinct_weighted_sample(random.Random(3), items, [1] * 20, 7) == random.Random(3).sample(items, 7)
    heavy_first = 0
    for seed in range(200):
        picked = _distinct_weighted_sample(random.Random(seed), items, [50] + [1] * 19, 3)
        assert len(set(picked)) == 3
        heavy_first += "p0" in picked
    assert heavy_first > 180  # weight 50 of 69: nearly always among three picks (uniform would be 30 of 200)


def test_make_splits_errors():
    with pytest.raises(ConfigError, match="unknown task family 'nope'"):
        make_splits([FamilySpec("nope")], 10, 10, 0)
    with pytest.raises(ConfigError, match="out of range"):
        make_splits([FamilySpec("add", 20)], 10, 10, 0)


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    "text, numeric, expected",
    [
        ("1,234", True, "1234"),
        ("+5", True, "5"),
        ("42.0", True, "42"),
        ("007", True, "7"),
        ("-0", True, "0"),
        ("2.50", True, "2.5"),
        (" 12,345,678 ", True, "12345678"),
        ("-3.", True, "-3"),
        ("1,23", True, "1,23"),  # not a number as written: left alone
        ("abc", True, "abc"),
        ("007", False, "007"),
        (" 0123 ", False, "0123"),
    ],
)
def test_normalize_answer(text, numeric, expected):
    assert normalize_answer(text, numeric) == expected


@pytest.mark.parametrize(
    "completion, family, expected",
    [
        ("46", "add", "46"),
        ("46\nand more", "add", "46"),
        ("\n  46  \n", "add", "46"),
        ("so the answer is\n#### 1,234", None, "1234"),
        ("work #### 3 #### 7\nafter", None, "7"),
        ("the answer is \\boxed{42}.", None, "42"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", None, "\\frac{1}{2}"),
        ("\\boxed{12", None, "\\boxed{12"),  # unbalanced box: falls back to the first line
        ("007", "add", "7"),
        ("007", "reverse", "007"),
        ("0123", "sort", "0123"),
        ("", "add", None),
        ("   \n ", "add", None),
        ("####   ", None, None),
        ("\\boxed{ }", None, None),
        ([{"role": "assistant", "content": "46"}], "add", "46"),
    ],
)
def test_extract_answer(completion, family, expected):
    assert extract_answer(completion, family) == expected


def test_completion_text_and_numeric_flags():
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "4"}, {"type": "text", "text": "2"}]}]) == "42"
    with pytest.raises(TypeError, match="got int"):
        completion_text(5)
    assert answer_is_numeric("add") and answer_is_numeric("gsm8k") and answer_is_numeric(None)
    assert not answer_is_numeric("sort") and not answer_is_numeric("reverse")


def test_is_correct():
    assert is_correct(Example("rev 120=", "021", "reverse"), "021")
    assert not is_correct(Example("rev 120=", "021", "reverse"), "21")
    assert is_correct(Example("q", "1234", "gsm8k"), "blah\n#### 1,234")
    assert is_correct(Example("9+9=", "18", "add"), "18.0")
    assert not is_correct(Example("9+9=", "18", "add"), "18 because")
    assert not is_correct(Example("9+9=", "18", "add"), "")


@given(st.integers(min_value=-(10**15), max_value=10**15))
@settings(max_examples=200, deadline=None)
def test_normalize_round_trips_integer_spellings(value):
    canonical = str(value)
    assert normalize_answer(f"{value:,}") == canonical
    assert normalize_answer(f"{value}.000") == canonical
    assert normalize_answer(canonical) == canonical


# --------------------------------------------------------------------------- JSONL


def write(tmp_path, lines, name="x.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    return path


def test_load_jsonl_plain_and_blank_lines(tmp_path):
    path = write(tmp_path, [json.dumps({"prompt": "2+2=", "answer": "4"}), "", "  ", json.dumps({"prompt": "p", "answer": 7})])
    examples = load_jsonl(path, family="mine", reward_scale=(0, 10))
    assert examples == [Example("2+2=", "4", "mine", (0.0, 10.0)), Example("p", "7", "mine", (0.0, 10.0))]


def test_load_jsonl_gsm8k_sample():
    examples = load_jsonl(SAMPLE_GSM8K, prompt_key="question", family="gsm8k")
    assert len(examples) == 12
    assert examples[0].answer == "39" and examples[0].prompt.startswith("Mara has 3 boxes")
    assert examples[-1].answer == "2250"  # "#### 2,250"
    assert all(ex.answer.isdigit() for ex in examples)
    for line, ex in zip(SAMPLE_GSM8K.read_text().splitlines(), examples):
        assert is_correct(ex, json.loads(line)["answer"])  # the worked solution itself is a correct completion


def test_load_jsonl_gsm8k_needs_explicit_prompt_key(tmp_path):
    path = write(tmp_path, [json.dumps({"question": "q", "answer": "x\n#### 5"})])
    with pytest.raises(DataError, match=r"line 1: missing key 'prompt' \(keys present: question, answer\)"):
        load_jsonl(path)


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a", "answer": "1"}', "", '{"prompt": "b" "answer": "2"}'], r"x.jsonl line 3: invalid JSON \(Expecting ',' delimiter"),
        (['{"prompt": "a", "solution": "1"}'], r"x.jsonl line 1: missing key 'answer' \(keys present: prompt, solution\)"),
        (['{"prompt": 5, "answer": "1"}'], r"x.jsonl line 1: 'prompt' must be a non-empty string, got int 5"),
        (['{"prompt": "  ", "answer": "1"}'], r"x.jsonl line 1: 'prompt' must be a non-empty string, got an empty string"),
        (['{"prompt": "a", "answer": "1"}', '{"prompt": "a", "answer": "work\\n####  "}'], r"x.jsonl line 2: 'answer' must be a non-empty"),
        (['{"prompt": "a", "answer": null}'], r"x.jsonl line 1: 'answer' must be a non-empty string or a finite number, got None"),
        (['{"prompt": "a", "answer": NaN}'], r"x.jsonl line 1: 'answer' must be a non-empty string or a finite number, got nan"),
        (['{"prompt": "a", "answer": 1e999}'], r"x.jsonl line 1: 'answer' must be a non-empty string or a finite number, got inf"),
        (['{"prompt": "a", "answer": -Infinity}'], r"x.jsonl line 1: 'answer' must be a non-empty string or a finite number, got -inf"),
        (['["prompt", "answer"]'], r"x.jsonl line 1: expected a JSON object, got list"),
        ([], r"x.jsonl: no examples \(file is empty\)"),
        (["", "   "], r"x.jsonl: no examples \(only blank lines\)"),
    ],
)
def test_load_jsonl_errors(tmp_path, lines, message):
    path = write(tmp_path, lines)
    with pytest.raises(DataError, match=message):
        load_jsonl(path)


def test_load_jsonl_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match=r"nothere.jsonl: file not found"):
        load_jsonl(tmp_path / "nothere.jsonl")
    with pytest.raises(DataError, match="not a file"):
        load_jsonl(tmp_path)


# --------------------------------------------------------------------------- chat style (a real chat model)

from fgrpo.data.tasks import CHAT_INSTRUCTION, chat_prompt, with_prompt_style  # noqa: E402


@pytest.mark.parametrize(
    "family,compact,question",
    [
        ("add", "12+34=", "What is 12 + 34?"),
        ("sub", "51-7=", "What is 51 - 7?"),
        ("mul", "46*4=", "What is 46 times 4?"),
        ("sort", "sort 3142=", "Write the digits of 3142 sorted from smallest to largest."),
        ("count", "count 4 in 0414=", "How many times does the digit 4 appear in 0414?"),
        ("reverse", "rev 120=", "Write the digits of 120 in reverse order."),
        ("max", "max 12 7 30=", "Which is the largest of 12, 7 and 30?"),
    ],
)
def test_every_family_asks_its_question_in_words(family, compact, question):
    assert chat_prompt(family, compact) == f"{question} {CHAT_INSTRUCTION}"


def test_chat_style_rewrites_prompts_one_to_one_and_keeps_answers():
    train, test = make_splits([FamilySpec(name, 3) for name in FAMILIES], 30, 10, seed=0)
    chat = with_prompt_style(test, "chat")
    assert [ex.answer for ex in chat] == [ex.answer for ex in test]
    assert len({ex.prompt for ex in chat}) == len({ex.prompt for ex in test})  # distinct stays distinct
    assert all(ex.answer_style == "sentence" and ex.prompt.endswith(CHAT_INSTRUCTION) for ex in chat)
    assert with_prompt_style(test, "compact") == test
    loaded = Example("Tom has 3 apples…", "5", "gsm8k")
    assert with_prompt_style([loaded], "chat")[0].prompt == loaded.prompt  # data files keep their own words


@pytest.mark.parametrize(
    "completion,family,expected",
    [
        ("6 + 7 = 13, so Tom has 13 apples. The answer is 13.", "add", "13"),
        ("The answer is $1,234$.", "add", "1234"),
        ("**Answer:** 42", "max", "42"),
        ("So 3.5 is it. The answer is 3.5.", None, "3.5"),
        ("The answer is 13 apples.", "add", "13"),
        ("so the total is 42", "add", "42"),  # no stated answer: the last number
        ("The answer is 0124.", "sort", "0124"),  # string families keep leading zeros
        ("the answer is 12\nthen I counted 99", "count", "12"),  # a stated answer beats a later number
        ("I am not sure.", "add", None),
        ("The answer is N.", "add", "N"),  # the placeholder copied: no number, so never correct
    ],
)
def test_answers_are_read_from_verbose_replies(completion, family, expected):
    assert extract_answer(completion, family, "sentence") == expected


def test_line_style_is_unchanged_for_the_tiny_model():
    assert extract_answer("46\nThe answer is 12.", "add") == "46"
    assert extract_answer("46\nThe answer is 12.", "add", "sentence") == "12"


def test_prompt_style_auto_follows_the_model(tmp_path):
    from fgrpo.config import config_from_dict

    assert config_from_dict({"model": {"source": "tiny"}}).tasks.prompt_style == "compact"
    assert config_from_dict({"model": {"source": "smollm2-135m"}}).tasks.prompt_style == "chat"
    assert config_from_dict({"model": {"source": "tiny"}, "tasks": {"prompt_style": "chat"}}).tasks.prompt_style == "chat"
