"""`fgrpo` command line: train, run, compare, report, quickstart."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import FgrpoError

app = typer.Typer(
    help="Federated GRPO: RL fine-tuning of language models across data owners, aggregated by relative gain.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def friendly_errors(command):
    """Print fgrpo's own errors as one clear message (no traceback) and exit 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FgrpoError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def _load(config: Path, set_values: list[str] | None, output: Optional[Path]):
    from .config import deep_merge, load_config, parse_override

    overrides: dict = {}
    for text in set_values or []:
        overrides = deep_merge(overrides, parse_override(text))
    if output is not None:
        overrides = deep_merge(overrides, {"output": {"dir": str(output)}})
    return load_config(config, overrides)


SET_HELP = "Override a config value, e.g. --set grpo.beta=0.04 (repeatable)."


@app.command()
@friendly_errors
def train(
    config: Path = typer.Argument(..., help="TOML config (see examples/train.toml)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Results directory (overrides output.dir)."),
    set_values: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    overwrite: bool = typer.Option(False, help="Replace an existing results directory."),
    quiet: bool = typer.Option(False, help="No progress bar."),
):
    """Centralized GRPO on the pooled task set, with held-out evaluation."""
    from .train import run_training

    cfg = _load(config, set_values, output)
    summary = run_training(cfg, overwrite=overwrite, progress=not quiet)
    console.print(
        f"held-out greedy accuracy {summary['initial/acc_heldout']:.1%} → {summary['final/acc_heldout']:.1%} "
        f"in {summary['steps']} steps, {summary['wall_s']:.0f} s; results in {cfg.output.dir}"
    )


@app.command()
@friendly_errors
def report(
    run_dir: Path = typer.Argument(..., help="A results directory of `run`, `train` or `compare`."),
    target: Optional[float] = typer.Option(None, help="Target accuracy in [0, 1] for rounds-to-target."),
    out_dir: Optional[Path] = typer.Option(None, help="Where to write the report (default RUN_DIR/report)."),
):
    """Write a Markdown + HTML report with plots and a comparison table."""
    from .report import write_report

    path = write_report(run_dir, target=target, out_dir=out_dir)
    console.print(f"report written to {path} (and {path.with_suffix('.html').name})")


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
