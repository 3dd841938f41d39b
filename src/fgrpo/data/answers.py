"""Answer handling: find a completion's final answer and put answers in canonical form.

Plain text functions with no task knowledge, shared by the task families
(`tasks`), the math checker (`mathcheck`), the rewards (`rewards`) and the
dataset sources (`sources`): the one module they all read, so none of them
needs another's private helpers.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

from fgrpo.errors import RewardError

# A number as people write it: optional sign, optional thousands commas, optional decimals.
NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d*)(?:\.\d*)?")


def normalize_answer(text: str, numeric: bool = True) -> str:
    """Canonical form of an answer for comparison (the rules are in `fgrpo.data.tasks`' module docstring).

    `numeric=True` canonicalizes text that parses as a number and returns
    other text stripped; `numeric=False` only strips.
    """
    text = text.strip()
    if not numeric or not any(c.isdigit() for c in text) or not NUMBER.fullmatch(text):
        return text
    value = Decimal(text.replace(",", ""))
    if value == value.to_integral_value():
        return str(int(value))  # also maps "-0" to "0"
    return format(value.normalize(), "f")


def completion_text(completion) -> str:
    """The text of a completion: a string, or TRL's conversational list of messages (last one's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)
    if isinstance(completion, list) and not completion:
        return ""
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def boxed(text: str) -> str | None:
    """Content of the last well-formed \\boxed{...} (braces may nest), else None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i]
            depth -= 1
    return None


ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def answer_region(text: str) -> str:
    """The inside of the last <answer>…</answer> when there is one (R1-style output), else the text."""
    tagged = ANSWER_TAG.findall(text)
    return tagged[-1] if tagged else text


# How a completion states its answer (`Example.answer_style`):
# - "line": the answer is the completion's first non-empty line ("46"): compact prompts like "12+34=" for
#   the character-level tiny model;
# - "sentence": a chat model's verbose reply ("6 + 7 = 13, so Tom has 13 apples. The answer is 13."): the
#   last stated answer ("the answer is X", "answer: X"), else the last number in the reply.
ANSWER_STYLES = ("line", "sentence")

# "The answer is 42.", "the final answer is: $42$", "Answer: 42", "**Answer:** 42"; the value runs to the end
# of its sentence or line. A period followed by a digit is a decimal point, not the end.
STATED_ANSWER = re.compile(
    r"answer(?:\s+is)?\s*[:=]?\s*(?:\*\*)?\s*[:=]?\s*([^\n]*?)\s*(?:\.(?!\d)|\n|$)", re.IGNORECASE
)
LAST_NUMBER = re.compile(r"[+-]?\d[\d,]*(?:\.\d+)?")


def stated_answer(text: str) -> str | None:
    """The value of the last "the answer is X" / "Answer: X" in `text`, without markdown or $…$; else None."""
    for match in reversed(list(STATED_ANSWER.finditer(text))):
        value = match.group(1).strip().strip("*$` ").rstrip(".").strip()
        if value:
            return value
    return None


def states_answer(text: str) -> bool:
    """Whether a reply marks its final answer: <answer>…</answer>, "#### x", \\boxed{x} or "the answer is x"."""
    region = answer_region(text)
    return bool(ANSWER_TAG.search(text)) or "####" in region or boxed(region) is not None or stated_answer(region) is not None


def last_number(text: str) -> str | None:
    """The last number written in `text` ("… so 12 + 30 = 42" -> "42"), trailing commas dropped."""
    numbers = LAST_NUMBER.findall(text)
    return numbers[-1].rstrip(",") if numbers else None


def raw_answer(text: str, style: str = "line") -> str | None:
    """A completion's final answer as written (see ANSWER_STYLES); None when it gives none."""
    text = answer_region(text)
    if "####" in text:
        after = text.rsplit("####", 1)[1].strip()
        return after.splitlines()[0].strip() if after else None
    boxed_answer = boxed(text)
    if boxed_answer is not None:
        return boxed_answer.strip() or None
    if style == "sentence":
        return stated_answer(text) or last_number(text)
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return None


def answer_from_value(value, numeric: bool) -> str | None:
    """A reference answer from a JSON value: a number, a string, or a GSM8K solution ending in '#### n'.

    NaN and ±inf (JSON's `NaN`, or `1e999` read as inf) are no answer: every completion would be scored
    against the text 'nan' or 'inf'."""
    if not is_answer_scalar(value):
        return None
    text = str(value)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    text = normalize_answer(text, numeric)
    return text or None


def is_answer_scalar(value) -> bool:
    """A string, an integer or a finite float (not a bool, NaN or ±inf): what a reference answer may be."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return False
    return not isinstance(value, float) or math.isfinite(value)


def answer_column(kwargs: dict, function: str) -> list:
    """The dataset column 'answer' a reward function needs, or a RewardError naming the function."""
    if "answer" not in kwargs:
        raise RewardError(f"{function} needs the dataset column 'answer' (columns given: {', '.join(kwargs) or 'none'})")
    return list(kwargs["answer"])
