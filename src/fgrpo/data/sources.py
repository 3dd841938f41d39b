"""Real reasoning data from local files: GSM8K-, MATH- and generic-format sources.

A source is one file (JSONL, JSON, Parquet or CSV) and a column mapping:

- gsm8k: `question` / `answer`, the answer a worked solution ending "#### 42";
  the reference is the number after "####", compared as a number.
- math: `problem` / `solution`, the reference is the last \\boxed{...} of the
  solution (LaTeX), compared with math-verify.
- generic: `prompt` / `answer` (or any columns named in the config).

JSONL is read line by line here, so an error names the line and mixed-type
columns (an answer that is a number on one line and a string on the next)
are fine; JSON, Parquet and CSV go through `datasets`. Every other scalar
column of a row (subject, level, ...) is kept on the example, so the
federation can partition by it and reward functions receive it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from fgrpo.config import SourceConfig
from fgrpo.errors import DataError
from fgrpo.data.answers import answer_from_value, boxed, is_answer_scalar
from fgrpo.data.tasks import Example, answer_is_numeric, jsonl_records

FORMAT_COLUMNS: dict[str, tuple[str, str]] = {
    "gsm8k": ("question", "answer"),
    "math": ("problem", "solution"),
    "generic": ("prompt", "answer"),
}
# Shipped MATH-format sample (problem/solution/subject/level), written for fgrpo.
SAMPLE_MATH = Path(__file__).parent / "sample_math.jsonl"
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def file_type(path: Path, configured: str = "auto") -> str:
    if configured != "auto":
        return configured
    kind = _EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: cannot tell the file type from the extension '{path.suffix}'; "
            f"use one of {', '.join(_EXTENSIONS)} or set file_type"
        )
    return kind


def _dataset_rows(path: Path, kind: str) -> Iterator[tuple[str, dict]]:
    """Rows through `datasets` (kept in memory: nothing is written to the HF cache)."""
    from datasets import Dataset

    readers = {"json": Dataset.from_json, "parquet": Dataset.from_parquet, "csv": Dataset.from_csv}
    try:
        dataset = readers[kind](str(path), keep_in_memory=True)
    except Exception as exc:  # pyarrow / datasets raise many types; the user needs the file named
        raise DataError(
            f"{path}: cannot read as {kind}: {type(exc).__name__}: {exc}",
            public=f"{path}: cannot read as {kind} ({type(exc).__name__})",
        ) from None
    for number, record in enumerate(dataset, start=1):
        yield f"{path} row {number}", record


def read_rows(path: str | Path, kind: str = "auto") -> Iterator[tuple[str, dict]]:
    """(where, row) pairs of a local file; `where` names the file and line/row for error messages."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    kind = file_type(path, kind)
    return jsonl_records(path) if kind == "jsonl" else _dataset_rows(path, kind)


def detect_format(columns: set[str]) -> str:
    """'gsm8k' for question/answer, 'math' for problem/solution, else 'generic'."""
    for name in ("gsm8k", "math"):
        if set(FORMAT_COLUMNS[name]) <= columns:
            return name
    return "generic"


def reference_answer(value, fmt: str, numeric: bool) -> str | None:
    """The final answer inside a dataset's answer/solution value (None when there is none)."""
    if isinstance(value, str) and "\\boxed" in value and "####" not in value:
        content = boxed(value)
        return (content.strip() or None) if content is not None else None
    if fmt == "math":
        # A MATH solution without a box has no checkable answer; a short answer column is taken as is.
        if not is_answer_scalar(value):
            return None
        text = str(value).strip()
        return text if text and len(text) <= 64 and "\n" not in text else None
    return answer_from_value(value, numeric)


def _scalar(value) -> bool:
    return isinstance(value, (str, int, float, bool)) and value is not None


def load_source(source: SourceConfig) -> list[Example]:
    """All examples of one source, in file order (the first `limit` rows when set)."""
    rows = read_rows(source.path, source.file_type)
    examples: list[Example] = []
    fmt = source.format
    prompt_column = answer_column = ""
    for where, row in rows:
        if source.limit is not None and len(examples) >= source.limit:
            break
        if not examples:  # the first row fixes the format and columns
            if fmt == "auto":
                fmt = detect_format(set(row))
            default_prompt, default_answer = FORMAT_COLUMNS[fmt]
            prompt_column = source.prompt_column or default_prompt
            answer_column = source.answer_column or default_answer
        for column in (prompt_column, answer_column, source.family_column):
            if column is not None and column not in row:
                raise DataError(
                    f"{where}: source '{source.name}' ({fmt} format) needs column '{column}'; columns present: "
                    f"{', '.join(row) or 'none'} (set prompt_column / answer_column / family_column)"
                )
        prompt = row[prompt_column]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(
                f"{where}: '{prompt_column}' must be a non-empty string, got {prompt!r}",
                public=f"{where}: '{prompt_column}' must be a non-empty string, got {type(prompt).__name__}",
            )
        family = str(row[source.family_column]) if source.family_column else source.name
        answer = reference_answer(row[answer_column], fmt, answer_is_numeric(family))
        if fmt == "gsm8k" and isinstance(row[answer_column], str) and "####" not in row[answer_column]:
            answer = None  # a worked solution with no final answer: the whole text would become the reference
        if answer is None:
            expected = {
                "math": "a \\boxed{...} answer",
                "gsm8k": "a worked solution ending '#### n', or a number",
            }.get(fmt, "a number, a string or a solution ending '#### n'")
            raise DataError(
                f"{where}: '{answer_column}' has no final answer (expected {expected}): {row[answer_column]!r}",
                public=f"{where}: '{answer_column}' has no final answer (expected {expected})",
            )
        checker = source.verifier if source.verifier != "auto" else ("math" if fmt == "math" else "exact")
        meta = {k: v for k, v in row.items() if k not in (prompt_column, answer_column) and _scalar(v)}
        meta["source"] = source.name
        examples.append(Example(prompt, answer, family, tuple(source.reward_scale), checker, meta=meta))
    if not examples:
        raise DataError(f"{source.path}: source '{source.name}' has no examples (empty file?)")
    return examples
