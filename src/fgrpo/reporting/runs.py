"""Read results directories (docs/results-format.md) and summarize them: pure functions over the parsed records.

Reading is strict (a bad line is a `DataError` naming file and line). The
plots are in `fgrpo.reporting.plots`, the document in `fgrpo.reporting.report`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fgrpo.errors import ConfigError, DataError
from fgrpo.registry import ACC_HELDOUT, METHODS

# Table and legend order (the registry's); methods not listed there follow alphabetically.
METHOD_ORDER = METHODS
DEFAULT_TARGET_FRACTION = 0.9
INT_KEYS = ("round", "step", "client", "seed")


@dataclass
class RunMetrics:
    """One RUN_DIR: its records grouped by kind, in file order, and summary.json if present."""

    method: str
    seed: int
    dir: Path
    records: dict[str, list[dict]] = field(default_factory=dict)
    summary: dict | None = None

    @property
    def is_train(self) -> bool:
        """An `fgrpo train` run: step/eval records and no federated rounds."""
        return not self.records.get("round") and bool(self.records.get("eval") or self.records.get("step"))


# ---------------------------------------------------------------------------------------- loading


def load_runs(path: Path) -> list[RunMetrics]:
    """Read one RUN_DIR (has metrics.jsonl), a COMPARE_DIR (<method>/seed<k>/ RUN_DIRs), or one method's seed<k>/."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such results directory (expected a RUN_DIR or a COMPARE_DIR)")
    if (path / "metrics.jsonl").is_file():
        return [_load_run(path)]
    seed_dirs = sorted(d for d in path.glob("seed*") if d.is_dir()) or sorted(
        d for d in path.glob("*/seed*") if d.is_dir()
    )
    if not seed_dirs:
        raise DataError(
            f"{path}: no runs found; expected metrics.jsonl (a RUN_DIR) or <method>/seed<k>/metrics.jsonl "
            "(a COMPARE_DIR)"
        )
    runs = [_load_run(d) for d in seed_dirs]
    return sorted(runs, key=lambda r: (_method_rank(r.method), r.method, r.seed))


def _load_run(run_dir: Path) -> RunMetrics:
    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise DataError(f"{run_dir}: expected a metrics.jsonl file in this run directory")
    records: dict[str, list[dict]] = {}
    for record in _read_jsonl(metrics_file):
        records.setdefault(record["kind"], []).append(record)
    if not records:
        raise DataError(f"{metrics_file}: empty; expected one JSON record per line")
    summary = None
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{summary_file}:{e.lineno}: not valid JSON ({e.msg})") from None
        except UnicodeDecodeError:
            raise DataError(f"{summary_file}: not UTF-8 text; expected the JSON object fgrpo writes") from None
        if not isinstance(summary, dict):
            raise DataError(f"{summary_file}: expected a JSON object")
    first = next(iter(records.values()))[0]
    method = first.get("method") or (summary or {}).get("method") or _method_from_dir(run_dir)
    seed = first.get("seed", (summary or {}).get("seed"))
    if not _is_int(seed):
        seed = _seed_from_dir(run_dir)
    return RunMetrics(method=str(method), seed=seed, dir=run_dir, records=records, summary=summary)


def _read_jsonl(metrics_file: Path) -> list[dict]:
    records = []
    try:
        raw = metrics_file.read_bytes()
    except OSError as exc:
        raise DataError(f"{metrics_file}: cannot be read ({exc.strerror or exc})") from None
    for lineno, line_bytes in enumerate(raw.splitlines(), start=1):
        where = f"{metrics_file}:{lineno}"
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{where}: not UTF-8 text; expected one JSON object per line (is this a metrics.jsonl?)") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}); expected one JSON object per line") from None
        except RecursionError:
            raise DataError(f"{where}: nested too deeply; expected one flat JSON object per line") from None
        records.append(_check_record(record, where))
    return records


def _check_record(record: object, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if not isinstance(record.get("kind"), str):
        raise DataError(f"{where}: missing \"kind\" (expected one of round, client, step, eval)")
    for key in INT_KEYS:
        if key in record and not _is_int(record[key]):
            raise DataError(f"{where}: \"{key}\" must be an integer, got {record[key]!r}")
    for key, value in list(record.items()):
        if "/" not in key:
            continue
        if value is None:  # treated as "not measured"
            del record[key]
        elif not _is_number(value):
            raise DataError(f"{where}: \"{key}\" must be a number, got {value!r}")
    return record


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _method_from_dir(run_dir: Path) -> str:
    return run_dir.parent.name if re.fullmatch(r"seed\d+", run_dir.name) else run_dir.name


def _seed_from_dir(run_dir: Path) -> int:
    match = re.fullmatch(r"seed(\d+)", run_dir.name)
    return int(match.group(1)) if match else 0


def _method_rank(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def group_by_method(runs: list[RunMetrics]) -> dict[str, list[RunMetrics]]:
    """Runs per method, methods in METHOD_ORDER (unknown ones after, alphabetically)."""
    groups: dict[str, list[RunMetrics]] = {}
    for run in sorted(runs, key=lambda r: (_method_rank(r.method), r.method, r.seed)):
        groups.setdefault(run.method, []).append(run)
    return groups


# ------------------------------------------------------------------------------------- summaries


@dataclass
class Curve:
    """A quantity vs round (or step): mean and sample std over seeds, n = seeds seen at each x."""

    x: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    n: np.ndarray


def curve_from_series(series: list[dict[int, float]]) -> Curve:
    """Combine per-seed {x: value} series; at each x, average the seeds that logged it."""
    xs = sorted(set().union(*series)) if series else []
    mean, std, n = [], [], []
    for x in xs:
        values = np.array([s[x] for s in series if x in s], dtype=float)
        mean.append(values.mean())
        # Sample std (ddof=1): with 2-5 seeds the population std understates the spread.
        std.append(values.std(ddof=1) if len(values) > 1 else 0.0)
        n.append(len(values))
    return Curve(np.array(xs), np.array(mean), np.array(std), np.array(n, dtype=int))


def series(records: list[dict], x_key: str, y_key: str) -> dict[int, float]:
    """{x: y} over the records that carry y_key (a later record for the same x wins)."""
    return {r[x_key]: float(r[y_key]) for r in records if y_key in r and x_key in r}


def accuracy_series(run: RunMetrics) -> dict[int, float]:
    """Global held-out accuracy by round; by step (from `eval` records) for a train run."""
    if run.is_train:
        return series(run.records.get("eval", []), "step", f"eval/{ACC_HELDOUT}")
    return series(run.records.get("round", []), "round", f"global/{ACC_HELDOUT}")


def accuracy_curve(runs: list[RunMetrics]) -> Curve:
    """Mean ± std over seeds of the held-out accuracy, for the runs of one method."""
    return curve_from_series([accuracy_series(r) for r in runs])


def _mean_std(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    array = np.array(values, dtype=float)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return float(array.mean()), std


def final_accuracy(runs: list[RunMetrics]) -> tuple[float, float] | None:
    """(mean, sample std) over seeds of each run's last held-out accuracy; None without data."""
    finals = [s[max(s)] for s in map(accuracy_series, runs) if s]
    return _mean_std(finals)


def start_accuracy(runs: list[RunMetrics]) -> tuple[float, float] | None:
    """(mean, sample std) over seeds of each run's first held-out accuracy (round/step 0)."""
    starts = [s[min(s)] for s in map(accuracy_series, runs) if s]
    return _mean_std(starts)


def final_global_set_accuracy(runs: list[RunMetrics]) -> tuple[float, float] | None:
    """Local-only: (mean, std) over seeds of the owners' own models on the global held-out set, last round."""
    finals = [s[max(s)] for s in (series(r.records.get("round", []), "round", "global/acc_global_set") for r in runs) if s]
    return _mean_std(finals)


def final_by_seed(runs: list[RunMetrics]) -> dict[int, float]:
    """{seed: final held-out accuracy} of one method's runs (the values paired across methods)."""
    return {r.seed: s[max(s)] for r, s in ((r, accuracy_series(r)) for r in runs) if s}


def tuning_budget(runs: list[RunMetrics]) -> str:
    """How a method's hyperparameters were chosen, read from its runs' config.toml ([tuned.<method>])."""
    from fgrpo.config import TunedMethod, tomllib

    texts = set()
    for run in runs:
        path = run.dir / "config.toml"
        try:
            tuned = tomllib.loads(path.read_text(encoding="utf-8")).get("tuned", {}).get(run.method)
            texts.add(TunedMethod.model_validate(tuned).budget_text() if tuned else TunedMethod().budget_text())
        except (OSError, ValueError):
            texts.add("unknown (no readable config.toml)")
    return "; ".join(sorted(texts)) if texts else DASH


def rounds_to_target(curve: Curve, target: float) -> int | None:
    """First round (or step) whose mean accuracy is ≥ target; None if it never gets there."""
    reached = np.nonzero(curve.mean >= target)[0]
    return int(curve.x[reached[0]]) if len(reached) else None


def bytes_communicated(run: RunMetrics) -> int | None:
    """Sum of comm/bytes_up + comm/bytes_down over all rounds; None if the run logged neither."""
    rounds = [r for r in run.records.get("round", []) if "comm/bytes_up" in r or "comm/bytes_down" in r]
    if not rounds:
        return None
    return int(sum(r.get("comm/bytes_up", 0) + r.get("comm/bytes_down", 0) for r in rounds))


def accuracy_drop(acc_by_x: dict[int, float]) -> float:
    """Stability: total accuracy lost between consecutive rounds, Σ max(0, acc[t-1] - acc[t]).

    0 for a curve that never gets worse; unlike the std of the changes it does not punish a
    method for learning fast early and slowly later.
    """
    values = [acc_by_x[x] for x in sorted(acc_by_x)]
    return float(sum(max(0.0, before - after) for before, after in zip(values, values[1:])))


def stability(runs: list[RunMetrics]) -> float | None:
    """Mean over seeds of `accuracy_drop` (a fraction; the report shows percentage points)."""
    drops = [accuracy_drop(s) for s in map(accuracy_series, runs) if s]
    return float(np.mean(drops)) if drops else None


def client_curves(runs: list[RunMetrics], key: str) -> dict[int, Curve]:
    """Per client id, the mean ± std over seeds of `key` from `client` records, by round."""
    clients = sorted({r["client"] for run in runs for r in run.records.get("client", []) if key in r})
    return {
        c: curve_from_series(
            [series([r for r in run.records.get("client", []) if r.get("client") == c], "round", key) for run in runs]
        )
        for c in clients
    }


def final_client_accuracy(runs: list[RunMetrics]) -> dict[int, tuple[float, float]]:
    """Per client id, mean ± std over seeds of its last `client/acc_heldout` (its model on its own held-out split)."""
    key = f"client/{ACC_HELDOUT}"
    last: dict[int, list[float]] = {}
    for run in runs:
        by_client: dict[int, tuple[int, float]] = {}
        for r in run.records.get("client", []):
            if key in r and r["round"] >= by_client.get(r["client"], (-1, 0.0))[0]:
                by_client[r["client"]] = (r["round"], float(r[key]))
        for client, (_, acc) in by_client.items():
            last.setdefault(client, []).append(acc)
    return {c: stat for c, values in sorted(last.items()) if (stat := _mean_std(values)) is not None}


def aggregation_weight_curves(runs: list[RunMetrics]) -> dict[int, Curve]:
    """Per client, `agg/weight` by round, mean over seeds; a client not sampled in a round counts as 0."""
    per_run = []
    for run in runs:
        weighted = [r for r in run.records.get("client", []) if "agg/weight" in r]
        rounds = {r["round"] for r in weighted}
        per_client: dict[int, dict[int, float]] = {}
        for r in weighted:
            per_client.setdefault(r["client"], dict.fromkeys(rounds, 0.0))[r["round"]] = float(r["agg/weight"])
        per_run.append(per_client)
    clients = sorted({c for p in per_run for c in p})
    return {c: curve_from_series([p[c] for p in per_run if c in p]) for c in clients}


def wall_time(runs: list[RunMetrics]) -> float | None:
    """Mean over seeds of summary.json's wall_s; None if no run has it."""
    walls = [float(r.summary["wall_s"]) for r in runs if r.summary and _is_number(r.summary.get("wall_s"))]
    return float(np.mean(walls)) if walls else None


@dataclass
class MethodSummary:
    """One table row."""

    method: str
    seeds: list[int]
    is_train: bool
    curve: Curve
    start: tuple[float, float] | None
    final: tuple[float, float] | None
    to_target: int | None
    bytes_total: float | None
    drop: float | None
    wall_s: float | None
    final_global_set: tuple[float, float] | None = None
    tuning: str = ""


def default_target(summaries: list[MethodSummary]) -> float | None:
    """90% of the way from the start to the best method's final mean accuracy.

    Measured from the start (not from 0), so a target is never met before
    training; None when no method ended above where it started.
    """
    rows = [s for s in summaries if s.final and s.start and not math.isnan(s.final[0]) and not math.isnan(s.start[0])]
    if not rows:
        return None
    best = max(rows, key=lambda s: s.final[0])
    start, final = best.start[0], best.final[0]
    return start + DEFAULT_TARGET_FRACTION * (final - start) if final > start else None


def summarize(runs: list[RunMetrics], target: float | None = None) -> tuple[list[MethodSummary], float | None]:
    """One MethodSummary per method, and the target used (the default one when target is None)."""
    if target is not None and not 0.0 <= target <= 1.0:
        raise ConfigError(f"target={target}: expected an accuracy fraction in [0, 1] (e.g. 0.6 for 60%)")
    summaries = []
    for method, method_runs in group_by_method(runs).items():
        byte_totals = [b for b in map(bytes_communicated, method_runs) if b is not None]
        summaries.append(
            MethodSummary(
                method=method,
                seeds=[r.seed for r in method_runs],
                is_train=all(r.is_train for r in method_runs),
                curve=accuracy_curve(method_runs),
                start=start_accuracy(method_runs),
                final=final_accuracy(method_runs),
                to_target=None,
                bytes_total=float(np.mean(byte_totals)) if byte_totals else None,
                drop=stability(method_runs),
                wall_s=wall_time(method_runs),
                final_global_set=final_global_set_accuracy(method_runs),
                tuning=tuning_budget(method_runs),
            )
        )
    if target is None:
        target = default_target(summaries)
    if target is not None:
        for s in summaries:
            s.to_target = rounds_to_target(s.curve, target)
    return summaries, target


# ------------------------------------------------------------------------------------ formatting

DASH = "–"


def format_percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def format_mean_std(stat: tuple[float, float] | None, n_seeds: int) -> str:
    """'61.2% ± 3.5 pp' (std in percentage points); just the mean for a single seed."""
    if stat is None:
        return DASH
    mean, std = stat
    return format_percent(mean) if n_seeds < 2 else f"{format_percent(mean)} ± {100 * std:.1f} pp"


def format_bytes(n: float | None) -> str:
    if n is None:
        return DASH
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"
