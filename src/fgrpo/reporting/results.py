"""The results directory every run writes (see docs/results-format.md).

A results directory is fgrpo's only while it carries the marker file
`.fgrpo-run`, written when fgrpo creates it. `--overwrite` replaces only such a
directory, and never the current directory, one of its parents or the home
directory. The previous run is moved aside (not deleted) until the new one has
started cleanly — its config validated and its first round (round 0's
evaluation) done — and put back if the new run fails before that, so a typo in
a config never costs a finished run. A failed start removes what it created,
so the retry needs no `--overwrite`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from fgrpo.config import Config, dump_config
from fgrpo.errors import ConfigError
from fgrpo.reporting.tracking import Tracker, record_scalars

MARKER_NAME = ".fgrpo-run"


def _marker_text(kind: str) -> str:
    from fgrpo import __version__

    return json.dumps({"created_by": "fgrpo", "kind": kind, "version": __version__}) + "\n"


def is_fgrpo_dir(path: Path) -> bool:
    """True when fgrpo created `path` (its marker file is there and says so)."""
    marker = Path(path) / MARKER_NAME
    try:
        return marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("created_by") == "fgrpo"
    except (OSError, ValueError, AttributeError):
        return False


def _contents(path: Path) -> list[Path]:
    """What a directory holds besides fgrpo's marker."""
    return [p for p in path.iterdir() if p.name != MARKER_NAME]


def _refuse_protected(path: Path) -> None:
    """A results directory is a folder of its own: never the current directory, a parent of it, home or /."""
    resolved = path.resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if resolved == cwd or resolved in cwd.parents:
        where = "the current directory" if resolved == cwd else "a parent of the current directory"
        raise ConfigError(
            f"output directory '{path}' is {where}; results need a folder of their own, e.g. -o runs/my-run "
            "(output.dir must not be empty or '.')"
        )
    if resolved == home or resolved in home.parents:
        raise ConfigError(f"output directory '{path}' is your home directory or above it; use e.g. -o runs/my-run")


@dataclass
class RunDirectory:
    """A results directory being (re)created: where the run writes, and the previous run kept until `commit`."""

    path: Path
    backup: Path | None = None  # the replaced run, moved aside until the new one has started cleanly
    created: bool = False  # fgrpo made the folder itself (rather than using an existing empty one)
    committed: bool = False

    def commit(self) -> None:
        """The new run started cleanly: the replaced one (an fgrpo directory, by its marker) goes."""
        if self.committed:
            return
        self.committed = True
        if self.backup is not None and is_fgrpo_dir(self.backup):
            shutil.rmtree(self.backup)
        self.backup = None

    def abandon(self) -> None:
        """The new run failed before starting cleanly: remove what it wrote, put the replaced run back."""
        if self.committed:
            return
        if self.path.is_dir() and is_fgrpo_dir(self.path):
            if self.created:
                shutil.rmtree(self.path)
            else:  # the user's empty folder: empty it again, keep it
                for child in self.path.iterdir():
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        if self.backup is not None:
            os.replace(self.backup, self.path)
            self.backup = None


def _backup_path(path: Path) -> Path:
    return path.parent / f".{path.name}.fgrpo-replaced"


def prepare_run_dir(path: str | Path, *, overwrite: bool = False, resume: bool = False, kind: str = "run") -> RunDirectory:
    """Make PATH ready for a run; see the module docstring for what is refused and what is kept."""
    path = Path(path)
    if str(path) == "":
        path = Path(".")
    _refuse_protected(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output directory '{path}' is an existing file, not a directory; choose another -o")
    if resume:
        if not path.is_dir():
            raise ConfigError(f"cannot resume '{path}': no such results directory")
        return RunDirectory(path, committed=True)
    backup = _backup_path(path)
    if backup.exists():
        raise ConfigError(
            f"'{backup}' holds a run that an interrupted --overwrite moved aside; move it back to '{path}' "
            "or delete it, then run again"
        )
    if path.is_dir() and _contents(path):
        if not overwrite:
            raise ConfigError(
                f"results directory '{path}' already exists and is not empty; "
                "pass --overwrite to replace it, --resume to continue it, or set output.dir elsewhere"
            )
        if not is_fgrpo_dir(path):
            raise ConfigError(
                f"refusing to overwrite '{path}': fgrpo did not create it (no {MARKER_NAME} marker), and fgrpo "
                "deletes only its own results directories; choose another -o"
            )
        os.replace(path, backup)
        run = RunDirectory(path, backup=backup)
    else:
        run = RunDirectory(path)
    run.created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / MARKER_NAME).write_text(_marker_text(kind), encoding="utf-8")
    except OSError as exc:
        if run.backup is not None:  # put the replaced run back: nothing of the user's changes
            os.replace(run.backup, path)
        raise ConfigError(_unwritable(path, exc)) from None
    return run


def _unwritable(path: Path, exc: OSError) -> str:
    """Why a results directory cannot be made, in one line naming it (no traceback)."""
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        reason = "a part of this path is a file, not a folder"
    else:
        reason = exc.strerror or str(exc)
    return f"output directory '{path}' cannot be created: {reason}; choose another -o"


@contextmanager
def run_directory(
    path: str | Path, *, overwrite: bool = False, resume: bool = False, kind: str = "run"
) -> Iterator[RunDirectory]:
    """`prepare_run_dir`, then `abandon` on an error before `commit`, and `commit` on success."""
    run = prepare_run_dir(path, overwrite=overwrite, resume=resume, kind=kind)
    try:
        yield run
    except BaseException:
        run.abandon()
        raise
    run.commit()


def write_config(run_dir: Path, config: Config) -> None:
    (run_dir / "config.toml").write_text(dump_config(config))


def _finite(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl, flushed as it goes.

    Each record also goes to the `trackers` (output.report_to: TensorBoard, W&B),
    so they show exactly what metrics.jsonl holds; closing the writer closes them.
    """

    def __init__(self, run_dir: Path, method: str, seed: int, trackers: Sequence[Tracker] = ()):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.method = method
        self.seed = seed
        self.trackers = list(trackers)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, kind: str, **values: Any) -> None:
        record = {"kind": kind, "method": self.method, "seed": self.seed}
        record.update({k: _finite(v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        scalars = record_scalars(record) if self.trackers else None
        if scalars is not None:
            for tracker in self.trackers:
                tracker.log(*scalars)

    def close(self) -> None:
        self._file.close()
        for tracker in self.trackers:
            tracker.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_summary(run_dir: Path, summary: dict) -> None:
    tmp = Path(run_dir) / "summary.json.tmp"
    tmp.write_text(json.dumps({k: _finite(v) for k, v in summary.items()}, indent=2))
    os.replace(tmp, Path(run_dir) / "summary.json")
