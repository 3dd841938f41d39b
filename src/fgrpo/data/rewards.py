"""Reward functions with TRL's signature, their validation, weighting and scaling.

A reward function is `fn(prompts, completions, **kwargs) -> list[float | None]`
exactly as in TRL's GRPOTrainer: kwargs carry the dataset columns (`answer`,
`family`, `reward_scale`, one entry per completion) and whatever else a
trainer passes (`completion_ids`, `trainer_state`), so a function written for
TRL runs here unchanged and the built-ins run in TRL. `None` means "not
applicable to this sample", as in TRL.

Scores flow in three stages: each function's raw values (validated), their
weighted NaN-ignoring sum (the "score", as TRL sums them), and the score mapped
onto each example's own reward scale (the "reward" GRPO and FGRPO see).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import numbers
import re
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from fgrpo.errors import ConfigError, RewardError
from fgrpo.data.answers import answer_column, completion_text, states_answer
from fgrpo.data.tasks import (
    EXAMPLE_COLUMNS,
    Example,
    answer_is_numeric,
    answer_pattern,
    extract_answer,
    is_correct,
    normalize_answer,
)

RewardFunction = Callable[..., list]


def _families(kwargs: dict, n: int) -> list:
    """The `family` column, or None for each sample when absent (loaded-data rules then apply)."""
    families = kwargs.get("family")
    return [None] * n if families is None else list(families)


def _answer_styles(kwargs: dict, n: int) -> list:
    """The `answer_style` column, or "line" for each sample when absent (answers.ANSWER_STYLES)."""
    styles = kwargs.get("answer_style")
    return ["line"] * n if styles is None else list(styles)


def exact_match_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 when the extracted answer equals the reference (normalized per family), else 0.0."""
    answers = answer_column(kwargs, "exact_match_reward")
    families = _families(kwargs, len(completions))
    styles = _answer_styles(kwargs, len(completions))
    scores = []
    for completion, answer, family, style in zip(completions, answers, families, styles):
        predicted = extract_answer(completion, family, style)
        scores.append(float(predicted is not None and predicted == normalize_answer(str(answer), answer_is_numeric(family))))
    return scores


def _position_matches(predicted: str, reference: str, from_right: bool) -> float:
    """Fraction of aligned characters that agree, over the longer length (1.0 only when equal)."""
    if from_right:  # numbers: units under units, so "45" vs "46" is half right
        predicted, reference = predicted[::-1], reference[::-1]
    matches = sum(p == r for p, r in zip(predicted, reference))
    return matches / max(len(predicted), len(reference), 1)


def partial_credit_reward(prompts, completions, **kwargs) -> list[float]:
    """Character-level credit: numbers aligned from the right, strings (sort, reverse) from the left.

    Dividing by the longer of the two lengths penalises a wrong length, so
    only an exact match scores 1.0 and a dense signal remains when no
    completion in a group is fully right.
    """
    answers = answer_column(kwargs, "partial_credit_reward")
    families = _families(kwargs, len(completions))
    styles = _answer_styles(kwargs, len(completions))
    scores = []
    for completion, answer, family, style in zip(completions, answers, families, styles):
        numeric = answer_is_numeric(family)
        predicted = extract_answer(completion, family, style)
        scores.append(
            0.0 if predicted is None else _position_matches(predicted, normalize_answer(str(answer), numeric), numeric)
        )
    return scores


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 when the completion states an answer that looks like one of its family's answers, else 0.0.

    Style "line": the first line is such an answer. Style "sentence" (chat replies): the reply says it in
    words ("The answer is 46.", or ####, \\boxed, <answer>); a number merely written last does not count.
    """
    families = _families(kwargs, len(completions))
    styles = _answer_styles(kwargs, len(completions))
    scores = []
    for completion, family, style in zip(completions, families, styles):
        if style == "sentence" and not states_answer(completion_text(completion)):
            scores.append(0.0)
            continue
        predicted = extract_answer(completion, family, style)
        scores.append(float(predicted is not None and re.fullmatch(answer_pattern(family), predicted) is not None))
    return scores


def _math_rewards() -> dict[str, RewardFunction]:
    from fgrpo.data.mathcheck import length_penalty_reward, math_verify_reward, think_answer_format_reward

    return {
        "math_verify": math_verify_reward,
        "think_answer_format": think_answer_format_reward,
        "length_penalty": length_penalty_reward,
    }


REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "exact_match": exact_match_reward,
    "partial_credit": partial_credit_reward,
    "format": format_reward,
    **_math_rewards(),
}


@contextlib.contextmanager
def contained(what: str, error: type[Exception]) -> Iterator[None]:
    """Run user code (a reward module's import, a reward call) so that it cannot end or silence the run.

    `sys.exit` and a KeyboardInterrupt that the code raises itself become one `error` naming `what`. A real
    Ctrl-C still stops the run: Python delivers it only to the main thread, where the SIGINTs that arrive
    meanwhile are noted (under Python's own handler; under someone else's, the interrupt is left alone).
    """
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    watching = handler is signal.default_int_handler
    interrupted: list[int] = []
    if watching:

        def on_sigint(signum, frame):
            interrupted.append(signum)
            signal.default_int_handler(signum, frame)

        signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    except SystemExit as exc:
        raise error(f"{what} called sys.exit({exc.code!r}); user code must not end the run") from None
    except KeyboardInterrupt:
        if interrupted or (callable(handler) and not watching):
            raise
        raise error(f"{what} raised KeyboardInterrupt itself; user code must not stop the run") from None
    finally:
        if watching:
            signal.signal(signal.SIGINT, handler)


def resolve_reward_function(name_or_path: str) -> RewardFunction:
    """A registered name, or an import path 'package.module:function' (attribute may be dotted)."""
    if name_or_path in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name_or_path]
    if ":" not in name_or_path:
        raise ConfigError(
            f"unknown reward function '{name_or_path}': use one of {', '.join(REWARD_FUNCTIONS)} "
            "or an import path 'package.module:function'"
        )
    module_name, _, attribute = name_or_path.partition(":")
    with contained(f"reward function '{name_or_path}': module '{module_name}', while being imported,", ConfigError):
        try:
            target = importlib.import_module(module_name)
        except Exception as exc:  # ModuleNotFoundError, or the module itself failed while importing
            raise ConfigError(
                f"reward function '{name_or_path}': cannot import module '{module_name}' ({type(exc).__name__}: {exc})",
                public=f"reward function '{name_or_path}': cannot import module '{module_name}' ({type(exc).__name__}; "
                "its message stays in the node's log)",
            ) from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"reward function '{name_or_path}': module '{module_name}' has no attribute '{attribute}'")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(
            f"reward function '{name_or_path}' is a {type(target).__name__}, not a callable "
            "fn(prompts, completions, **kwargs)"
        )
    return target


def check_reward_options(fn: RewardFunction, options: dict) -> None:
    """Each option bound to `fn` (a reward's `kwargs`) must be one of its named parameters.

    Every reward function takes `**kwargs` (the dataset columns arrive there, as in TRL), so a misspelt option
    such as `max_lenght` would be swallowed and the default silently used. An option a function of your own
    reads must therefore be a named parameter: `def score(prompts, completions, strict=False, **kwargs)`.
    """
    import inspect

    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a callable with no Python signature: nothing to check against
        return
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = sorted(p.name for p in parameters if p.kind in kinds and p.name not in ("prompts", "completions"))
    unknown = sorted(set(options) - set(named))
    if unknown:
        raise ConfigError(
            f"{', '.join(unknown)}: not an option of {function_name(fn)} (its options: {', '.join(named) or 'none'}); "
            "an option of your own function must be a named parameter, e.g. def score(prompts, completions, "
            "strict=False, **kwargs)"
        )


def function_name(fn) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def call_reward_function(fn: RewardFunction, prompts: list, completions: list, columns: dict[str, list]) -> np.ndarray:
    """Call `fn` as TRL does and validate its output: (N,) floats, NaN where it returned None.

    Anything else (an exception, the wrong length, a non-number, NaN, ±Inf)
    is a RewardError naming the function, since a silently bad reward
    corrupts every advantage in its group.
    """
    name = function_name(fn)
    n = len(completions)
    with contained(f"reward function {name}", RewardError):
        try:
            output = fn(prompts=prompts, completions=completions, **columns)
        except Exception as exc:
            raise RewardError(  # its text may quote a completion or an answer: only the type leaves the node
                f"reward function {name} raised {type(exc).__name__}: {exc}",
                public=f"reward function {name} raised {type(exc).__name__} (its message stays in the node's log)",
            ) from exc
    if not isinstance(output, (list, tuple)) and hasattr(output, "tolist"):
        output = output.tolist()  # a 1-D numpy array or tensor is fine too
    if not isinstance(output, (list, tuple)):
        raise RewardError(f"reward function {name} must return a list of {n} floats, got {type(output).__name__}")
    if len(output) != n:
        raise RewardError(f"reward function {name} returned {len(output)} values, expected {n} (one per completion)")
    values = np.empty(n, dtype=np.float64)  # (N,)
    for i, value in enumerate(output):
        if value is None:
            values[i] = np.nan
            continue
        if not isinstance(value, numbers.Real):
            raise RewardError(
                f"reward function {name} returned a non-numeric value at index {i}: {value!r} "
                f"({type(value).__name__}); expected a float or None",
                public=f"reward function {name} returned a non-numeric value at index {i} ({type(value).__name__}); "
                "expected a float or None",
            )
        value = float(value)
        if not math.isfinite(value):
            raise RewardError(
                f"reward function {name} returned {value} at index {i}: rewards must be finite "
                "(return None for 'not applicable')"
            )
        values[i] = value
    return values


@dataclass(frozen=True)
class RewardTerm:
    name: str
    fn: RewardFunction
    weight: float


def _term_name(fn_or_name, fn: RewardFunction) -> str:
    if isinstance(fn_or_name, str):
        return fn_or_name
    registered = [name for name, builtin in REWARD_FUNCTIONS.items() if builtin is fn]
    return registered[0] if registered else getattr(fn, "__name__", None) or function_name(fn)


@dataclass
class TermScores:
    """Rewards of a batch term by term: scores = Σ_k weights[k]·values[:, k] over the non-NaN values."""

    scores: np.ndarray  # (N,)
    per_function: dict[str, np.ndarray]  # name -> (N,) raw values (NaN = not applicable)
    values: np.ndarray  # (N, K)
    weights: np.ndarray  # (K,)


class WeightedReward:
    """Weighted sum of reward functions, NaN ("not applicable") entries ignored, as TRL sums them.

    Terms are (function or name/import path, weight); `per_function` is keyed
    by the registered name, the given string, or the function's __name__
    (suffixed "#2", "#3" when repeated).
    """

    def __init__(self, terms: Sequence[tuple[RewardFunction | str, float]]):
        if not terms:
            raise ConfigError("a reward needs at least one (function, weight) pair")
        self.terms: list[RewardTerm] = []
        for fn_or_name, weight in terms:
            fn = resolve_reward_function(fn_or_name) if isinstance(fn_or_name, str) else fn_or_name
            if not callable(fn):
                raise ConfigError(f"reward function {fn!r} is not callable")
            if not math.isfinite(weight):
                raise ConfigError(f"weight of reward function {function_name(fn)} must be finite, got {weight}")
            name = base = _term_name(fn_or_name, fn)
            taken = {term.name for term in self.terms}
            copy = 1
            while name in taken:
                copy += 1
                name = f"{base}#{copy}"
            self.terms.append(RewardTerm(name, fn, float(weight)))

    def score(self, prompts: list, completions: list, columns: dict[str, list]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(scores (N,), {name: raw values (N,)}); scores = Σ_k w_k r_k over the non-NaN r_k."""
        scored = self.score_terms(prompts, completions, columns)
        return scored.scores, scored.per_function

    def score_terms(self, prompts: list, completions: list, columns: dict[str, list]) -> TermScores:
        """`score`'s result with each term's values (N, K) and weights (K,) kept apart, as TRL's rewards_per_func."""
        per_function = {
            term.name: call_reward_function(term.fn, prompts, completions, columns) for term in self.terms
        }
        values = np.stack([per_function[term.name] for term in self.terms]).reshape(len(self.terms), len(completions))
        weights = np.array([term.weight for term in self.terms], dtype=np.float64)  # (K,)
        weighted = weights[:, None] * values  # (K, N)
        unscored = np.isnan(weighted).all(axis=0)  # (N,)
        if unscored.any():
            where = np.flatnonzero(unscored)
            raise RewardError(
                f"every reward function ({', '.join(per_function)}) returned None for completion(s) "
                f"{where[:10].tolist()}{' ...' if where.size > 10 else ''}: at least one must score each completion"
            )
        return TermScores(np.nansum(weighted, axis=0), per_function, values.T, weights)


OWNER_COLUMN = "owner"  # the column naming each example's data owner (`federation.clients`)


class OwnerRewards:
    """Each example scored by its owner's reward functions (the `owner` column), for a run that pools owners.

    A centralized run trains on every owner's examples at once; each must keep
    the reward its owner defined, as in the federated run it is compared with.
    `per_function` holds each function's values where it applied, NaN elsewhere.
    """

    def __init__(self, by_owner: dict[str, WeightedReward]):
        if not by_owner:
            raise ConfigError("OwnerRewards needs at least one owner")
        self.by_owner = dict(by_owner)

    def score(self, prompts: list, completions: list, columns: dict[str, list]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        scored = self.score_terms(prompts, completions, columns)
        return scored.scores, scored.per_function

    def score_terms(self, prompts: list, completions: list, columns: dict[str, list]) -> TermScores:
        """One term per (owner, function), NaN on the other owners' rows: each owner's weights stay its own."""
        owners = columns.get(OWNER_COLUMN)
        if owners is None:
            raise RewardError(f"examples carry no '{OWNER_COLUMN}' column: cannot tell whose reward functions apply")
        n = len(completions)
        scores = np.full(n, np.nan)  # (N,)
        per_function: dict[str, np.ndarray] = {}
        term_values: list[np.ndarray] = []
        term_weights: list[np.ndarray] = []
        for owner in dict.fromkeys(owners):
            if owner not in self.by_owner:
                raise RewardError(f"no reward functions for owner '{owner}' (known: {', '.join(self.by_owner)})")
            rows = [i for i, name in enumerate(owners) if name == owner]
            subset = {key: [values[i] for i in rows] for key, values in columns.items()}
            part = self.by_owner[owner].score_terms([prompts[i] for i in rows], [completions[i] for i in rows], subset)
            scores[rows] = part.scores
            for name, values in part.per_function.items():
                per_function.setdefault(name, np.full(n, np.nan))[rows] = values
            block = np.full((n, part.values.shape[1]), np.nan)  # (N, K_owner)
            block[rows] = part.values
            term_values.append(block)
            term_weights.append(part.weights)
        return TermScores(scores, per_function, np.concatenate(term_values, axis=1), np.concatenate(term_weights))


def apply_reward_scale(scores: np.ndarray, scales: Sequence[tuple[float, float]]) -> np.ndarray:
    """low + (high − low) · score per sample (N,); linear, so scores outside [0, 1] extrapolate."""
    scores = np.asarray(scores, dtype=np.float64)  # (N,)
    bounds = np.asarray(scales, dtype=np.float64).reshape(-1, 2)  # (N, 2)
    if bounds.shape[0] != scores.shape[0]:
        raise RewardError(f"{scores.shape[0]} scores but {bounds.shape[0]} reward scales")
    return bounds[:, 0] + (bounds[:, 1] - bounds[:, 0]) * scores


@dataclass
class RewardResult:
    rewards: np.ndarray  # (N,) on each example's own reward scale
    scores: np.ndarray  # (N,) combined score before scaling
    per_function: dict[str, np.ndarray]  # name -> (N,) raw values (NaN = not applicable)
    correct: np.ndarray  # (N,) bool, exact match
    # (N, K) each term's value times its example's (high − low) reward scale, NaN where it does not apply, and the
    # terms' weights (K,): rewards = low + Σ_k w_k term_rewards[:, k]. TRL's rewards_per_func, for normalize_then_sum.
    term_rewards: np.ndarray | None = None
    term_weights: np.ndarray | None = None


def compute_rewards(
    examples: Sequence[Example],
    completions: Sequence,
    reward: WeightedReward | OwnerRewards,
    completion_ids: list | None = None,
) -> RewardResult:
    """Score completions[i] against examples[i]: the reward functions see the examples' prompts and columns.

    Columns are answer, family, reward_scale, answer_style, every extra column (`meta`) that
    all examples of the batch share (e.g. 'level', 'source'), and, as TRL
    passes them, the `completion_ids` (token ids without padding) when given.
    """
    if len(examples) != len(completions):
        raise RewardError(f"{len(completions)} completions for {len(examples)} examples; expected one per example")
    prompts = [example.prompt for example in examples]
    rows = [example.columns() for example in examples]
    columns = {key: [row[key] for row in rows] for key in EXAMPLE_COLUMNS}
    shared = set.intersection(*(set(example.meta) for example in examples)) if examples else set()
    for key in sorted(shared - set(columns)):
        columns[key] = [example.meta[key] for example in examples]
    if completion_ids is not None:
        columns["completion_ids"] = list(completion_ids)
    scored = reward.score_terms(prompts, list(completions), columns)
    scales = [example.reward_scale for example in examples]
    rewards = apply_reward_scale(scored.scores, scales)
    spans = np.asarray(scales, dtype=np.float64).reshape(-1, 2) @ np.array([-1.0, 1.0])  # (N,) high − low
    correct = np.array([is_correct(ex, completion) for ex, completion in zip(examples, completions)], dtype=bool)
    return RewardResult(rewards, scored.scores, scored.per_function, correct, scored.values * spans[:, None], scored.weights)
