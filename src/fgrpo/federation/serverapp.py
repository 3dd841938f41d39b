"""The Flower ServerApp: the round loop on a SuperLink's grid. It holds no model.

This module and everything it imports stay free of torch and transformers
(an import-linter contract and `tests/federation/test_model_free_server.py`
check it): the ServerApp process needs arrays, not the LLM.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fgrpo.errors import FederationError
from fgrpo.federation import wire
from fgrpo.federation.server import run_federation

NODE_WAIT_S = 300.0


def wait_for_nodes(grid, count: int, timeout_s: float = NODE_WAIT_S, poll_s: float = 1.0) -> list[int]:
    """Block until `count` nodes are connected (a real SuperLink's nodes join over time)."""
    deadline = time.monotonic() + timeout_s
    while True:
        node_ids = list(grid.get_node_ids())
        if len(node_ids) >= count:
            return node_ids
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(node_ids)} of {count} SuperNodes connected after {timeout_s:.0f} s; "
                "start one SuperNode per client (see `fgrpo flower commands`)"
            )
        time.sleep(poll_s)


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """Flower deployment entry point: the same federation loop as the in-process runtime."""
    config = wire.config_from_context(context)
    run_dir = Path(str(context.run_config.get(wire.RUN_DIR_KEY, "")) or config.output.dir)
    wait_for_nodes(grid, 1 if config.federation.method == "centralized" else config.federation.num_clients)
    # `flwr run ... --run-config 'resume=true'` continues a crashed deployment run from its checkpoint.
    run_federation(grid, config, run_dir, progress=False, resume=bool(context.run_config.get(wire.RESUME_KEY, False)))
