"""`fgrpo` command line: train, run, compare, report, quickstart, merge, flower."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from fgrpo.errors import ConfigError, FgrpoError
from fgrpo.registry import COMPARED_METHODS, METHODS

app = typer.Typer(
    help="Federated GRPO: RL fine-tuning of language models across data owners, aggregated by relative gain.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


@app.callback()
def main(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show the libraries' own output too: transformers' progress bars and "
        "deprecation warnings, Flower's INFO logs (hidden by default)."
    ),
):
    """Federated GRPO: RL fine-tuning of language models across data owners, aggregated by relative gain."""
    from fgrpo.reporting.noise import quiet_libraries, set_verbose

    set_verbose(verbose)
    quiet_libraries()


def friendly_errors(command):
    """Print fgrpo's own errors as one clear message (no traceback) and exit 2."""
    from rich.markup import escape

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FgrpoError as exc:
            # one line, never wrapped; escaped, so a key like [[tasks.files]] is printed, not read as markup
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as exc:
            # The last net: the file system refused (no permission, a file where a folder should be, a full disk).
            # Commands check their paths first; whatever slips through is still one line naming the path.
            console.print(f"[bold red]error:[/] {escape(os_error_text(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def os_error_text(exc: OSError) -> str:
    """'PATH: Permission denied' (both paths of a rename), or the error's own text when it names no path."""
    paths = [f"'{name}'" for name in (exc.filename, exc.filename2) if name is not None]
    reason = exc.strerror or str(exc)
    return f"{' → '.join(paths)}: {reason}" if paths else reason


def _load(config: Path, set_values: list[str] | None, output: Optional[Path], runtime: dict | None = None):
    from fgrpo.config import deep_merge, load_config, parse_override

    overrides: dict = {}
    for text in set_values or []:
        overrides = deep_merge(overrides, parse_override(text))
    if output is not None:
        overrides = deep_merge(overrides, {"output": {"dir": str(output)}})
    if runtime:
        overrides = deep_merge(overrides, {"runtime": runtime})
    return load_config(config, overrides)


OVERWRITE_FILES_HELP = "Replace files fgrpo wrote there before (never files it did not write)."
SET_HELP = "Override a config value, e.g. --set grpo.beta=0.04 (repeatable)."
WORKERS_HELP = (
    "Worker processes that run a round's clients at once (runtime.workers): 'auto' = min(cores, clients), "
    "1 = one after another in this process."
)
THREADS_HELP = "Torch threads per client process (runtime.threads): 'auto' = cores // workers."


def _runtime(workers: Optional[str], threads: Optional[str], backend: Optional[str] = None) -> dict:
    """The --workers / --threads / --runtime flags as a [runtime] override (validated with the config)."""
    given = {"workers": workers, "threads": threads, "backend": backend}
    return {key: value for key, value in given.items() if value is not None}


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
    from fgrpo.core.train import run_training

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
    workers: Optional[str] = typer.Option(None, "--workers", help=WORKERS_HELP),
    threads: Optional[str] = typer.Option(None, "--threads", help=THREADS_HELP),
    runtime: Optional[str] = typer.Option(
        None, "--runtime", help="'inprocess' (default) or 'ray': Flower's simulation engine (pip install 'fgrpo[ray]')."
    ),
):
    """One federated experiment, in-process (ServerApp + ClientApp on an in-process grid, clients in worker processes)."""
    from fgrpo.deploy.runtime import run_simulation

    if resume is not None and (overwrite or output is not None):
        raise ConfigError("--resume continues RUN_DIR in place; it cannot be combined with --overwrite or --output")
    cfg = _load(config, set_values, resume if resume is not None else output, _runtime(workers, threads, runtime))
    tuned = cfg.tuned.get(cfg.federation.method)
    if tuned is not None and tuned.values:  # run_simulation applies them, as `compare` does: say so
        values = ", ".join(f"{key} = {value:.4g}" for key, value in tuned.values.items())
        console.print(f"{cfg.federation.method}: using the tuned values of \\[tuned.{cfg.federation.method}]: {values}")
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
def tune(
    config: Path = typer.Argument(..., help="TOML config of the scenario (its [tuned.*] tables are rewritten with --write)."),
    methods: str = typer.Option("fgrpo,fedavg,centralized", help="Comma-separated methods, each tuned with the same budget."),
    trials: int = typer.Option(8, min=1, help="Configurations tried per method (the first is the scenario's own values)."),
    seeds: int = typer.Option(1, min=1, help="Training seeds per configuration (0..N-1); its score is their mean."),
    output: Path = typer.Option(Path("runs/tune"), "--output", "-o", help="Where the tuning runs go."),
    write: bool = typer.Option(False, help="Write the chosen values into CONFIG's [tuned.<method>] tables."),
    set_values: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    overwrite: bool = typer.Option(False, help="Replace an earlier tuning directory."),
    quiet: bool = typer.Option(False, help="No progress bar."),
):
    """Tune each method's learning rates (and FGRPO's τ) on validation prompts, never the test set."""
    from fgrpo.reporting.results import run_directory
    from fgrpo.tuning import SEARCH_SPACES, tune_method, write_tuned

    cfg = _load(config, set_values, None)
    names = _split(methods)
    unknown = [m for m in names if m not in SEARCH_SPACES]
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(SEARCH_SPACES)}")
    tuned = {}
    with run_directory(output, overwrite=overwrite, kind="tuning") as directory:
        for method in names:
            tuned[method] = tune_method(cfg, method, trials, list(range(seeds)), directory.path, progress=not quiet)
            directory.commit()
            values = ", ".join(f"{k} = {v:.4g}" for k, v in tuned[method].values.items())
            console.print(f"{method}: validation accuracy {tuned[method].best_value:.1%} with {values} ({tuned[method].budget_text()})")
    if write:
        write_tuned(config, tuned)
        console.print(f"wrote \\[tuned.*] for {', '.join(names)} into {config}")


@app.command()
@friendly_errors
def compare(
    config: Path = typer.Argument(..., help="TOML config of the scenario."),
    methods: str = typer.Option(",".join(COMPARED_METHODS), help=f"Comma-separated methods, of {', '.join(METHODS)}."),
    seeds: int = typer.Option(3, min=1, help="Number of seeds (0..N-1)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Comparison directory (default: output.dir)."),
    set_values: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    overwrite: bool = typer.Option(False, help="Replace an existing comparison directory."),
    quiet: bool = typer.Option(False, help="No progress bar."),
    report_target: Optional[float] = typer.Option(None, "--target", help="Target accuracy for rounds-to-target."),
    workers: Optional[str] = typer.Option(None, "--workers", help=WORKERS_HELP),
    threads: Optional[str] = typer.Option(None, "--threads", help=THREADS_HELP),
):
    """The same scenario under each method and seed, then a comparison report."""
    from fgrpo.reporting.report import write_report
    from fgrpo.deploy.runtime import run_comparison

    cfg = _load(config, set_values, output, _runtime(workers, threads))
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
    workers: Optional[str] = typer.Option(None, "--workers", help=WORKERS_HELP),
    threads: Optional[str] = typer.Option(None, "--threads", help=THREADS_HELP),
):
    """The shipped demo: 4 non-IID owners (skewed mixes of 3 task families on different reward scales), FGRPO vs FedAvg vs centralized."""
    from importlib.resources import files

    from fgrpo.config import load_config
    from fgrpo.reporting.report import write_report
    from fgrpo.deploy.runtime import run_comparison

    scenario = files("fgrpo") / "scenarios" / "quickstart.toml"
    runtime = _runtime(workers, threads)
    cfg = load_config(Path(str(scenario)), {"output": {"dir": str(output)}, **({"runtime": runtime} if runtime else {})})
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
    overwrite: bool = typer.Option(
        False, help="Replace a report fgrpo wrote in --out-dir (never other files; RUN_DIR/report is always regenerated)."
    ),
):
    """Write a Markdown + HTML report with plots and a comparison table."""
    from fgrpo.reporting.report import write_report

    path = write_report(run_dir, target=target, out_dir=out_dir, overwrite=overwrite)
    console.print(f"report written to {path} (and {path.with_suffix('.html').name})")


@app.command()
@friendly_errors
def merge(
    adapter: Path = typer.Argument(..., help="A run's adapter/ folder (peft save_pretrained format)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the merged model."),
    base: Optional[str] = typer.Option(None, help="Base model folder or hub id (default: from adapter_config.json)."),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16."),
    overwrite: bool = typer.Option(False, help=OVERWRITE_FILES_HELP),
):
    """Merge a trained LoRA adapter into its base model: a plain checkpoint for serving."""
    from fgrpo.core.model import merge_adapter

    path = merge_adapter(adapter, out, base=base, dtype=dtype, overwrite=overwrite)
    console.print(f"merged model written to {path}")


flower = typer.Typer(
    help=(
        "Run the same Flower App on Flower's deployment runtime: a SuperLink, one SuperNode per data owner, "
        "then `flwr run`. `fgrpo flower commands CONFIG` prints the exact commands (see docs/deployment.md)."
    ),
    no_args_is_help=True,
)
app.add_typer(flower, name="flower")


@flower.command("commands")
@friendly_errors
def flower_commands(
    config: Path = typer.Argument(..., help="TOML config with a [federation] section."),
    output: Path = typer.Option(Path("runs/flower"), "--output", "-o", help="Results directory the ServerApp writes."),
    data: Optional[list[Path]] = typer.Option(
        None, "--data", help="One private JSONL file per SuperNode (repeat); default: node i holds partition i."
    ),
    host: str = typer.Option("127.0.0.1", help="Address the SuperLink listens on (its machine's address in a real deployment)."),
    port: int = typer.Option(9093, min=1, max=65535, help="SuperLink port (Fleet, Control and Runtime APIs share it in flwr 1.42)."),
    tls: Optional[Path] = typer.Option(None, help="Folder with ca.crt, server.pem, server.key (`fgrpo flower certs`)."),
    auth: Optional[Path] = typer.Option(None, help="Folder with supernode<i>[.pub] keys (`fgrpo flower keys`); needs --tls."),
    app_dir: Path = typer.Option(Path("."), "--app", help="The Flower App folder (this repository's root)."),
):
    """Print the exact commands: SuperLink, N SuperNodes (each with its own data), connection, `flwr run`."""
    import shlex

    from fgrpo.deploy import flower as deploy

    host = deploy.check_host(host)
    cfg = _load(config, None, None)
    n = 1 if cfg.federation.method == "centralized" else cfg.federation.num_clients
    if data and len(data) != n:
        raise ConfigError(f"--data: got {len(data)} files for {n} clients (federation.num_clients)")
    deploy.check_files(data or [], "--data")
    if tls is not None:
        deploy.check_tls_folder(tls)
    if auth is not None:
        deploy.check_files([auth / f"supernode{i}.pub" for i in range(n)], "--auth (make them with `fgrpo flower keys`)")
    certs = deploy.TLSFiles(tls / "ca.crt", tls / "server.pem", tls / "server.key") if tls else None
    address = deploy.join_address(host, port)
    run_config = output.parent / f"{output.name}-run-config.toml"

    def line(command: list[str]) -> str:
        return " ".join(shlex.quote(part) for part in command)

    if certs is None and not _is_loopback(host):
        console.print(
            f"[bold red]WARNING:[/] these commands run Flower WITHOUT TLS on {host}: anyone on that network can read "
            "every adapter update and impersonate the SuperLink or a SuperNode. For a real deployment make "
            "certificates and node keys (`fgrpo flower certs DIR`, `fgrpo flower keys DIR`) and pass --tls DIR --auth DIR "
            "(docs/deployment.md).",
            highlight=False,
            soft_wrap=True,
        )
    print(f"# 1. SuperLink (server machine){'' if certs else '  — insecure: loopback / trusted network only'}")
    print(line(deploy.superlink_command(port, host=host, tls=certs, supernode_auth=auth is not None)))
    print("\n# 2. where you run `flwr`: a SuperLink connection in Flower's config ($FLWR_HOME/config.toml)")
    connection = ["fgrpo", "flower", "connection", address] + (["--root-cert", str(certs.ca_cert)] if certs else [])
    print(line(connection))
    if auth is not None:
        print("\n# 2b. register each SuperNode's public key (SuperLink started with --enable-supernode-auth)")
        for i in range(n):
            print(line(deploy.register_command(auth / f"supernode{i}.pub")))
    print("\n# 3. one SuperNode per data owner, each on its own machine, pointing at its own data")
    from fgrpo.data.node_spec import owners_named, server_code, server_model_paths, server_paths

    named = server_paths(cfg.tasks) + server_model_paths(cfg.model) + server_code(cfg.tasks)
    named += [key for keys in owners_named(cfg.federation.clients) for key in keys]
    if named:  # a SuperNode refuses them unless its node config allows it (docs/deployment.md)
        print(f"#    the config names {', '.join(named[:3])}: SuperNodes refuse server-chosen files and code; give each "
              "node its own data-path / data-config / model-source / chat-template, or add allow-server-data=true / "
              "allow-server-code=true")
    print("#    each SuperNode keeps a warm worker per run, so the model stays loaded between messages (node config "
          "warm=false: a fresh process per message instead; warm-dir, warm-idle-s: its folder and idle limit; "
          f"docs/deployment.md); {deploy.SUPEREXEC_POLL_ENV}={deploy.SUPEREXEC_POLL_S} makes Flower start each "
          "message sooner")
    for i in range(n):
        node = {"partition-id": i, "num-partitions": n}
        if data:
            node["data-path"] = str(data[i].resolve())
        print(f"{deploy.SUPEREXEC_POLL_ENV}={deploy.SUPEREXEC_POLL_S} " + line(deploy.supernode_command(
            address, node, 9094 + i if host in ("127.0.0.1", "localhost") else 9094,
            root_cert=certs.ca_cert if certs else None,
            auth_private_key=auth / f"supernode{i}" if auth else None,
        )))
    print("\n# 4. the run: the whole fgrpo config travels in the run config; results land in --output")
    print(line(["fgrpo", "flower", "run-config", str(config), "--output", str(output), "--file", str(run_config)]))
    print(line(deploy.flwr_run_command(app_dir, run_config)))
    print(f"fgrpo report {shlex.quote(str(output))}")


@flower.command("run-config")
@friendly_errors
def flower_run_config(
    config: Path = typer.Argument(..., help="TOML config with a [federation] section."),
    output: Path = typer.Option(Path("runs/flower"), "--output", "-o", help="Results directory (made absolute)."),
    file: Path = typer.Option(Path("run-config.toml"), "--file", help="Where to write the file for `flwr run --run-config`."),
    set_values: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Write the run config file for `flwr run . CONNECTION --run-config FILE`."""
    from fgrpo.deploy.flower import write_run_config

    cfg = _load(config, set_values, None)
    path = write_run_config(cfg, output, file)
    console.print(f"wrote {path}; results will land in {output.resolve()}")


@flower.command("connection")
@friendly_errors
def flower_connection(
    address: str = typer.Argument(..., help="SuperLink host:port."),
    name: str = typer.Option("fgrpo-local", help="Connection name for `flwr run . NAME`."),
    root_cert: Optional[Path] = typer.Option(None, help="CA certificate (TLS); without it the connection is insecure."),
):
    """Add a SuperLink connection to Flower's config file ($FLWR_HOME/config.toml)."""
    from fgrpo.deploy.flower import write_connection

    path = write_connection(address, name=name, root_cert=root_cert)
    console.print(f"connection '{name}' → {address} ({'TLS' if root_cert else 'insecure'}) in {path}")


@flower.command("certs")
@friendly_errors
def flower_certs(
    out_dir: Path = typer.Argument(Path("certificates"), help="Folder for ca.crt, server.pem, server.key."),
    host: Optional[list[str]] = typer.Option(None, "--host", help="SuperLink IP or DNS name for the certificate (repeat)."),
    overwrite: bool = typer.Option(False, help=OVERWRITE_FILES_HELP),
):
    """Self-signed CA + SuperLink certificate (for tests and private networks; use your own PKI in production)."""
    from fgrpo.deploy.flower import generate_tls_certificates

    hosts = tuple(host) if host else ("127.0.0.1", "localhost")
    files = generate_tls_certificates(out_dir, hosts, overwrite=overwrite)
    console.print(f"wrote {files.ca_cert}, {files.server_cert}, {files.server_key}")


@flower.command("keys")
@friendly_errors
def flower_keys(
    out_dir: Path = typer.Argument(Path("keys"), help="Folder for supernode<i> / supernode<i>.pub."),
    count: int = typer.Option(2, "--count", "-n", min=1, max=100_000, help="Number of SuperNodes."),
    overwrite: bool = typer.Option(False, help=OVERWRITE_FILES_HELP),
):
    """ECDSA P-384 key pairs for SuperNode authentication (as `ssh-keygen -t ecdsa -b 384`)."""
    from fgrpo.deploy.flower import generate_supernode_keys

    pairs = generate_supernode_keys(out_dir, count, overwrite=overwrite)
    console.print(f"wrote {len(pairs)} key pairs in {out_dir}")


@flower.command("launch")
@friendly_errors
def flower_launch(
    config: Path = typer.Argument(..., help="TOML config with a [federation] section."),
    output: Path = typer.Option(Path("runs/flower"), "--output", "-o", help="Results directory."),
    work_dir: Optional[Path] = typer.Option(None, help="Logs, certificates and Flower's home (default OUTPUT-flower/)."),
    tls: bool = typer.Option(False, help="TLS with a fresh self-signed CA."),
    auth: bool = typer.Option(False, help="SuperNode authentication (implies --tls)."),
    set_values: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    timeout: float = typer.Option(3600, help="Give up after this many seconds."),
    app_dir: Optional[Path] = typer.Option(None, "--app", help="The Flower App folder (default: this checkout's root)."),
):
    """Start a SuperLink and one SuperNode per client on 127.0.0.1, `flwr run` the config, stop them all."""
    from fgrpo.deploy.flower import LocalFederation, flower_app_dir
    from fgrpo.deploy.runtime import node_configs
    from fgrpo.federation.checkpoint import has_checkpoint
    from fgrpo.reporting.results import prepare_run_dir

    cfg = _load(config, set_values, output)
    app = flower_app_dir(app_dir)
    # Refuse a non-empty or foreign results directory before starting anything; the
    # ServerApp then writes into the marked, empty folder.
    directory = prepare_run_dir(output)
    from fgrpo.core.pipeline import resolve_model_source

    resolve_model_source(cfg.model, cfg.tasks)  # build the tiny model's warm start once, not in every ClientApp
    work = work_dir or output.parent / f"{output.name}-flower"
    try:
        with LocalFederation(node_configs(cfg), work, tls=tls, supernode_auth=auth, threads=cfg.runtime.threads) as federation:
            console.print(
                f"SuperLink on {federation.address}, {len(federation.node_configs)} SuperNodes "
                f"({federation.threads} torch thread{'s' if federation.threads != 1 else ''} each, a warm worker per "
                f"node keeping the model between messages); logs in {work}"
            )
            wall = federation.run(cfg, output, app, timeout_s=timeout)
    except BaseException:
        if not has_checkpoint(output):  # the run never started cleanly: leave no half-made folder behind
            directory.abandon()
        raise
    console.print(f"Flower run done in {wall:.0f} s; results in {output}")


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
