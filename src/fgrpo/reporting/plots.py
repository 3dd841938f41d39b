"""The report's plots (matplotlib, PNG): accuracy curves, per-client accuracy and rewards, aggregation weights."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fgrpo.registry import ACC_HELDOUT, WEIGHTED_METHODS
from fgrpo.reporting.runs import (
    Curve,
    MethodSummary,
    RunMetrics,
    aggregation_weight_curves,
    client_curves,
    curve_from_series,
    format_percent,
    series,
)

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
    curves = {m: client_curves(runs, f"client/{ACC_HELDOUT}") for m, runs in groups.items()}
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
