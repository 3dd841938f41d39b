"""Mathematical answer equivalence with math-verify, and the reasoning-format rewards.

Exact string match undercounts real reasoning models: "\\frac{1}{2}", "0.5",
"1/2" and "\\dfrac12" are one answer. math-verify parses both sides to SymPy
and compares them (numerically, symbolically, as sets or intervals), so the
reward follows the mathematics rather than the typography.

Where the prediction is looked for, in order: inside the last
<answer>…</answer> if there is one; there, after "####" (GSM8K style) if
present; else math-verify's own extraction (the last \\boxed{}, then the last
LaTeX or plain expression).

math-verify bounds parsing with SIGALRM, which only works in the main
thread; off the main thread (a Flower worker) the timeout is disabled.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache

from fgrpo.data.answers import answer_column, answer_region, completion_text

_THINK_ANSWER = re.compile(r"^\s*<think>.*?</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)


def _timeout() -> int | None:
    return 5 if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=4096)
def _parse_gold(answer: str) -> tuple:
    """A reference answer parsed once: '\\frac{1}{2}', '42', '$x^2$' or a full '\\boxed{...}' solution."""
    from math_verify import parse

    text = answer.strip()
    if "\\boxed" not in text and "$" not in text:
        text = f"${text}$"  # bare LaTeX like '\frac{1}{2}' needs delimiters to be found
    return tuple(parse(text, parsing_timeout=_timeout()))


def _prediction_text(completion) -> str:
    text = answer_region(completion_text(completion))
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    return text


def math_answer_correct(reference: str, completion) -> bool:
    """True when the completion's final answer equals `reference` mathematically."""
    from math_verify import parse, verify

    gold = _parse_gold(str(reference))
    if not gold:
        return False
    text = _prediction_text(completion)
    if not text.strip():
        return False
    predicted = parse(text, parsing_timeout=_timeout())
    if not predicted:
        return False
    return bool(verify(list(gold), predicted, timeout_seconds=_timeout()))


def math_verify_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 when math-verify finds the answer equivalent to the reference column 'answer', else 0.0."""
    answers = answer_column(kwargs, "math_verify_reward")
    return [float(math_answer_correct(str(answer), completion)) for completion, answer in zip(completions, answers)]


def think_answer_format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 for exactly '<think>…</think><answer>…</answer>' (whitespace between allowed) with a non-empty answer."""
    scores = []
    for completion in completions:
        match = _THINK_ANSWER.match(completion_text(completion))
        scores.append(float(match is not None and bool(match.group(1).strip())))
    return scores


def length_penalty_reward(
    prompts, completions, completion_ids=None, max_length: int = 1024, soft_cache: int | None = None, **kwargs
) -> list[float]:
    """DAPO's soft overlong punishment: 0 up to max_length − soft_cache tokens, then linear down to −1 at max_length.

    Lengths are tokens when TRL-style `completion_ids` are passed (fgrpo and
    TRL both pass them), else characters. soft_cache defaults to a quarter of
    max_length and is capped at max_length (so a recipe's window still works
    when max_completion_length is overridden to something small).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    cache = max_length // 4 if soft_cache is None else soft_cache
    if cache < 0:
        raise ValueError(f"soft_cache must be >= 0, got {cache}")
    cache = min(cache, max_length)
    lengths = (
        [len(ids) for ids in completion_ids]
        if completion_ids is not None
        else [len(completion_text(c)) for c in completions]
    )
    start = max_length - cache
    scores = []
    for length in lengths:
        if length <= start:
            scores.append(0.0)
        elif length >= max_length or cache == 0:
            scores.append(-1.0)
        else:
            scores.append((start - length) / cache)
    return scores
