"""Verifiable tasks: synthetic families, JSONL / GSM8K loaders, answer extraction.

An `Example` is a prompt, its reference answer and a family label. Built-in
families are short digit puzzles ("12+34=" -> "46") a character-level tiny
model can learn, so GRPO has a reward signal within minutes on a CPU.

Answer normalization is per family, because "007" and "7" are the same
answer to an arithmetic question but different answers to "rev 700=":

- numeric families (add, sub, mul, count, max) and loaded data: an answer that
  parses as a number is canonicalized ("1,234" -> "1234", "+5" -> "5",
  "42.0" -> "42", "007" -> "7", "2.50" -> "2.5"); anything else is compared
  as its stripped text.
- string families (sort, reverse): only surrounding whitespace is stripped;
  leading zeros are part of the answer.

A family name that is not built in (a loaded file's label) is numeric.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fgrpo.data.answers import (  # noqa: F401  (answer handling is re-exported here)
    LAST_NUMBER,
    answer_from_value,
    answer_region,
    boxed,
    completion_text,
    normalize_answer,
    raw_answer,
)
from fgrpo.errors import ConfigError, DataError

DIGITS = "0123456789"
MAX_DIFFICULTY = 12
# Shipped sample in GSM8K format (load with prompt_key="question").
SAMPLE_GSM8K = Path(__file__).parent / "sample_gsm8k.jsonl"

# An answer of loaded data is well-formed when it is a number (after normalization).
LOADED_ANSWER_PATTERN = r"-?\d+(?:\.\d+)?"


# The fields of an Example that reward functions receive as dataset columns (their one home).
EXAMPLE_COLUMNS = ("answer", "family", "reward_scale", "answer_style")


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str  # the reference final answer, normalized for its family (e.g. "46")
    family: str  # task label ("add", ...); for loaded files the configured family name
    reward_scale: tuple[float, float] = (0.0, 1.0)  # a score s in [0, 1] maps to low + (high - low) * s
    checker: str = "exact"  # how correctness is judged: "exact" (normalized string) or "math" (math-verify)
    # Other columns of a loaded row ("source", "subject", "level", ...): partition labels and reward kwargs.
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    answer_style: str = "line"  # how completions state the answer: "line" or "sentence" (answers.ANSWER_STYLES)

    def __post_init__(self) -> None:
        low, high = (float(v) for v in self.reward_scale)
        if not low < high:
            raise ConfigError(f"reward_scale must be (low, high) with low < high, got {list(self.reward_scale)}")
        # Tuples from TOML/JSON arrive as lists; keep the dataclass hashable.
        object.__setattr__(self, "reward_scale", (low, high))

    def columns(self) -> dict:
        """The dataset columns reward functions receive (as lists) through **kwargs."""
        return {key: getattr(self, key) for key in EXAMPLE_COLUMNS}


@dataclass(frozen=True)
class TaskFamily:
    name: str
    description: str
    generate: Callable[[random.Random, int], tuple[str, str]]  # (rng, difficulty) -> (prompt, answer)
    answer_pattern: str  # regex a well-formed (normalized) answer fully matches
    numeric: bool  # answers compared as numbers ("007" == "7") or as strings
    num_prompts: Callable[[int], int]  # size of the prompt space at a difficulty
    max_difficulty: int = MAX_DIFFICULTY
    min_difficulty: int = 1

    def check_difficulty(self, difficulty: int) -> None:
        if isinstance(difficulty, bool) or not isinstance(difficulty, int):
            raise ConfigError(f"difficulty of family '{self.name}' must be an integer, got {difficulty!r}")
        if not self.min_difficulty <= difficulty <= self.max_difficulty:
            raise ConfigError(
                f"difficulty {difficulty} is out of range for family '{self.name}' "
                f"(supported: {self.min_difficulty}..{self.max_difficulty})"
            )


# --------------------------------------------------------------------------- generators


def _count_numbers(digits: int) -> int:
    """How many `digits`-digit numbers there are (0..9 for one digit, no leading zeros above)."""
    return 10 if digits == 1 else 9 * 10 ** (digits - 1)


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(0, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10**digits - 1)


def _digit_string(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(DIGITS) for _ in range(length))


def _mul_second_digits(difficulty: int) -> int:
    """The second factor stays 1 digit up to difficulty 3, then grows one digit per 3 levels."""
    return 1 + (difficulty - 1) // 3


def _add(rng: random.Random, d: int) -> tuple[str, str]:
    a, b = _number(rng, d), _number(rng, d)
    return f"{a}+{b}=", str(a + b)


def _sub(rng: random.Random, d: int) -> tuple[str, str]:
    a, b = _number(rng, d), _number(rng, d)
    a, b = max(a, b), min(a, b)  # a >= b: answers are never negative (one less thing for a tiny model)
    return f"{a}-{b}=", str(a - b)


def _mul(rng: random.Random, d: int) -> tuple[str, str]:
    a, b = _number(rng, d), _number(rng, _mul_second_digits(d))
    return f"{a}*{b}=", str(a * b)


def _sort(rng: random.Random, d: int) -> tuple[str, str]:
    s = _digit_string(rng, d)
    return f"sort {s}=", "".join(sorted(s))


def _count(rng: random.Random, d: int) -> tuple[str, str]:
    s = _digit_string(rng, d)
    # Half the time count a digit that occurs, so answers are not mostly "0".
    target = rng.choice(s) if rng.random() < 0.5 else rng.choice(DIGITS)
    return f"count {target} in {s}=", str(s.count(target))


def _reverse(rng: random.Random, d: int) -> tuple[str, str]:
    s = _digit_string(rng, d)
    return f"rev {s}=", s[::-1]


def _max(rng: random.Random, d: int) -> tuple[str, str]:
    values = [_number(rng, d) for _ in range(3)]
    return f"max {values[0]} {values[1]} {values[2]}=", str(max(values))


# --------------------------------------------------------------------------- chat style
# A chat model answers questions in sentences, not "12+34=" strings: `tasks.prompt_style = "chat"` asks each
# family's question in words and tells the model how to state its answer, which `answers.raw_answer`
# (style "sentence") then reads. The compact prompt stays the example's identity for splits and dedup: the
# chat wording is a one-to-one rewrite of it.

CHAT_INSTRUCTION = "End your reply with 'The answer is N.'"
_COMPACT = {
    "add": re.compile(r"(\d+)\+(\d+)="),
    "sub": re.compile(r"(\d+)-(\d+)="),
    "mul": re.compile(r"(\d+)\*(\d+)="),
    "sort": re.compile(r"sort (\d+)="),
    "count": re.compile(r"count (\d) in (\d+)="),
    "reverse": re.compile(r"rev (\d+)="),
    "max": re.compile(r"max (\d+) (\d+) (\d+)="),
}
_CHAT_QUESTIONS = {
    "add": "What is {0} + {1}?",
    "sub": "What is {0} - {1}?",
    "mul": "What is {0} times {1}?",
    "sort": "Write the digits of {0} sorted from smallest to largest.",
    "count": "How many times does the digit {0} appear in {1}?",
    "reverse": "Write the digits of {0} in reverse order.",
    "max": "Which is the largest of {0}, {1} and {2}?",
}


def chat_prompt(family: str, compact: str) -> str:
    """A built-in family's compact prompt asked in words, with the answer instruction ("12+34=" -> "What is 12 + 34? …")."""
    match = _COMPACT[family].fullmatch(compact)
    if match is None:
        raise ValueError(f"'{compact}' is not a compact '{family}' prompt")
    return f"{_CHAT_QUESTIONS[family].format(*match.groups())} {CHAT_INSTRUCTION}"


def with_prompt_style(examples: Sequence[Example], style: str) -> list[Example]:
    """Examples for a prompt style: "compact" leaves them; "chat" words built-in prompts and reads answers from sentences."""
    if style == "compact":
        return list(examples)
    return [
        dataclasses.replace(
            ex,
            prompt=chat_prompt(ex.family, ex.prompt) if ex.family in _COMPACT and _COMPACT[ex.family].fullmatch(ex.prompt) else ex.prompt,
            answer_style="sentence",
        )
        for ex in examples
    ]


FAMILIES: dict[str, TaskFamily] = {
    family.name: family
    for family in (
        TaskFamily("add", "a+b with two d-digit operands", _add, r"\d+", True, lambda d: _count_numbers(d) ** 2),
        TaskFamily(
            "sub",
            "a-b with two d-digit operands, a >= b (answers never negative)",
            _sub,
            r"\d+",
            True,
            lambda d: _count_numbers(d) * (_count_numbers(d) + 1) // 2,
        ),
        TaskFamily(
            "mul",
            "a*b, a with d digits, b with 1 digit (d <= 3), one more digit every 3 levels",
            _mul,
            r"\d+",
            True,
            lambda d: _count_numbers(d) * _count_numbers(_mul_second_digits(d)),
        ),
        TaskFamily("sort", "sort the d digits ascending (leading zeros kept)", _sort, r"\d+", False, lambda d: 10**d),
        TaskFamily("count", "count a digit in a d-digit string", _count, r"\d+", True, lambda d: 10 ** (d + 1)),
        TaskFamily("reverse", "reverse a d-digit string (leading zeros kept)", _reverse, r"\d+", False, lambda d: 10**d),
        TaskFamily("max", "largest of three d-digit numbers", _max, r"\d+", True, lambda d: _count_numbers(d) ** 3),
    )
}


def get_family(name: str) -> TaskFamily:
    if name not in FAMILIES:
        raise ConfigError(f"unknown task family '{name}' (valid: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def answer_is_numeric(family: str | None) -> bool:
    """Built-in families say; anything else (loaded data, None) compares as numbers."""
    return FAMILIES[family].numeric if family in FAMILIES else True


def answer_pattern(family: str | None) -> str:
    return FAMILIES[family].answer_pattern if family in FAMILIES else LOADED_ANSWER_PATTERN


# --------------------------------------------------------------------------- generation and splits


def generate_examples(
    family: str, n: int, seed: int, difficulty: int = 2, reward_scale: tuple[float, float] = (0.0, 1.0)
) -> list[Example]:
    """`n` independent draws (repeats possible), deterministic given `seed`."""
    task = get_family(family)
    task.check_difficulty(difficulty)
    if n < 0:
        raise ConfigError(f"number of examples must be >= 0, got {n}")
    rng = random.Random(seed)
    return [Example(*task.generate(rng, difficulty), family, reward_scale) for _ in range(n)]


@dataclass(frozen=True)
class FamilySpec:
    name: str
    difficulty: int = 2
    reward_scale: tuple[float, float] = (0.0, 1.0)
    weight: float = 1.0  # scales this family's share of n_train / n_test


@dataclass
class _Space:
    """Test prompts already taken from one (family, difficulty) prompt space."""

    size: int
    test_prompts: set[str] = field(default_factory=set)


def _draw_budget(n: int) -> int:
    # Rejection sampling bound: generous for any generator, finite for every one.
    return 50 * n + 1000


def make_splits(
    specs: Sequence[FamilySpec], n_train: int, n_test: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, test), in spec order, with no prompt in both.

    Per family: max(1, round(n * weight)) examples. Test prompts are distinct
    and drawn first; train is independent draws from the family's generator
    that are not test prompts, so a prompt repeats as often as the generator
    makes it. Train and test therefore follow the same distribution. (Keeping
    train distinct flattened it toward uniform once a small prompt space ran
    out: `count` at difficulty 2 then had the answer 0 in 83% of its training
    prompts against 41% of its test prompts.) A test split never takes more
    than half of a family's prompt space (e.g. `sort` at difficulty 2 has only
    100 prompts), so train always has prompts of its own. Each spec's draws
    are seeded by (seed, family, difficulty, occurrence), so adding a family
    leaves the others' examples unchanged.
    """
    if n_train < 1 or n_test < 1:
        raise ConfigError(f"n_train and n_test must be >= 1, got {n_train} and {n_test}")
    spaces: dict[tuple[str, int], _Space] = {}
    occurrences: Counter = Counter()
    plans = []
    for spec in specs:
        task = get_family(spec.name)
        task.check_difficulty(spec.difficulty)
        if not spec.weight > 0:
            raise ConfigError(f"weight of family '{spec.name}' must be > 0, got {spec.weight}")
        key = (spec.name, spec.difficulty)
        space = spaces.setdefault(key, _Space(task.num_prompts(spec.difficulty)))
        rng = random.Random(f"{seed}/{spec.name}/{spec.difficulty}/{occurrences[key]}")
        occurrences[key] += 1
        plans.append((spec, task, space, rng))

    test: list[Example] = []
    for spec, task, space, rng in plans:
        available = space.size - len(space.test_prompts)
        wanted = min(max(1, round(n_test * spec.weight)), available // 2)
        if wanted < 1:
            raise ConfigError(
                f"family '{spec.name}' at difficulty {spec.difficulty} has too few distinct prompts "
                f"({space.size}) for disjoint train and test splits; raise its difficulty"
            )
        drawn: list[Example] = []
        for _ in range(_draw_budget(wanted)):
            if len(drawn) == wanted:
                break
            prompt, answer = task.generate(rng, spec.difficulty)
            if prompt not in space.test_prompts:
                space.test_prompts.add(prompt)
                drawn.append(Example(prompt, answer, spec.name, spec.reward_scale))
        test += drawn

    train: list[Example] = []
    for spec, task, space, rng in plans:
        wanted = max(1, round(n_train * spec.weight))
        drawn = []
        while len(drawn) < wanted:  # ends: test holds at most half of the prompt space
            prompt, answer = task.generate(rng, spec.difficulty)
            if prompt not in space.test_prompts:
                drawn.append(Example(prompt, answer, spec.name, spec.reward_scale))
        train += drawn
    return train, test


def carve_validation(train: Sequence[Example], per_family: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): `per_family` distinct training prompts per family set aside for validation.

    A chosen prompt leaves train with all its copies (small prompt spaces repeat
    prompts), so no validation prompt is ever trained on; the held-out test set
    is drawn before train and is untouched. A prompt is chosen with a chance
    proportional to its copies in train, so validation follows the training
    distribution rather than a uniform one over distinct prompts (the two
    differ where a generator favours some prompts, e.g. `count`). At most half
    of a family's distinct training prompts are carved, so train keeps prompts
    of its own. Chosen by (seed, family), so the carve does not depend on the
    other families.
    """
    if per_family < 0:
        raise ConfigError(f"validation examples per family must be >= 0, got {per_family}")
    first_example: dict[str, dict[str, Example]] = {}
    copies: Counter = Counter(example.prompt for example in train)
    for example in train:
        first_example.setdefault(example.family, {}).setdefault(example.prompt, example)
    chosen: set[str] = set()
    validation: list[Example] = []
    for family, examples in first_example.items():
        prompts = sorted(examples)
        picked = _distinct_weighted_sample(
            random.Random(f"{seed}/validation/{family}"),
            prompts,
            [copies[prompt] for prompt in prompts],
            min(per_family, len(prompts) // 2),
        )
        chosen.update(picked)
        validation += [examples[prompt] for prompt in picked]
    return [ex for ex in train if ex.prompt not in chosen], validation


def _distinct_weighted_sample(rng: random.Random, items: list[str], weights: list[int], k: int) -> list[str]:
    """`k` distinct items, each drawn with a chance proportional to its integer weight, without replacement.

    `random.sample(..., counts=...)` draws copies, so it may pick one item twice: those picks are topped
    up from the items not yet chosen. With every weight 1 this is exactly `rng.sample(items, k)`.
    """
    picked: list[str] = []
    while len(picked) < k:
        left = [(item, weight) for item, weight in zip(items, weights) if item not in picked]
        draws = rng.sample([item for item, _ in left], k - len(picked), counts=[weight for _, weight in left])
        picked += list(dict.fromkeys(draws))
    return picked


# --------------------------------------------------------------------------- answers


def extract_answer(completion, family: str | None = None, style: str = "line") -> str | None:
    """The final answer of a completion, normalized the way `family` compares answers.

    Looked for inside the last <answer>...</answer> when present; there,
    taken from after the last "####" if present, else from the last
    \\boxed{...}, else (style "line") the first non-empty line or (style
    "sentence", a chat model's reply) the last "the answer is X", else the
    last number. None when there is none (empty completion, nothing after
    "####", empty box). `family=None` means numeric normalization, as for
    loaded data. A numeric answer stated with words around it ("13 apples")
    is its first number.
    """
    raw = raw_answer(completion_text(completion), style)
    if raw is None:
        return None
    numeric = answer_is_numeric(family)
    answer = normalize_answer(raw, numeric)
    if style == "sentence" and numeric and not re.fullmatch(LOADED_ANSWER_PATTERN, answer):
        number = LAST_NUMBER.search(raw)
        answer = normalize_answer(number.group(0).rstrip(","), numeric) if number else answer
    return answer


def is_correct(example: Example, completion) -> bool:
    if example.checker == "math":
        from fgrpo.data.mathcheck import math_answer_correct

        return math_answer_correct(example.answer, completion)
    predicted = extract_answer(completion, example.family, example.answer_style)
    return predicted is not None and predicted == normalize_answer(example.answer, answer_is_numeric(example.family))


# --------------------------------------------------------------------------- JSONL


def jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for every non-blank line of a JSONL file; `where` is "FILE line N" for errors."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})", public=f"{path}: not UTF-8 text (at byte {exc.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def load_jsonl(
    path: str | Path,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    family: str = "jsonl",
    reward_scale: tuple[float, float] = (0.0, 1.0),
) -> list[Example]:
    """One Example per non-blank line; errors name the file and line.

    GSM8K files: pass prompt_key="question"; their worked-solution answers
    ("... #### 42") become "42".
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    numeric = answer_is_numeric(family)
    examples = []
    any_marked, unmarked_at = False, None
    for where, record in jsonl_records(path):
        for key in (prompt_key, answer_key):
            if key not in record:
                raise DataError(f"{where}: missing key '{key}' (keys present: {', '.join(record) or 'none'})")
        prompt = record[prompt_key]
        if not isinstance(prompt, str) or not prompt.strip():
            got = "an empty string" if isinstance(prompt, str) else f"{type(prompt).__name__} {prompt!r}"
            raise DataError(
                f"{where}: '{prompt_key}' must be a non-empty string, got {got}",
                public=f"{where}: '{prompt_key}' must be a non-empty string, got {type(prompt).__name__}",
            )
        answer = answer_from_value(record[answer_key], numeric)
        if answer is None:
            raise DataError(
                f"{where}: '{answer_key}' must be a non-empty string or a finite number, got {record[answer_key]!r}",
                public=f"{where}: '{answer_key}' must be a non-empty string or a finite number",
            )
        marked = isinstance(record[answer_key], str) and "####" in record[answer_key]
        if unmarked_at is None and not marked:
            unmarked_at = where
        any_marked = any_marked or marked
        if any_marked and unmarked_at is not None:
            # GSM8K-style answers end in '#### n'; without it the whole solution would be the reference.
            raise DataError(
                f"{unmarked_at}: '{answer_key}' has no final answer '#### n', but other lines of {path.name} end "
                "their solutions that way; add the '#### n' line (or remove the example)"
            )
        examples.append(Example(prompt, answer, family, reward_scale))
    if not examples:
        reason = "file is empty" if path.stat().st_size == 0 else "only blank lines"
        raise DataError(f"{path}: no examples ({reason})")
    return examples


def train_test_split(examples: Sequence[Example], test_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Shuffle with `seed` and hold out round(n · test_fraction) examples (at least one when there are two)."""
    examples = list(examples)
    random.Random(seed).shuffle(examples)
    num_test = max(1, round(len(examples) * test_fraction)) if len(examples) > 1 else 0
    return examples[num_test:], examples[:num_test]
