"""`runtime.backend = "ray"`: the same ServerApp loop and ClientApp on Flower's simulation engine (Ray actors).

Why a second runtime: Flower's simulation engine places client actors by
resources (`client_resources` num_cpus / num_gpus), which is how a GPU is
shared between clients (num_gpus = 0.25: four clients per GPU) and how a run
spreads over a Ray cluster. The in-process runtime stays the embedded default
(no Ray to install or start).

`flwr.simulation.run_simulation` (flwr 1.42) hands every node and the
ServerApp an empty run config, and gives the nodes the node config
{partition-id, num-partitions}. So the ServerApp here is the federation loop
with this run's config, and the ClientApp is fgrpo's own, reached through a
thin forwarding app that puts the config into each node's run config (as a
SuperLink would) and marks the node as the user's own (it may read the files
and reward code the config names, as in-process nodes do). Each actor takes
its thread budget before its first call, so actors × threads ≤ cores.

With `federation.round_timeout_s`, the server stops waiting for a late client,
but flwr 1.42's simulation engine waits for every actor's call before it ends:
a client stuck in user code (a reward that sleeps) would hang the run at its
end. So an actor ends itself when a call outlives the server's wait for it
(`call_limit`); Flower then reports that call, and later calls routed to that
actor, as failed (it does not replace a dead actor; see docs/deployment.md).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from typing import Any

from fgrpo.config import Config, dump_config
from fgrpo.core.threads import auto_threads, available_cores, thread_env
from fgrpo.errors import ConfigError, FederationError

INSTALL_HINT = "pip install 'fgrpo[ray]'"


def require_ray() -> None:
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(f"runtime.backend = 'ray' (--runtime ray) needs Ray, which is not installed: {INSTALL_HINT}")


def concurrent_actors(num_cpus_per_client: float, nodes: int, cores: int) -> int:
    """How many client actors Ray runs at once on this machine's CPUs: min(nodes, cores // num_cpus)."""
    return max(1, min(nodes, int(cores // num_cpus_per_client)))


def actor_threads(config: Config, nodes: int, cores: int | None = None) -> int:
    """Torch threads of each client actor: the thread policy over the actors that run at once."""
    cores = available_cores() if cores is None else cores
    actors = concurrent_actors(config.runtime.num_cpus_per_client, nodes, cores)
    return auto_threads(actors, config.runtime.threads, cores)


def backend_config(config: Config, cores: int | None = None) -> dict[str, Any]:
    """Flower's backend_config: each client actor's resources, and a quiet local Ray."""
    cores = available_cores() if cores is None else cores
    return {
        "client_resources": {
            "num_cpus": config.runtime.num_cpus_per_client,
            "num_gpus": config.runtime.num_gpus_per_client,
        },
        "init_args": {"num_cpus": cores, "include_dashboard": False},
    }


def call_limit(message_type: str, round_timeout_s: float | None) -> float | None:
    """How long the server waits for a reply of this type (None: for ever): the init query gets longer, as there a
    node loads its model (`server.INIT_TIMEOUT_S`); train and evaluate calls get the round timeout."""
    from flwr.app import MessageType

    from fgrpo.federation.server import INIT_TIMEOUT_S

    if round_timeout_s is None:
        return None
    return max(round_timeout_s, INIT_TIMEOUT_S) if message_type == MessageType.QUERY else round_timeout_s


def end_process_after(seconds: float | None) -> threading.Event:
    """Exit this process (a Ray actor) unless the returned event is set within `seconds`: only ending the process
    stops a call stuck in user code."""
    finished = threading.Event()
    if seconds is not None:

        def watch() -> None:
            if not finished.wait(seconds):
                os._exit(1)

        threading.Thread(target=watch, name="fgrpo-call-limit", daemon=True).start()
    return finished


def forwarding_client_app(
    client_app_reference: str,
    run_config: dict[str, Any],
    node_extra: dict[str, Any],
    threads: int,
    round_timeout_s: float | None = None,
):
    """A ClientApp that gives each call this run's config and the node's extra config, then runs the real app;
    a call that outlives the server's wait for it (`call_limit`) ends the actor.

    The real app is imported by reference inside the actor (the wrapper Ray ships holds text only).
    """
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def forward(msg: Message, context: Context) -> Message:
        os.environ.update(thread_env(threads))  # the actor's budget, read at the real app's first use (`clientapp`)
        from fgrpo.federation.inprocess import load_client_app

        # Flower's Context keeps its run config read-only: the real app gets a Context of its own
        # that shares this one's state (so what it keeps there survives the round, as on a SuperNode).
        seen = Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config={**context.node_config, **node_extra},
            state=context.state,
            run_config={**context.run_config, **run_config},
        )
        finished = end_process_after(call_limit(msg.metadata.message_type, round_timeout_s))
        try:
            return load_client_app(client_app_reference)(msg, seen)
        finally:
            finished.set()

    app.train()(forward)
    app.evaluate()(forward)
    app.query()(forward)
    return app


def run_on_ray(
    config: Config,
    nodes: list[dict[str, Any]],
    *,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
    client_app: str = "fgrpo.federation.clientapp:client_app",
) -> dict:
    """One federated experiment on Flower's simulation engine; returns the summary (as `run_simulation`).

    `nodes`: the in-process runtime's node configs (`deploy.runtime.node_configs`); Ray numbers
    the nodes itself (partition-id, num-partitions), the rest of theirs is added to each node.
    """
    require_ray()
    from pathlib import Path

    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fgrpo.federation.server import run_federation
    from fgrpo.federation.serverapp import wait_for_nodes
    from fgrpo.federation.wire import CONFIG_KEY

    summaries: list[dict] = []
    errors: list[BaseException] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            wait_for_nodes(grid, len(nodes))  # Flower starts the ServerApp before it registers the nodes
            summaries.append(run_federation(grid, config, Path(config.output.dir), progress=progress, overwrite=overwrite, resume=resume))
        except BaseException as error:  # noqa: BLE001 - reported to the caller below, not lost in Flower's thread
            errors.append(error)

    own_node = {key: value for key, value in nodes[0].items() if key not in ("partition-id", "num-partitions")}
    threads = actor_threads(config, len(nodes))
    run_simulation(
        server_app=server_app,
        client_app=forwarding_client_app(
            client_app, {CONFIG_KEY: dump_config(config)}, own_node, threads, config.federation.round_timeout_s
        ),
        num_supernodes=len(nodes),
        backend_name="ray",
        backend_config=backend_config(config),
    )
    if errors:
        raise errors[0]
    if not summaries:
        raise FederationError("the Ray simulation ended without finishing the run; Flower's log above says why")
    return summaries[0]
