"""The progress bar `fgrpo train` and the federation loop share (rich; disabled, it prints nothing)."""

from __future__ import annotations


def progress_bar(enabled: bool):
    """A rich Progress with a description, a bar, done/total, elapsed time and an `info` field."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        disable=not enabled,
    )
