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


class PromptGrid(Grid):
    """A SuperLink's grid whose `send_and_receive` looks for replies every `poll_s` seconds, not every 3.

    flwr 1.42's grid (`flwr/superlink/grid/http_grid.py`) pushes the messages and then pulls replies with a
    3-second sleep between tries, so every round trip ends up to 3 s after its last reply came in: with a warm
    model on each node, that sleep was a large part of a Flower round. This is the same loop (push once, pull
    until every reply is in or `timeout` has passed) with a shorter sleep; everything else is the grid's own.
    A pull is one small request to the SuperLink.
    """

    def __init__(self, grid: Grid, poll_s: float = 0.1) -> None:
        self.inner, self.poll_s = grid, poll_s

    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, *args, **kwargs):
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self):
        return self.inner.get_node_ids()

    def push_messages(self, messages):
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids):
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list:
        waiting = set(self.inner.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            pulled = list(self.inner.pull_messages(waiting))
            replies += pulled
            waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
            if waiting:
                time.sleep(self.poll_s if deadline is None else max(0.0, min(self.poll_s, deadline - time.monotonic())))
        return replies

    def __getattr__(self, name: str):  # anything else a caller asks of the grid (e.g. its connection)
        if name == "inner":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """Flower deployment entry point: the same federation loop as the in-process runtime."""
    grid = PromptGrid(grid)
    config = wire.config_from_context(context)
    run_dir = Path(str(context.run_config.get(wire.RUN_DIR_KEY, "")) or config.output.dir)
    wait_for_nodes(grid, 1 if config.federation.method == "centralized" else config.federation.num_clients)
    # `flwr run ... --run-config 'resume=true'` continues a crashed deployment run from its checkpoint.
    run_federation(grid, config, run_dir, progress=False, resume=bool(context.run_config.get(wire.RESUME_KEY, False)))
