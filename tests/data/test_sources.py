"""Dataset sources: GSM8K / MATH / generic formats from JSONL, Parquet and CSV, and partitions by a column."""

import json
from collections import Counter

import pytest

from fgrpo.federation.client import client_data, partition_labels
from fgrpo.config import SourceConfig, config_from_dict
from fgrpo.errors import ConfigError, DataError
from fgrpo.core.pipeline import build_task_pool
from fgrpo.data.sources import SAMPLE_MATH, detect_format, load_source
from fgrpo.data.tasks import SAMPLE_GSM8K, is_correct

SUBJECTS = {"Algebra", "Number Theory", "Geometry", "Counting & Probability"}


def test_gsm8k_sample_loads_numeric_answers_and_keeps_exact_checker():
    examples = load_source(SourceConfig(name="gsm8k", path=str(SAMPLE_GSM8K)))
    assert len(examples) == 12
    first = examples[0]
    assert first.prompt.startswith("Mara has 3 boxes") and first.answer == "39"
    assert first.family == "gsm8k" and first.checker == "exact" and first.meta == {"source": "gsm8k"}
    assert is_correct(first, "<think>48 - 9</think><answer>39</answer>")


def test_math_sample_boxed_answers_subjects_and_math_checker():
    examples = load_source(SourceConfig(name="math", path=str(SAMPLE_MATH), family_column="subject"))
    assert len(examples) == 20
    assert {ex.family for ex in examples} == SUBJECTS
    fraction = next(ex for ex in examples if "two heads" in ex.prompt)
    assert fraction.answer == "\\frac{1}{4}" and fraction.checker == "math"
    assert fraction.meta["level"] == "Level 3" and fraction.meta["source"] == "math"
    assert is_correct(fraction, "The probability is \\boxed{0.25}.")


def test_generic_csv_and_parquet_through_datasets_with_column_mapping(tmp_path):
    import pandas as pd

    frame = pd.DataFrame(
        {"q": ["What is 2+2?", "Half of 1?", "What is 10/4?"], "final": ["4", "\\frac{1}{2}", "2.5"], "domain": ["a", "b", "a"]}
    )
    frame.to_csv(tmp_path / "data.csv", index=False)
    frame.to_parquet(tmp_path / "data.parquet")
    for name in ("data.csv", "data.parquet"):
        source = SourceConfig(name="mine", path=str(tmp_path / name), prompt_column="q", answer_column="final", verifier="math")
        examples = load_source(source)
        assert [ex.answer for ex in examples] == ["4", "\\frac{1}{2}", "2.5"]
        assert [ex.meta["domain"] for ex in examples] == ["a", "b", "a"]
        assert is_correct(examples[1], "<answer>0.5</answer>")


def test_json_array_file_and_limit(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"prompt": f"{i}+1=", "answer": i + 1} for i in range(5)]))
    examples = load_source(SourceConfig(name="j", path=str(path), limit=3))
    assert [ex.answer for ex in examples] == ["1", "2", "3"]


def test_format_detection():
    assert detect_format({"question", "answer"}) == "gsm8k"
    assert detect_format({"problem", "solution", "level"}) == "math"
    assert detect_format({"prompt", "answer"}) == "generic"


@pytest.mark.parametrize(
    "lines, config, message",
    [
        (['{"prompt": "a", "answer": "1"}', "{oops"], {}, r"data\.jsonl line 2: invalid JSON"),
        (['{"text": "a", "label": "1"}'], {}, r"line 1: source 'bad' \(generic format\) needs column 'prompt'; columns present: text, label"),
        (['{"problem": "p", "solution": "no box here, sorry.\\nreally"}'], {}, r"line 1: 'solution' has no final answer \(expected a \\boxed"),
        (['{"question": "q", "answer": "1"}'], {"family_column": "subject"}, r"needs column 'subject'"),
        ([], {}, r"source 'bad' has no examples"),
    ],
)
def test_bad_rows_name_the_file_line_and_column(tmp_path, lines, config, message):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=message):
        load_source(SourceConfig(name="bad", path=str(path), **config))


def test_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match=r"data\.txt: cannot tell the file type.*set file_type"):
        load_source(SourceConfig(name="x", path=str(tmp_path / "data.txt")))
    with pytest.raises(DataError, match="file not found"):
        load_source(SourceConfig(name="x", path=str(tmp_path / "nope.jsonl")))


def math_config(tmp_path, **federation):
    return config_from_dict(
        {
            "tasks": {
                "families": [],
                "sources": [
                    {"name": "math", "path": str(SAMPLE_MATH), "test_fraction": 0.2},
                    {"name": "gsm8k", "path": str(SAMPLE_GSM8K), "test_fraction": 0.25},
                ],
                **federation.pop("tasks", {}),
            },
            "federation": {"num_clients": 4, **federation},
            "output": {"dir": str(tmp_path)},
        }
    )


def test_pool_holds_several_sources_with_held_out_splits(tmp_path):
    train, test = build_task_pool(math_config(tmp_path).tasks)
    assert Counter(ex.meta["source"] for ex in train) == {"math": 16, "gsm8k": 9}
    assert Counter(ex.meta["source"] for ex in test) == {"math": 4, "gsm8k": 3}


def test_partition_by_subject_gives_each_owner_its_own_domain(tmp_path):
    config = math_config(
        tmp_path,
        tasks={"sources": [{"name": "math", "path": str(SAMPLE_MATH)}], "partition_by": "subject"},
        partition={"scheme": "by_family"},
    )
    subjects = [{ex.meta["subject"] for ex in client_data(config, k, 4).train} for k in range(4)]
    assert all(len(s) == 1 for s in subjects) and set().union(*subjects) == SUBJECTS


def test_dirichlet_over_level_and_partition_by_source(tmp_path):
    config = math_config(
        tmp_path, tasks={"partition_by": "level"}, partition={"scheme": "dirichlet", "alpha": 0.3}, num_clients=2
    )
    # gsm8k rows have no 'level' column: the error says which source and what it has
    with pytest.raises(ConfigError, match=r"partition_by = 'level'.*'gsm8k' has no column 'level'.*source"):
        client_data(config, 0, 2)
    config = math_config(
        tmp_path,
        tasks={"sources": [{"name": "math", "path": str(SAMPLE_MATH), "test_fraction": 0.2}], "partition_by": "level"},
        partition={"scheme": "dirichlet", "alpha": 0.3},
        num_clients=2,
    )
    parts = [client_data(config, k, 2).train for k in range(2)]
    assert sum(len(p) for p in parts) == 16 and all(parts)
    config = math_config(tmp_path, tasks={"partition_by": "source"}, partition={"scheme": "by_family"}, num_clients=2)
    sources = [{ex.meta["source"] for ex in client_data(config, k, 2).train} for k in range(2)]
    assert sorted(map(sorted, sources)) == [["gsm8k"], ["math"]]


def test_partition_labels_of_builtin_families():
    from fgrpo.data.tasks import generate_examples

    examples = generate_examples("add", 3, seed=0)
    assert partition_labels(examples, "family") == partition_labels(examples, "source") == ["add"] * 3


def test_a_gsm8k_solution_without_its_final_answer_is_refused_with_its_line(tmp_path):
    rows = [{"question": "2+2?", "answer": "Two and two. #### 4"}, {"question": "3+3?", "answer": "Three and three make six."}]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"gsm8k.jsonl line 2: 'answer' has no final answer \(expected a worked solution ending '#### n'"):
        load_source(SourceConfig(name="gsm8k", path=str(path)))
    from fgrpo.data.tasks import load_jsonl

    with pytest.raises(DataError, match=r"gsm8k.jsonl line 2: 'answer' has no final answer '#### n', but other lines"):
        load_jsonl(path, prompt_key="question")


@pytest.mark.parametrize("answer, fmt", [("NaN", "generic"), ("1e999", "generic"), ("NaN", "math"), ("-Infinity", "math")])
def test_a_non_finite_answer_is_no_answer(tmp_path, answer, fmt):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "2+2?", "answer": 4}\n{"prompt": "3+3?", "answer": %s}\n' % answer)
    with pytest.raises(DataError, match=r"d.jsonl line 2: 'answer' has no final answer"):
        load_source(SourceConfig(name="d", path=str(path), format=fmt, prompt_column="prompt", answer_column="answer"))
