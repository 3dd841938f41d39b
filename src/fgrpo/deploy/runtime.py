"""Run modes: one federated experiment in-process (the default), and comparisons of methods × seeds.

The in-process runtime hands the very ClientApp and federation loop that run
on Flower to an in-process Grid: no Ray, no sockets. A round's clients run at
once in `runtime.workers` worker processes (each with its own model), or one
after another in this process when there is one worker; every process gets
`runtime.threads` torch threads, so that workers × threads ≤ cores.

One worker still runs its clients in a worker process when the run has a
round timeout or user reward code (`isolates_clients`): only ending a process
stops a client stuck in user code, and code that ends its own process
(`os._exit`, a crash) then costs one client's reply, not the run.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from fgrpo.config import Config, ModelConfig, dump_config
from fgrpo.errors import ConfigError
from fgrpo.reporting.noise import quiet_flower_logs
from fgrpo.reporting.results import run_directory

# The ClientApp by its Flower reference (as in pyproject.toml's [tool.flwr.app.components]): workers import it.
CLIENT_APP = "fgrpo.federation.clientapp:client_app"


def node_configs(config: Config) -> list[dict]:
    """One node per client (a single node holding the pooled data for centralized).

    These nodes run on the user's own machine with the user's own config, so
    they read the files and import the reward code it names (a real
    SuperNode does only when its own --node-config says so).
    """
    own = {"allow-server-data": True, "allow-server-code": True}
    if config.federation.method == "centralized":
        return [{"partition-id": 0, "num-partitions": 1, **own}]
    n = config.federation.num_clients
    return [{"partition-id": i, "num-partitions": n, **own} for i in range(n)]


def uses_gpu(model: ModelConfig) -> bool:
    """Whether the policy trains on an accelerator (then CPU cores do not decide how many clients run at once)."""
    if model.device == "cpu":
        return False
    if model.device != "auto":
        return True
    import torch

    return torch.cuda.is_available()


def isolates_clients(config: Config) -> bool:
    """Whether clients run in worker processes even with one worker: a round timeout (a stuck client is stopped by
    ending its process) or reward code the user names ('module:function', which could end or hang this process)."""
    from fgrpo.data.node_spec import owners_named, server_code

    return config.federation.round_timeout_s is not None or bool(server_code(config.tasks) or owners_named(config.federation.clients)[1])


def execution_plan(config: Config) -> tuple[int, int]:
    """(worker processes, torch threads each) for an in-process run of `config`: workers × threads ≤ cores.

    "auto" workers: min(cores, the clients a round reaches), 1 on a GPU (each worker
    would hold its own copy of the model there; Ray's fractional GPUs share one).
    """
    from fgrpo.core.threads import auto_threads, available_cores, resolve_workers

    cores, nodes = available_cores(), len(node_configs(config))
    runtime = config.runtime
    if runtime.workers == "auto" and uses_gpu(config.model):
        workers = 1
    else:
        workers = min(nodes, resolve_workers(runtime.workers, nodes, cores))
    return workers, auto_threads(workers, runtime.threads, cores)


@contextlib.contextmanager
def torch_threads(threads: int):
    """This process runs with `threads` torch threads for the block, then as before."""
    import torch

    from fgrpo.core.threads import apply_threads

    before = torch.get_num_threads()
    apply_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_simulation(
    config: Config, *, overwrite: bool = False, progress: bool = True, resume: bool = False, pool=None
) -> dict:
    """Run one federated experiment in this process (or continue it from its checkpoint); returns the summary.

    The method runs with its `[tuned.<method>]` values (`fgrpo tune --write`), as in a comparison.

    With more than one worker (`execution_plan`), the clients run in worker processes:
    `pool` (a `WorkerPool` the caller owns, e.g. shared by a comparison's runs) or a
    pool started for this run and stopped at its end.
    """
    quiet_flower_logs()
    from fgrpo.config import apply_tuned
    from fgrpo.core.pipeline import resolve_model_source
    from fgrpo.federation.inprocess import InProcessGrid
    from fgrpo.federation.server import run_federation
    from fgrpo.federation.wire import CONFIG_KEY
    from fgrpo.federation.workers import WorkerPool

    config = apply_tuned(config, config.federation.method)  # the method's `fgrpo tune` values, as `compare` runs it
    if config.runtime.backend == "ray":
        from fgrpo.deploy.ray_runtime import require_ray, run_on_ray

        require_ray()  # before the warm start: a missing extra is said at once
        resolve_model_source(config.model, config.tasks)
        return run_on_ray(config, node_configs(config), overwrite=overwrite, progress=progress, resume=resume)
    workers, threads = execution_plan(config)
    # The tiny model's warm start is built (and cached) here, once, not by every worker at the same time.
    resolve_model_source(config.model, config.tasks)
    run_config = {CONFIG_KEY: dump_config(config)}
    with contextlib.ExitStack() as stack:
        if workers == 1 and not isolates_clients(config):
            pool = None
            stack.enter_context(torch_threads(threads))
        elif pool is None:
            pool = stack.enter_context(WorkerPool(workers, threads, warm_up, (run_config[CONFIG_KEY],)))
        grid = InProcessGrid(CLIENT_APP, node_configs(config), run_config=run_config, pool=pool)
        return run_federation(grid, config, Path(config.output.dir), progress=progress, overwrite=overwrite, resume=resume)


def warm_up(config_text: str) -> None:
    """Runs first in each worker: load the ClientApp and the run's policy, so that a client's time (what
    `round_timeout_s` measures) starts with its work, not with a fresh worker's imports and model load.

    Best effort: what fails here fails again in the client's call, where its error reaches the server.
    """
    try:
        from fgrpo.federation.clientapp import warm_up_learner

        warm_up_learner(config_text)
    except Exception:  # noqa: BLE001 - see the docstring
        pass


@contextlib.contextmanager
def shared_pools():
    """`pool_for(config)`: worker pools shared by several runs (a comparison's cells, a tuning's trials).

    One pool per (workers, threads), started when a run first needs it and stopped at the end,
    so that workers start once, not once per run; None for a run without workers.
    """
    from fgrpo.federation.workers import WorkerPool

    pools: dict[tuple[int, int], WorkerPool] = {}
    with contextlib.ExitStack() as stack:

        def pool_for(config: Config):
            plan = execution_plan(config)
            if config.runtime.backend != "inprocess" or (plan[0] == 1 and not isolates_clients(config)):
                return None
            if plan not in pools:
                pools[plan] = stack.enter_context(WorkerPool(*plan, warm_up, (dump_config(config),)))
            return pools[plan]

        yield pool_for


def with_method(config: Config, method: str, seed: int, output_dir: Path) -> Config:
    """A copy of `config` for one cell of a comparison, with the method's tuned values (`fgrpo tune`) applied."""
    from fgrpo.config import apply_tuned

    data = config.model_dump()
    data["federation"]["method"] = method
    data["training"]["seed"] = seed
    data["output"]["dir"] = str(output_dir)
    return apply_tuned(Config.model_validate(data), method)


def run_comparison(
    config: Config, methods: list[str], seeds: list[int], out_dir: Path, *, overwrite: bool = False, progress: bool = True
) -> list[dict]:
    """The same scenario under each method and seed: out_dir/<method>/seed<k>/."""
    from fgrpo.registry import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    # An earlier comparison in out_dir is replaced whole (no stale method rows),
    # and only once the first cell of this one has finished.
    with run_directory(out_dir, overwrite=overwrite, kind="comparison") as directory, shared_pools() as pool_for:
        (directory.path / "compare.json").write_text(
            json.dumps({"methods": methods, "seeds": seeds, "scenario": config.output.dir}, indent=2)
        )
        summaries = []
        for method in methods:
            for seed in seeds:
                cell = with_method(config, method, seed, directory.path / method / f"seed{seed}")
                summaries.append(run_simulation(cell, progress=progress, pool=pool_for(cell)))
                directory.commit()
    return summaries
