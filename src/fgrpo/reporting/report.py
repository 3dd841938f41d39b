"""Turn results directories (docs/results-format.md) into a Markdown/HTML report with plots.

Reading is strict (a bad line is a `DataError` naming file and line), summaries are pure
functions over the parsed records, and plotting/writing sit at the end of the file.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fgrpo.errors import ConfigError, DataError

# Table and legend order; methods not listed here follow alphabetically.
METHOD_ORDER = ("fgrpo", "fedavg", "fedprox", "fedadam", "reward_weighted", "centralized", "local")
# Methods whose aggregation weights are worth a plot (the others are fixed by example counts).
WEIGHTED_METHODS = ("fgrpo", "reward_weighted")
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
            summary = json.loads(summary_file.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{summary_file}:{e.lineno}: not valid JSON ({e.msg})") from None
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
    with metrics_file.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{metrics_file}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}); expected one JSON object per line") from None
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
        return series(run.records.get("eval", []), "step", "eval/acc_heldout")
    return series(run.records.get("round", []), "round", "global/acc_heldout")


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


# ---------------------------------------------------------------------------------------- plots


def _figure(n_panels: int, panel_size: tuple[float, float] = (5.0, 3.6), sharey: bool = False):
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    from matplotlib.ticker import MaxNLocator

    cols = min(n_panels, 3)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(panel_size[0] * cols, panel_size[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=sharey).ravel()
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds and steps are whole numbers
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _method_colors(methods: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def _plot_band(ax, curve: Curve, label: str, color, scale: float = 1.0) -> None:
    ax.plot(curve.x, scale * curve.mean, marker="o", markersize=3, color=color, label=label)
    if np.any(curve.n > 1):
        low, high = scale * (curve.mean - curve.std), scale * (curve.mean + curve.std)
        ax.fill_between(curve.x, low, high, color=color, alpha=0.2)


def plot_accuracy(summaries: list[MethodSummary], target: float | None, out: Path) -> Path | None:
    """Plot 1: held-out accuracy vs round (step for train runs), mean line and ±std band per method."""
    summaries = [s for s in summaries if len(s.curve.x)]
    if not summaries:
        return None
    colors = _method_colors([s.method for s in summaries])
    fig, (ax,) = _figure(1, (7.0, 4.5))
    for s in summaries:
        _plot_band(ax, s.curve, f"{s.method} (n={len(s.seeds)})", colors[s.method], scale=100)
    if target is not None:
        ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label=f"target {format_percent(target)}")
    what = "Held-out" if all(s.is_train for s in summaries) else "Global held-out"
    ax.set(title=f"{what} accuracy (mean ± std over seeds)", xlabel=_x_label(summaries), ylabel="accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(out, dpi=100)
    return out


def _x_label(summaries: list[MethodSummary]) -> str:
    kinds = {s.is_train for s in summaries}
    return "round / step" if len(kinds) > 1 else ("training step" if kinds == {True} else "federated round")


def plot_client_accuracy(groups: dict[str, list[RunMetrics]], out: Path) -> Path | None:
    """Plot 2: each client's held-out accuracy vs round, one panel per method, mean over seeds."""
    curves = {m: client_curves(runs, "client/acc_heldout") for m, runs in groups.items()}
    curves = {m: c for m, c in curves.items() if c}
    if not curves:
        return None
    fig, axes = _figure(len(curves), sharey=True)  # same accuracy axis: methods compare across panels
    for ax, (method, per_client) in zip(axes, curves.items()):
        for client, curve in per_client.items():
            ax.plot(curve.x, 100 * curve.mean, marker="o", markersize=3, label=f"client {client}")
        ax.set(title=f"{method}: per-client held-out accuracy", xlabel="federated round", ylabel="accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(out, dpi=100)
    return out


def plot_aggregation_weights(groups: dict[str, list[RunMetrics]], out: Path) -> Path | None:
    """Plot 3: aggregation weight per client over rounds (stacked), for FGRPO and reward_weighted."""
    curves = {m: aggregation_weight_curves(groups[m]) for m in WEIGHTED_METHODS if m in groups}
    curves = {m: c for m, c in curves.items() if c}
    if not curves:
        return None
    fig, axes = _figure(len(curves))
    for ax, (method, per_client) in zip(axes, curves.items()):
        rounds = sorted(set().union(*(c.x.tolist() for c in per_client.values())))
        stacked = [[dict(zip(c.x.tolist(), c.mean)).get(r, 0.0) for r in rounds] for c in per_client.values()]
        ax.stackplot(rounds, stacked, labels=[f"client {c}" for c in per_client], alpha=0.8)
        ax.set(title=f"{method}: aggregation weights (mean over seeds)", xlabel="federated round", ylabel="weight")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left")
    fig.savefig(out, dpi=100)
    return out


def plot_client_rewards(groups: dict[str, list[RunMetrics]], out: Path) -> Path | None:
    """Plot 4: each client's mean reward vs round on its own scale, one panel per client, a line per method."""
    curves = {m: client_curves(runs, "client/reward_mean") for m, runs in groups.items()}
    clients = sorted({c for per_client in curves.values() for c in per_client})
    if not clients:
        return None
    colors = _method_colors(list(groups))
    fig, axes = _figure(len(clients))
    for ax, client in zip(axes, clients):
        for method, per_client in curves.items():
            if client in per_client:
                _plot_band(ax, per_client[client], method, colors[method])
        ax.set(title=f"client {client}: reward (own scale)", xlabel="federated round", ylabel="client/reward_mean")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(out, dpi=100)
    return out


def plot_train_reward(groups: dict[str, list[RunMetrics]], out: Path) -> Path | None:
    """Train runs: training reward vs step, mean ± std over seeds per method."""
    curves = {
        m: curve_from_series([series(r.records.get("step", []), "step", "train/reward_mean") for r in runs])
        for m, runs in groups.items()
    }
    curves = {m: c for m, c in curves.items() if len(c.x)}
    if not curves:
        return None
    colors = _method_colors(list(curves))
    fig, (ax,) = _figure(1, (7.0, 4.5))
    for method, curve in curves.items():
        _plot_band(ax, curve, method, colors[method])
    ax.set(title="Training reward (mean ± std over seeds)", xlabel="training step", ylabel="train/reward_mean")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out, dpi=100)
    return out


# ---------------------------------------------------------------------------------------- report


class _Doc:
    """Builds the Markdown and the HTML version of the same document side by side."""

    def __init__(self) -> None:
        self.md: list[str] = []
        self.html: list[str] = []

    def heading(self, level: int, text: str) -> None:
        self.md.append(f"{'#' * level} {text}\n")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str) -> None:
        self.md.append(f"{text}\n")
        self.html.append(f"<p>{html.escape(text)}</p>")

    def bullets(self, items: list[tuple[str, str]]) -> None:
        self.md.append("\n".join(f"- **{k}:** {v}" for k, v in items) + "\n")
        lis = "".join(f"<li><b>{html.escape(k)}:</b> {html.escape(v)}</li>" for k, v in items)
        self.html.append(f"<ul>{lis}</ul>")

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        self.md.append("\n".join(lines) + "\n")
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def image(self, title: str, file_name: str) -> None:
        self.md.append(f"![{title}]({file_name})\n")
        self.html.append(f'<figure><img src="{html.escape(file_name)}" alt="{html.escape(title)}"></figure>')

    def render_html(self, title: str) -> str:
        style = (
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
            "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
        )
        return (
            f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(self.html) + "\n</body></html>\n"
        )


def _scenario(path: Path, runs: list[RunMetrics]) -> str:
    compare_file = path / "compare.json"
    if compare_file.is_file():
        try:
            scenario = json.loads(compare_file.read_text()).get("scenario")
        except (json.JSONDecodeError, AttributeError):
            expected = 'a JSON object with "methods", "seeds", "scenario"'
            raise DataError(f"{compare_file}: expected {expected}") from None
        if scenario:
            return str(scenario)
    for run in runs:
        if run.summary and run.summary.get("scenario"):
            return str(run.summary["scenario"])
    return DASH


def write_report(path: Path, target: float | None = None, out_dir: Path | None = None) -> Path:
    """Write report.md, report.html and the PNG plots into out_dir (default path/"report"); return the md path."""
    path = Path(path)
    runs = load_runs(path)
    out_dir = Path(out_dir) if out_dir is not None else path / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries, used_target = summarize(runs, target)
    groups = group_by_method(runs)
    federated = [s for s in summaries if not s.is_train]
    trained = [s for s in summaries if s.is_train]

    doc = _Doc()
    title = f"fgrpo report: {path.resolve().name}"
    doc.heading(1, title)
    if used_target is None:
        target_text = f"{DASH} (no accuracy recorded)"
    elif target is None:
        target_text = f"{format_percent(used_target)} (default: 90% of the way from the start to the best method's final mean accuracy)"
    else:
        target_text = f"{format_percent(used_target)} (given)"
    doc.bullets(
        [
            ("Results", str(path)),
            ("Scenario", _scenario(path, runs)),
            ("Methods", ", ".join(groups)),
            ("Seeds", ", ".join(str(s) for s in sorted({r.seed for r in runs}))),
            ("Target accuracy", target_text),
        ]
    )

    doc.heading(2, "Results")
    show_wall = any(s.wall_s is not None for s in summaries)
    wall = (["Wall time"] if show_wall else [])
    if federated:
        show_global_set = any(s.final_global_set is not None for s in federated)
        global_set = ["Final acc, global held-out set"] if show_global_set else []
        doc.table(
            ["Method", "Seeds", "Start acc", "Final acc (mean ± std)"] + global_set
            + ["Rounds to target", "Total bytes communicated", "Stability (acc. drop)"] + wall,
            [
                [s.method, str(len(s.seeds)), format_mean_std(s.start, len(s.seeds)), format_mean_std(s.final, len(s.seeds))]
                + ([format_mean_std(s.final_global_set, len(s.seeds)) if s.final_global_set else DASH] if show_global_set else [])
                + [_fmt_x(s.to_target), format_bytes(s.bytes_total), DASH if s.drop is None else f"{100 * s.drop:.1f} pp"]
                + ([format_seconds(s.wall_s)] if show_wall else [])
                for s in federated
            ],
        )
    if trained:
        doc.table(
            ["Run", "Seeds", "Start acc", "Final acc (mean ± std)", "Steps to target"] + wall,
            [
                [s.method, str(len(s.seeds)), format_mean_std(s.start, len(s.seeds)),
                 format_mean_std(s.final, len(s.seeds)), _fmt_x(s.to_target)]
                + ([format_seconds(s.wall_s)] if show_wall else [])
                for s in trained
            ],
        )

    accuracy_title = "Global held-out accuracy" if federated else "Held-out accuracy"
    plots = [
        (accuracy_title, "accuracy.png", lambda p: plot_accuracy(summaries, used_target, p)),
        ("Per-client held-out accuracy", "client_accuracy.png", lambda p: plot_client_accuracy(groups, p)),
        ("Aggregation weights", "aggregation_weights.png", lambda p: plot_aggregation_weights(groups, p)),
        ("Client rewards (each on its own scale)", "client_rewards.png", lambda p: plot_client_rewards(groups, p)),
        ("Training reward", "train_reward.png", lambda p: plot_train_reward(groups, p)),
    ]
    doc.heading(2, "Plots")
    for plot_title, file_name, plot in plots:
        if plot(out_dir / file_name) is not None:
            doc.heading(3, plot_title)
            doc.image(plot_title, file_name)

    doc.heading(2, "How to read this")
    doc.bullets(_reading_notes(bool(federated), bool(trained)))

    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(doc.md))
    (out_dir / "report.html").write_text(doc.render_html(title))
    return md_path


def _fmt_x(x: int | None) -> str:
    return "not reached" if x is None else str(x)


def _reading_notes(federated: bool, trained: bool) -> list[tuple[str, str]]:
    notes = [
        ("Accuracy", "greedy accuracy of the global model on the pooled held-out set; mean ± sample std (ddof=1) "
                     "over seeds, std in percentage points (pp); a single seed shows the mean only."),
    ]
    if federated:
        notes += [
            ("Local-only", "each owner trains alone; 'Final acc' scores each owner's model on its own held-out split "
                           "(pooled), 'global held-out set' scores each owner's model on every owner's held-out data "
                           "(mean over owners) — the set the shared methods are scored on. It sends nothing: 0 bytes."),
        ]
        notes += [
            ("Rounds to target", "first round at which the seed-mean accuracy is at least the target; round 0 "
                                 "is the initial model, so 0 means the target was met before training."),
            ("Total bytes communicated", "comm/bytes_up + comm/bytes_down summed over all rounds and clients, "
                                         "mean over seeds (KiB/MiB = 1024/1024² bytes)."),
            ("Stability (acc. drop)", "total accuracy lost between consecutive rounds, Σ max(0, acc[t-1] − acc[t]), "
                                      "mean over seeds, in pp. 0.0 pp = never got worse; lower is steadier."),
            ("Client rewards", "each client's reward is on its own scale; compare methods within a panel, "
                               "not heights across panels."),
        ]
    if trained:
        notes.append(("Train runs", "accuracy comes from `eval` records (step 0 = before training); "
                                    "steps to target counts training steps."))
    return notes
