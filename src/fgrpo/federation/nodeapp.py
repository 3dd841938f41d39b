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
import logging

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fgrpo.errors import FgrpoError, as_public
from fgrpo.federation import handoff

COLD_APP = "fgrpo.federation.clientapp"  # imported only when the node runs without a warm worker

logger = logging.getLogger(__name__)


def handle(message: Message, context: Context) -> Message:
    """One message: to the warm worker (default), or to fgrpo's ClientApp in this process (`warm=false`)."""
    try:
        warm = handoff.warm_enabled(context.node_config)
        if warm:
            return handoff.forward(message, context)
    except Exception as error:  # noqa: BLE001 - re-raised in the form that may leave the node
        raise public_error(error) from None
    return importlib.import_module(COLD_APP).client_app(message, context)


def public_error(error: Exception) -> FgrpoError:
    """The hand-off's error as the server may see it: Flower sends a ClientApp's exception text to the server, and
    the full text (a worker's log path, a socket error) names the node's folders. The node's log keeps it.

    The same rule as `clientapp.private_errors_mod`, which the worker's own errors have already passed.
    """
    if isinstance(error, FgrpoError) and not error.public:
        return error
    public = error.public if isinstance(error, FgrpoError) else (
        f"{type(error).__name__} in this node's hand-off to its warm worker (the details stay in the node's log)")
    logger.warning("this node's hand-off failed (the server is told only: %s): %s: %s", public, type(error).__name__, error)
    return as_public(error, public)


client_app = ClientApp()
client_app.train()(handle)
client_app.evaluate()(handle)
client_app.query()(handle)
