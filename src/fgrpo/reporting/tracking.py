"""Experiment trackers people already use (TRL's `report_to`): TensorBoard and Weights & Biases.

metrics.jsonl stays the run's record; a tracker receives every record as it is
written there (`MetricsWriter` forwards them), as scalars at the record's round
(federated runs) or step (`fgrpo train`):

- `round` and `step` / `eval` records: every numeric key under its own name
  (`global/acc_heldout`, `comm/bytes_up`, `time/round_s`, `train/loss`, ...);
- `client` records: every numeric key once per client, `<key>/client<k>`
  (`client/reward_mean/client0`, `agg/weight/client2`, `agg/gain/client1`);
- `failure` records carry text only and stay in metrics.jsonl
  (the round's `clients/failed` counts them).

TensorBoard is written with the `tensorboard` package's own `tensorboard.summary.Writer`
(numpy only), not `torch.utils.tensorboard`: the server path holds no torch
(import-linter's "no torch on the server path" contract), and the ServerApp is
where federated metrics are written. Both libraries are optional extras,
imported only when a config asks for them.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Protocol

from fgrpo.config import Config
from fgrpo.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"  # RUN_DIR/tensorboard/: `tensorboard --logdir RUN_DIR`
# Keys that place a record (its x-axis and its owner), not values to plot.
_PLACEMENT = ("kind", "method", "seed", "round", "step", "client", "node")


class Tracker(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def record_scalars(record: dict[str, Any]) -> tuple[int, dict[str, float]] | None:
    """(step, {tag: value}) for one metrics.jsonl record, or None when it holds nothing to plot.

    Non-numbers (failure reasons), booleans and nulls (NaN written as null) are left out.
    """
    step = record.get("round", record.get("step"))
    if step is None:
        return None
    suffix = f"/client{int(record['client'])}" if record.get("kind") == "client" and "client" in record else ""
    scalars = {
        f"{key}{suffix}": float(value)
        for key, value in record.items()
        if key not in _PLACEMENT
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    }
    return (int(step), scalars) if scalars else None


_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # report_to name -> the package it needs


def check_report_to(config: Config) -> None:
    """Fail before any model loads when a tracker's library is missing (`open_trackers` comes later)."""
    for kind in config.output.report_to:
        if importlib.util.find_spec(_PACKAGES[kind]) is None:
            raise _missing(_PACKAGES[kind], kind)


def _missing(package: str, extra: str) -> ConfigError:
    return ConfigError(
        f"output.report_to asks for '{extra}', but the {package} package is not installed; "
        f"pip install 'fgrpo[{extra}]' (or remove '{extra}' from output.report_to)"
    )


class TensorBoardTracker:
    """Scalars into RUN_DIR/tensorboard/ event files, read by `tensorboard --logdir RUN_DIR`."""

    def __init__(self, run_dir: Path):
        try:
            from tensorboard.summary import Writer
        except ImportError as err:
            raise _missing("tensorboard", "tensorboard") from err
        self._writer = Writer(str(Path(run_dir) / TENSORBOARD_DIR))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()  # a round is minutes apart: let `tensorboard` see it now

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    """One W&B run per fgrpo run, its files under RUN_DIR/wandb/, the resolved config attached."""

    def __init__(self, run_dir: Path, config: Config, name: str):
        try:
            import wandb
        except ImportError as err:
            raise _missing("wandb", "wandb") from err
        out = config.output
        kwargs: dict[str, Any] = {"project": out.wandb_project, "name": name, "dir": str(run_dir)}
        if out.wandb_mode is not None:  # else wandb decides (WANDB_MODE, then online), as under TRL
            kwargs["mode"] = out.wandb_mode
        self._run = wandb.init(config=config.model_dump(mode="json"), **kwargs)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        # Several records share a round (its clients, then the round): wandb merges equal steps.
        self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


def open_trackers(run_dir: Path, config: Config, name: str) -> list[Tracker]:
    """The trackers `config.output.report_to` names (none by default); a missing library is a ConfigError."""
    trackers: list[Tracker] = []
    try:
        for kind in config.output.report_to:
            trackers.append(TensorBoardTracker(run_dir) if kind == "tensorboard" else WandbTracker(run_dir, config, name))
    except BaseException:
        for tracker in trackers:
            tracker.close()
        raise
    return trackers
