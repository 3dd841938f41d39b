"""The ClientApp a SuperNode loads for every message (pyproject's [tool.flwr.app.components]): it forwards the
message to the node's warm worker, or runs fgrpo's ClientApp here when the node says `warm=false`.

Why a second ClientApp: Flower starts a fresh process per message, and `fgrpo.federation.clientapp` imports
torch and loads the model at its first use. This module imports neither (nor does `handoff`), so a forwarding
process costs Flower's own start-up and the hand-off only; the work runs in a process that already has the
model (`fgrpo.federation.warm_node`). With `warm=false` the real ClientApp is imported here and runs as it
always did: one process per message, nothing left running.

The in-process runtime and the Ray runtime run `fgrpo.federation.clientapp` directly: their processes live
for the whole run already.
"""

from __future__ import annotations

import importlib

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fgrpo.federation import handoff

COLD_APP = "fgrpo.federation.clientapp"  # imported only when the node runs without a warm worker


def handle(message: Message, context: Context) -> Message:
    """One message: to the warm worker (default), or to fgrpo's ClientApp in this process (`warm=false`)."""
    if handoff.warm_enabled(context.node_config):
        return handoff.forward(message, context)
    return importlib.import_module(COLD_APP).client_app(message, context)


client_app = ClientApp()
client_app.train()(handle)
client_app.evaluate()(handle)
client_app.query()(handle)
