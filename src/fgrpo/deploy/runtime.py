"""Run modes: one federated experiment in-process (the default), and comparisons of methods × seeds.

The in-process runtime hands the very ClientApp and federation loop that run
on Flower to an in-process Grid: no Ray, no sockets, one model in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

from fgrpo.config import Config, dump_config
from fgrpo.errors import ConfigError
from fgrpo.reporting.noise import quiet_flower_logs
from fgrpo.reporting.results import run_directory


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


def run_simulation(config: Config, *, overwrite: bool = False, progress: bool = True, resume: bool = False) -> dict:
    """Run one federated experiment in this process (or continue it from its checkpoint); returns the summary."""
    quiet_flower_logs()
    from fgrpo.federation.clientapp import client_app
    from fgrpo.federation.wire import CONFIG_KEY
    from fgrpo.federation.inprocess import InProcessGrid
    from fgrpo.federation.server import run_federation

    run_config = {CONFIG_KEY: dump_config(config)}
    grid = InProcessGrid(client_app, node_configs(config), run_config=run_config)
    return run_federation(grid, config, Path(config.output.dir), progress=progress, overwrite=overwrite, resume=resume)


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
    with run_directory(out_dir, overwrite=overwrite, kind="comparison") as directory:
        (directory.path / "compare.json").write_text(
            json.dumps({"methods": methods, "seeds": seeds, "scenario": config.output.dir}, indent=2)
        )
        summaries = []
        for method in methods:
            for seed in seeds:
                cell = with_method(config, method, seed, directory.path / method / f"seed{seed}")
                summaries.append(run_simulation(cell, progress=progress))
                directory.commit()
    return summaries
