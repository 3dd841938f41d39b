"""`fgrpo` command line: train, run, compare, report, quickstart, merge."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import ConfigError, FgrpoError

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
def run(
    config: Path = typer.Argument(..., help="TOML config with a [federation] section (see examples/)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Results directory (overrides output.dir)."),
    set_values: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    overwrite: bool = typer.Option(False, help="Replace an existing results directory."),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Continue the run in this directory from its last checkpoint (same config)."
    ),
    quiet: bool = typer.Option(False, help="No progress bar."),
):
    """One federated experiment, in-process (ServerApp + ClientApp on an in-process grid)."""
    from .runtime import run_simulation

    if resume is not None and (overwrite or output is not None):
        raise ConfigError("--resume continues RUN_DIR in place; it cannot be combined with --overwrite or --output")
    cfg = _load(config, set_values, resume if resume is not None else output)
    summary = run_simulation(cfg, overwrite=overwrite, progress=not quiet, resume=resume is not None)
    console.print(
        f"{summary['method']}: global held-out accuracy {summary['initial/acc_heldout']:.1%} → "
        f"{summary['final/acc_heldout']:.1%} in {summary['rounds']} rounds, {summary['wall_s']:.0f} s; "
        f"results in {cfg.output.dir}"
    )


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@app.command()
@friendly_errors
def compare(
    config: Path = typer.Argument(..., help="TOML config of the scenario."),
    methods: str = typer.Option(
        "fgrpo,fedavg,fedprox,fedadam,reward_weighted,centralized,local", help="Comma-separated methods."
    ),
    seeds: int = typer.Option(3, min=1, help="Number of seeds (0..N-1)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Comparison directory (default: output.dir)."),
    set_values: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    overwrite: bool = typer.Option(False, help="Replace an existing comparison directory."),
    quiet: bool = typer.Option(False, help="No progress bar."),
    report_target: Optional[float] = typer.Option(None, "--target", help="Target accuracy for rounds-to-target."),
):
    """The same scenario under each method and seed, then a comparison report."""
    from .report import write_report
    from .runtime import run_comparison

    cfg = _load(config, set_values, output)
    out_dir = Path(cfg.output.dir)
    run_comparison(cfg, _split(methods), list(range(seeds)), out_dir, overwrite=overwrite, progress=not quiet)
    path = write_report(out_dir, target=report_target)
    console.print(f"comparison in {out_dir}; report: {path}")


@app.command()
@friendly_errors
def quickstart(
    output: Path = typer.Option(Path("runs/quickstart"), "--output", "-o", help="Comparison directory."),
    seeds: int = typer.Option(1, min=1, help="Number of seeds."),
    methods: str = typer.Option("fgrpo,fedavg,centralized", help="Comma-separated methods."),
    overwrite: bool = typer.Option(True, help="Replace an earlier quickstart."),
    quiet: bool = typer.Option(False, help="No progress bar."),
):
    """The shipped demo: 4 non-IID clients (a task family and reward scale each), FGRPO vs FedAvg vs centralized."""
    from importlib.resources import files

    from .config import load_config
    from .report import write_report
    from .runtime import run_comparison

    scenario = files("fgrpo") / "scenarios" / "quickstart.toml"
    cfg = load_config(Path(str(scenario)), {"output": {"dir": str(output)}})
    run_comparison(cfg, _split(methods), list(range(seeds)), output, overwrite=overwrite, progress=not quiet)
    path = write_report(output)
    console.print(f"quickstart done: report in {path}")
    table = [line for line in path.read_text().splitlines() if line.startswith("|")]
    print("\n".join(table))


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


@app.command()
@friendly_errors
def merge(
    adapter: Path = typer.Argument(..., help="A run's adapter/ folder (peft save_pretrained format)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the merged model."),
    base: Optional[str] = typer.Option(None, help="Base model folder or hub id (default: from adapter_config.json)."),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16."),
):
    """Merge a trained LoRA adapter into its base model: a plain checkpoint for serving."""
    from .model import merge_adapter

    path = merge_adapter(adapter, out, base=base, dtype=dtype)
    console.print(f"merged model written to {path}")


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
