"""The results directory every run writes (see docs/results-format.md)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from fgrpo.config import Config, dump_config
from fgrpo.errors import ConfigError


def prepare_run_dir(path: str | Path, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Create RUN_DIR; an existing non-empty one is refused unless --overwrite or --resume."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not resume:
        if not overwrite:
            raise ConfigError(
                f"results directory '{path}' already exists and is not empty; "
                "pass --overwrite to replace it, --resume to continue it, or set output.dir elsewhere"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_config(run_dir: Path, config: Config) -> None:
    (run_dir / "config.toml").write_text(dump_config(config))


def _finite(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl, flushed as it goes."""

    def __init__(self, run_dir: Path, method: str, seed: int):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.method = method
        self.seed = seed
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, kind: str, **values: Any) -> None:
        record = {"kind": kind, "method": self.method, "seed": self.seed}
        record.update({k: _finite(v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_summary(run_dir: Path, summary: dict) -> None:
    tmp = Path(run_dir) / "summary.json.tmp"
    tmp.write_text(json.dumps({k: _finite(v) for k, v in summary.items()}, indent=2))
    os.replace(tmp, Path(run_dir) / "summary.json")
