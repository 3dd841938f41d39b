"""Turn results directories (docs/results-format.md) into a Markdown/HTML report with plots.

Loading and summaries are in `fgrpo.reporting.runs`, the plots in
`fgrpo.reporting.plots`; both are re-exported here, the names the report
has always offered.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from fgrpo.errors import DataError
from fgrpo.registry import PERSONAL_METHODS
from fgrpo.reporting.plots import *  # noqa: F401,F403  (re-exported)
from fgrpo.reporting.plots import (
    plot_accuracy,
    plot_aggregation_weights,
    plot_client_accuracy,
    plot_client_rewards,
    plot_train_reward,
)
from fgrpo.reporting.runs import *  # noqa: F401,F403  (re-exported)
from fgrpo.reporting.runs import (
    DASH,
    RunMetrics,
    format_bytes,
    final_client_accuracy,
    format_mean_std,
    format_percent,
    format_seconds,
    group_by_method,
    load_runs,
    summarize,
)

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
            scenario = json.loads(compare_file.read_text(encoding="utf-8")).get("scenario")
        except (ValueError, AttributeError):  # not JSON, not UTF-8, not an object
            expected = 'a JSON object with "methods", "seeds", "scenario"'
            raise DataError(f"{compare_file}: expected {expected}") from None
        if scenario:
            return str(scenario)
    for run in runs:
        if run.summary and run.summary.get("scenario"):
            return str(run.summary["scenario"])
    return DASH


REPORT_FILES = ("report.md", "report.html", "accuracy.png", "client_accuracy.png", "aggregation_weights.png",
                "client_rewards.png", "train_reward.png")


def write_report(path: Path, target: float | None = None, out_dir: Path | None = None, *, overwrite: bool = False) -> Path:
    """Write report.md, report.html and the PNG plots into out_dir (default path/"report"); return the md path.

    A report is regenerated in place under path/"report"; an `out_dir` that already holds a report needs
    `overwrite`. Either way only files an earlier report wrote are replaced, never the user's own
    (`fgrpo.owned_files`), and a failed report leaves the folder as it was.
    """
    from fgrpo.owned_files import staged_folder

    path = Path(path)
    runs = load_runs(path)
    replace = overwrite or out_dir is None
    out_dir = Path(out_dir) if out_dir is not None else path / "report"
    with staged_folder(out_dir, overwrite=replace, what="report folder", names=REPORT_FILES) as stage:
        _write_report_files(path, runs, target, stage)
    return out_dir / "report.md"


def _write_report_files(path: Path, runs: list[RunMetrics], target: float | None, out_dir: Path) -> None:
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
        paired_section(doc, groups, [s.method for s in federated])
        owner_section(doc, groups, [s.method for s in federated])
        doc.heading(3, "Tuning budget")
        doc.table(["Method", "How its hyperparameters were chosen"], [[s.method, s.tuning or DASH] for s in federated])
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

    (out_dir / "report.md").write_text("\n".join(doc.md))
    (out_dir / "report.html").write_text(doc.render_html(title))


def model_kind(method: str) -> str | None:
    """What an owner's accuracy in a `method` run measures: the shared model, its own personalized one, or its own
    local-only one (None: centralized, whose one pooled client is no owner)."""
    if method == "local":
        return "local-only"
    if method in PERSONAL_METHODS:
        return "personalized"
    return None if method == "centralized" else "global"


def owner_section(doc, groups: dict, methods: list[str]) -> None:
    """Per owner, its final accuracy on its own held-out split under each method: the global model, a personalized
    model (fedsa: global A + its own B) and its local-only model, when the comparison has runs of two such kinds."""
    kinds = {m: model_kind(m) for m in methods}
    shown = [m for m in methods if kinds[m] is not None]
    if len({kinds[m] for m in shown}) < 2:
        return
    finals = {m: final_client_accuracy(groups[m]) for m in shown}
    owners = sorted({c for f in finals.values() for c in f})
    doc.heading(3, "Per owner: global, personalized and local-only models")
    doc.paragraph(
        "Each owner's final accuracy on its own held-out split (mean ± std over seeds): the shared global model, "
        "its personalized model and its local-only model."
    )
    seeds = {m: len({r.seed for r in groups[m]}) for m in shown}
    doc.table(
        ["Owner"] + [f"{m} ({kinds[m]})" for m in shown],
        [[f"client {c}"] + [format_mean_std(finals[m].get(c), seeds[m]) for m in shown] for c in owners],
    )


def _fmt_x(x: int | None) -> str:
    return "not reached" if x is None else str(x)


REFERENCE_METHOD = "fedavg"


def why_no_difference(result) -> str:
    """Which test did not support a claim: the interval, or (with a narrow interval from few seeds) the t-test."""
    if result.ci_low <= 0 <= result.ci_high:
        return "the 95% interval covers 0"
    return f"the interval excludes 0 but the paired t-test does not reject, p = {result.p_value:.2f}"


def paired_section(doc, groups: dict, methods: list[str]) -> None:
    """Each method against FedAvg, seed by seed: mean difference, 95% bootstrap CI, paired t-test, verdict."""
    from fgrpo.reporting.runs import final_by_seed
    from fgrpo.reporting.stats import NO_DIFFERENCE, paired_comparison

    if REFERENCE_METHOD not in groups:
        return
    reference = final_by_seed(groups[REFERENCE_METHOD])
    rows, verdicts = [], []
    for method in methods:
        if method == REFERENCE_METHOD:
            continue
        result = paired_comparison(final_by_seed(groups[method]), reference)
        if len(result.seeds) < 2:
            rows.append([method, str(len(result.seeds)), DASH, DASH, DASH, result.verdict])
            continue
        rows.append(
            [
                method,
                str(len(result.seeds)),
                f"{100 * result.mean:+.1f} pp",
                f"[{100 * result.ci_low:+.1f}, {100 * result.ci_high:+.1f}] pp",
                f"{result.p_value:.3f}",
                result.verdict,
            ]
        )
        verdicts.append(f"{method}: {result.verdict}" + (f" ({why_no_difference(result)})" if result.verdict == NO_DIFFERENCE else ""))
    if not rows:
        return
    doc.heading(3, f"Paired differences against {REFERENCE_METHOD} (final accuracy, same seeds)")
    doc.table(["Method", "Seeds paired", "Mean Δ", "95% bootstrap CI", "p (paired t)", "Verdict"], rows)
    if verdicts:
        doc.paragraph("In words: " + "; ".join(verdicts) + ".")


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
            ("Paired differences", "per seed, method − FedAvg final accuracy (the same seed shares the task pool, "
                                   "partition, initial adapter and sampled clients); 95% bootstrap CI of the mean "
                                   "difference (BCa) and a paired t-test. 'no significant difference' when the CI "
                                   "covers 0; with fewer than 2 paired seeds nothing is claimed."),
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
