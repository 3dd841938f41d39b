"""An in-process Flower Grid: the real ServerApp-side loop and the real ClientApp, one process.

`InProcessGrid` implements `flwr.serverapp.Grid` by handing each pushed
message straight to a `ClientApp` (no Ray, no sockets). Each message makes a
wire round trip through Flower's own object serialisation (deflate → inflate),
so the ClientApp sees exactly what a SuperNode would deliver, cannot alias
the server's objects, and the byte counts in `traffic_log` are real payload
sizes. Each node keeps a persistent `Context` whose `state` survives across
rounds; as on a SuperNode, the ClientApp gets a serialised copy and its
changes are kept only when it succeeds. A ClientApp exception becomes an
error reply (Flower's code and reason format), never a crash of the loop.

With a `WorkerPool` (`fgrpo.federation.workers`), a round's messages run at
once in worker processes instead of one after another here. Each call crosses
the process boundary as the same bytes: the message's deflated objects and
the Context's protobuf. A worker loads the ClientApp by its Flower reference
("module:attribute"), and a worker that dies becomes a CLIENT_APP_CRASHED
error reply for its node, as a SuperNode reports a crashed ClientApp process.
Only a pool enforces `send_and_receive`'s timeout on a stuck ClientApp: a call
past it has its worker killed and gets no reply (as a late node on a real grid);
in this process a late reply can only be dropped once the call returns.
"""

from __future__ import annotations

import importlib
import logging
import random
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any, NamedTuple
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import context_from_proto, context_to_proto
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fgrpo.errors import ConfigError, FederationError
from fgrpo.federation.workers import TIMED_OUT, WORKER_DIED, WorkerPool

logger = logging.getLogger(__name__)

DOWN, UP = "down", "up"


class TrafficEntry(NamedTuple):
    """One message on the wire: (server round, node, "down"/"up", payload bytes, message type)."""

    server_round: int | None
    node_id: int
    direction: str
    num_bytes: int
    message_type: str


def deflate_message(message: Message) -> tuple[str, dict[str, bytes]]:
    """A message as Flower puts it on the wire: (its object id, {object id: deflated bytes}).

    Identical objects (e.g. an array sent twice) appear once, as Flower sends them once.
    """
    objects = get_all_nested_objects(message)
    return message.object_id, {object_id: obj.deflate() for object_id, obj in objects.items()}


def inflate_message(object_id: str, contents: Mapping[str, bytes], message_id: str) -> Message:
    """The message rebuilt from its deflated objects; the message id (not part of them) is restored, as a grid does."""
    rebuilt = inflate_object_from_contents(object_id, dict(contents))
    rebuilt.metadata.__dict__["_message_id"] = message_id
    return rebuilt


def wire_round_trip(message: Message) -> tuple[Message, int]:
    """Serialise a message as Flower does on the wire and rebuild it: (copy, bytes).

    Bytes are the deflated objects of the message (metadata, records, array
    chunks); identical objects are counted once, as Flower sends them once.
    """
    object_id, contents = deflate_message(message)
    return inflate_message(object_id, contents, message.metadata.message_id), sum(len(c) for c in contents.values())


def _server_round(message: Message) -> int | None:
    """The round a message belongs to: its config's "server-round", else a numeric group id."""
    if message.has_content():
        for record in message.content.config_records.values():
            value = record.get("server-round")
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    group = message.metadata.group_id
    return int(group) if group.isdigit() else None


def _copy_context(context: Context) -> Context:
    """A copy of a Context through Flower's own serialisation, as a SuperNode hands it over."""
    return context_from_bytes(context_to_bytes(context))


def context_to_bytes(context: Context) -> bytes:
    return context_to_proto(context).SerializeToString()


def context_from_bytes(blob: bytes) -> Context:
    from flwr.proto.message_pb2 import Context as ProtoContext  # noqa: PLC0415

    proto = ProtoContext()
    proto.ParseFromString(blob)
    return context_from_proto(proto)


def _error_reply(message: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=message)


@lru_cache(maxsize=8)
def load_client_app(reference: str) -> ClientApp:
    """The ClientApp at a Flower reference "module:attribute" (e.g. "fgrpo.federation.clientapp:client_app")."""
    module_name, _, attribute = reference.partition(":")
    try:
        app = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"ClientApp reference '{reference}': expected 'module:attribute' of an importable ClientApp ({error})") from error
    if not isinstance(app, ClientApp):
        raise ConfigError(f"ClientApp reference '{reference}' is a {type(app).__name__}, not a flwr ClientApp")
    return app


class ClientCall(NamedTuple):
    """One ClientApp call as it crosses a process boundary: plain bytes and ids."""

    app: str  # a Flower reference "module:attribute" (worker processes), or "" for this process's app
    message_id: str
    object_id: str
    contents: dict[str, bytes]  # the message's deflated objects
    delivered_at: str
    context: bytes  # the node's Context (Flower protobuf)
    run_id: int


class CallResult(NamedTuple):
    """The reply's deflated objects; the node's new Context only when the ClientApp succeeded; its compute time."""

    object_id: str
    contents: dict[str, bytes]
    context: bytes | None
    seconds: float


def execute_call(app: ClientApp, call: ClientCall) -> CallResult:
    """Run the ClientApp on one call, in whichever process holds `app`; an exception becomes an error reply."""
    started = time.perf_counter()
    message = inflate_message(call.object_id, call.contents, call.message_id)
    message.metadata.delivered_at = call.delivered_at
    context = context_from_bytes(call.context)
    node_id = message.metadata.dst_node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, call.run_id, node_id
    try:
        reply = app(message, context)
        if not isinstance(reply, Message):
            raise TypeError(f"ClientApp returned {type(reply).__name__}, expected a Message")
        if reply.metadata.reply_to_message_id != message.metadata.message_id:
            raise ValueError("ClientApp's reply is not a reply to the message it got; use Message(content, reply_to=msg)")
        object_id, contents = deflate_message(reply)
        kept: bytes | None = context_to_bytes(context)  # as on a SuperNode: kept only when the ClientApp succeeds
    except (Exception, SystemExit) as error:  # noqa: BLE001 - every ClientApp failure (even sys.exit) becomes an error reply
        reason = f"{type(error)}:<'{error}'>"
        # The reason travels in the error reply and the server reports it once for all nodes
        # (`server.summarize_failures`): one traceback per node would bury it (400 for 200 clients).
        logger.debug("ClientApp on node %d (%s) raised: %s\n%s", node_id, message.metadata.message_type, reason, traceback.format_exc())
        object_id, contents = deflate_message(_error_reply(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason))
        kept = None
    finally:
        TaskIdentity.node_id = SUPERLINK_NODE_ID
    return CallResult(object_id, contents, kept, time.perf_counter() - started)


def run_call(call: ClientCall) -> CallResult:
    """`execute_call` in a worker process, with the ClientApp loaded (once) from the call's reference."""
    return execute_call(load_client_app(call.app), call)


class InProcessGrid(Grid):
    """A Grid whose nodes run `client_app` in this process, or at once in the workers of a `WorkerPool`.

    Parameters
    ----------
    client_app : the `flwr.clientapp.ClientApp` every node runs, or its Flower reference
        "module:attribute" (required with `pool`: workers import the app by reference).
    node_configs : one dict per node (e.g. {"partition-id": 0}); it becomes that
        node's `context.node_config` as given.
    run_config : the `context.run_config` every node sees (default {}).
    run_id : the run id (default: random); also set as Flower's task identity
        so that strategies can construct `Message`s in this process.
    seed : seeds the node ids (random 63-bit ints, like a SuperLink's, so that
        code cannot confuse them with partition ids).
    on_message : optional callable (node_id, reply) called after each reply,
        e.g. to advance a progress bar.
    pool : optional worker processes that run a push's messages at once (the
        caller owns and closes it; one pool may serve several grids in turn).
    """

    def __init__(
        self,
        client_app: ClientApp | str,
        node_configs: Sequence[Mapping[str, Any]],
        *,
        run_config: Mapping[str, Any] | None = None,
        run_id: int | None = None,
        seed: int = 0,
        on_message: Callable[[int, Message], None] | None = None,
        pool: WorkerPool | None = None,
    ) -> None:
        if not node_configs:
            raise FederationError("InProcessGrid needs at least one node config")
        if pool is not None and not isinstance(client_app, str):
            raise FederationError("an InProcessGrid with a worker pool needs the ClientApp's reference 'module:attribute'")
        rng = random.Random(seed)
        self.app_reference = client_app if isinstance(client_app, str) else ""
        self.client_app = load_client_app(client_app) if isinstance(client_app, str) and pool is None else client_app
        self.pool = pool
        self.on_message = on_message
        self._run = Run.create_empty(run_id if run_id is not None else rng.getrandbits(63))
        self._run.override_config = dict(run_config or {})
        self._node_ids: list[int] = []
        while len(self._node_ids) < len(node_configs):
            node_id = rng.getrandbits(63)
            if node_id > SUPERLINK_NODE_ID and node_id not in self._node_ids:
                self._node_ids.append(node_id)
        self.contexts: dict[int, Context] = {
            node_id: Context(
                run_id=self._run.run_id,
                node_id=node_id,
                node_config=dict(config),
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for node_id, config in zip(self._node_ids, node_configs)
        }
        for context in self.contexts.values():
            try:
                _copy_context(context)
            except Exception as error:  # noqa: BLE001 - protobuf raises several types
                raise ConfigError(
                    f"node config {context.node_config} / run config keys {sorted(context.run_config)}: "
                    f"values must be bool, int, float or str ({error})"
                ) from error
        self._replies: dict[str, Message] = {}
        self._seconds: dict[str, float] = {}  # message id -> its node's compute time (for send_and_receive's timeout)
        self.traffic_log: list[TrafficEntry] = []
        self.late_replies = 0
        self.wire_seconds = 0.0  # time spent serialising messages and contexts (what the wire costs in-process)
        self._set_task_identity()

    # ------------------------------------------------------------------ Grid API

    def set_run(self, run: Run) -> None:
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run
        for context in self.contexts.values():
            context.run_id = run.run_id
        self._set_task_identity()

    @property
    def run(self) -> Run:
        return Run(**vars(self._run))

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver the messages to their nodes' ClientApps now (at once with a pool); keep the replies for `pull_messages`."""
        return self._push(messages, timeout=None)

    def _push(self, messages: Iterable[Message], timeout: float | None) -> list[str]:
        messages = list(messages)
        for message in messages:
            if message.metadata.reply_to_message_id or message.metadata.ttl <= 0:
                raise FederationError(f"cannot push a reply or an expired message: {message.metadata}")
            message.metadata.__dict__["_message_id"] = str(uuid4())
        self._deliver(messages, timeout)
        return [message.metadata.message_id for message in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to these message ids (each is returned once)."""
        return [self._replies.pop(mid) for mid in message_ids if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push and pull. On a real grid nodes run at once, and here they may wait for a free worker:
        so a reply is dropped (as Flower drops a late one) when *its own node's* ClientApp took longer than `timeout`.
        With a pool, a ClientApp still running at `timeout` is stopped there (its worker is killed).
        """
        replies = []
        for message_id in self._push(messages, timeout):
            if timeout is not None and self._seconds.pop(message_id, 0.0) > timeout:
                self._replies.pop(message_id, None)
                self.late_replies += 1
                continue
            replies.extend(self.pull_messages([message_id]))
        return replies

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[int, bytes]:
        """Each node's persistent Context (its `state` survives across rounds), serialised by Flower."""
        return {node_id: context_to_bytes(ctx) for node_id, ctx in self.contexts.items()}

    def load_state_dict(self, state: Mapping[int, bytes]) -> None:
        if set(state) != set(self.contexts):
            raise FederationError("checkpoint's in-process nodes do not match this grid's nodes (different seed or clients)")
        for node_id, blob in state.items():
            self.contexts[node_id] = context_from_bytes(blob)

    # ------------------------------------------------------------------ helpers

    def bytes_total(self, direction: str, server_round: int | None = None) -> int:
        """Payload bytes sent in one direction ("down" / "up"), optionally in one round."""
        return sum(
            e.num_bytes
            for e in self.traffic_log
            if e.direction == direction and (server_round is None or e.server_round == server_round)
        )

    def _set_task_identity(self) -> None:
        # `Message(...)` reads the sender's identity from this process-wide
        # class; Flower's own in-process entry points set it the same way.
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = self._run.run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    def _deliver(self, messages: list[Message], timeout: float | None = None) -> None:
        """Run each message's ClientApp (in this process, or at once in the pool, stopped at `timeout`) and keep its reply."""
        calls: dict[int, ClientCall] = {}
        for index, message in enumerate(messages):
            if message.metadata.dst_node_id in self.contexts:
                calls[index] = self._prepare(message)
            else:
                reply = _error_reply(message, ErrorCode.NODE_UNAVAILABLE, f"no node with id {message.metadata.dst_node_id} in this grid")
                self._keep(message, reply, 0.0)
        indices = list(calls)
        if self.pool is None:
            for index in indices:
                self._finish(messages[index], execute_call(self.client_app, calls[index]))
        else:
            done = lambda position, result: self._finish(messages[indices[position]], result)  # noqa: E731
            self.pool.run(run_call, [calls[index] for index in indices], on_done=done, timeout_s=timeout)

    def _prepare(self, message: Message) -> ClientCall:
        """The call a node gets: the message as on the wire (its bytes logged) and a copy of the node's Context."""
        node_id = message.metadata.dst_node_id
        wire_start = time.perf_counter()
        object_id, contents = deflate_message(message)
        self.traffic_log.append(
            TrafficEntry(_server_round(message), node_id, DOWN, sum(len(c) for c in contents.values()), message.metadata.message_type)
        )
        call = ClientCall(
            self.app_reference,
            message.metadata.message_id,
            object_id,
            contents,
            str(time.time()),
            context_to_bytes(self.contexts[node_id]),
            self._run.run_id,
        )
        self.wire_seconds += time.perf_counter() - wire_start
        return call

    def _finish(self, message: Message, result: CallResult | Any) -> None:
        """The reply off the wire (its bytes logged); the node's Context replaced only when its ClientApp succeeded."""
        node_id = message.metadata.dst_node_id
        if result is TIMED_OUT:  # no reply, as from a node that did not answer in time
            logger.debug("node %d (%s): stopped at the round's timeout", node_id, message.metadata.message_type)
            self.late_replies += 1
            return
        wire_start = time.perf_counter()
        if result is WORKER_DIED:
            reason = "the worker process running this node's ClientApp died (killed, out of memory or exited)"
            logger.debug("node %d (%s): %s", node_id, message.metadata.message_type, reason)
            object_id, contents = deflate_message(_error_reply(message, ErrorCode.CLIENT_APP_CRASHED, reason))
            result = CallResult(object_id, contents, None, 0.0)
        reply = inflate_message(result.object_id, result.contents, "")
        if result.context is not None:
            self.contexts[node_id] = context_from_bytes(result.context)
        self.wire_seconds += time.perf_counter() - wire_start
        self.traffic_log.append(
            TrafficEntry(
                _server_round(message), node_id, UP, sum(len(c) for c in result.contents.values()), message.metadata.message_type
            )
        )
        self._keep(message, reply, result.seconds)

    def _keep(self, message: Message, reply: Message, seconds: float) -> None:
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        self._replies[message.metadata.message_id] = reply
        self._seconds[message.metadata.message_id] = seconds
        if self.on_message is not None:
            self.on_message(message.metadata.dst_node_id, reply)
