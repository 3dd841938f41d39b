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
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
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

logger = logging.getLogger(__name__)

DOWN, UP = "down", "up"


class TrafficEntry(NamedTuple):
    """One message on the wire: (server round, node, "down"/"up", payload bytes, message type)."""

    server_round: int | None
    node_id: int
    direction: str
    num_bytes: int
    message_type: str


def wire_round_trip(message: Message) -> tuple[Message, int]:
    """Serialise a message as Flower does on the wire and rebuild it: (copy, bytes).

    Bytes are the deflated objects of the message (metadata, records, array
    chunks); identical objects are counted once, as Flower sends them once.
    """
    objects = get_all_nested_objects(message)
    contents = {object_id: obj.deflate() for object_id, obj in objects.items()}
    num_bytes = sum(len(c) for c in contents.values())
    rebuilt = inflate_object_from_contents(message.object_id, contents)
    # The message id is not part of the serialised object; a real grid restores it too.
    rebuilt.metadata.__dict__["_message_id"] = message.metadata.message_id
    return rebuilt, num_bytes


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
    return context_from_proto(context_to_proto(context))


def _error_reply(message: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=message)


class InProcessGrid(Grid):
    """A Grid whose nodes run `client_app` synchronously in this process.

    Parameters
    ----------
    client_app : the `flwr.clientapp.ClientApp` every node runs.
    node_configs : one dict per node (e.g. {"partition-id": 0}); it becomes that
        node's `context.node_config` as given.
    run_config : the `context.run_config` every node sees (default {}).
    run_id : the run id (default: random); also set as Flower's task identity
        so that strategies can construct `Message`s in this process.
    seed : seeds the node ids (random 63-bit ints, like a SuperLink's, so that
        code cannot confuse them with partition ids).
    on_message : optional callable (node_id, reply) called after each reply,
        e.g. to advance a progress bar.
    """

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: Sequence[Mapping[str, Any]],
        *,
        run_config: Mapping[str, Any] | None = None,
        run_id: int | None = None,
        seed: int = 0,
        on_message: Callable[[int, Message], None] | None = None,
    ) -> None:
        if not node_configs:
            raise FederationError("InProcessGrid needs at least one node config")
        rng = random.Random(seed)
        self.client_app = client_app
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
        """Deliver each message to its node's ClientApp now; keep the reply for `pull_messages`."""
        message_ids = []
        for message in messages:
            if message.metadata.reply_to_message_id or message.metadata.ttl <= 0:
                raise FederationError(f"cannot push a reply or an expired message: {message.metadata}")
            message.metadata.__dict__["_message_id"] = str(uuid4())
            reply = self._deliver(message)
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            self._replies[message.metadata.message_id] = reply
            message_ids.append(message.metadata.message_id)
            if self.on_message is not None:
                self.on_message(message.metadata.dst_node_id, reply)
        return message_ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to these message ids (each is returned once)."""
        return [self._replies.pop(mid) for mid in message_ids if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push and pull. Nodes run one after another here, but on a real grid they run at once:
        so a reply is dropped (as Flower drops a late one) when *its own node* took longer than `timeout`.
        """
        replies = []
        for message in messages:
            started = time.perf_counter()
            reply = self.pull_messages(self.push_messages([message]))
            if timeout is not None and time.perf_counter() - started > timeout:
                self.late_replies += 1
                continue
            replies.extend(reply)
        return replies

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[int, bytes]:
        """Each node's persistent Context (its `state` survives across rounds), serialised by Flower."""
        return {node_id: context_to_proto(ctx).SerializeToString() for node_id, ctx in self.contexts.items()}

    def load_state_dict(self, state: Mapping[int, bytes]) -> None:
        from flwr.proto.message_pb2 import Context as ProtoContext  # noqa: PLC0415

        if set(state) != set(self.contexts):
            raise FederationError("checkpoint's in-process nodes do not match this grid's nodes (different seed or clients)")
        for node_id, blob in state.items():
            proto = ProtoContext()
            proto.ParseFromString(blob)
            self.contexts[node_id] = context_from_proto(proto)

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

    def _deliver(self, message: Message) -> Message:
        node_id = message.metadata.dst_node_id
        server_round = _server_round(message)
        message_type = message.metadata.message_type
        if node_id not in self.contexts:
            return _error_reply(message, ErrorCode.NODE_UNAVAILABLE, f"no node with id {node_id} in this grid")
        wire_start = time.perf_counter()
        delivered, down = wire_round_trip(message)
        delivered.metadata.delivered_at = str(time.time())
        self.traffic_log.append(TrafficEntry(server_round, node_id, DOWN, down, message_type))

        # As on a SuperNode, the context is only updated when the ClientApp succeeds.
        context = _copy_context(self.contexts[node_id])
        self.wire_seconds += time.perf_counter() - wire_start
        TaskIdentity.node_id = node_id
        try:
            reply = self.client_app(delivered, context)
            if not isinstance(reply, Message):
                raise TypeError(f"ClientApp returned {type(reply).__name__}, expected a Message")
            if reply.metadata.reply_to_message_id != message.metadata.message_id:
                raise ValueError("ClientApp's reply is not a reply to the message it got; use Message(content, reply_to=msg)")
            wire_start = time.perf_counter()
            reply, up = wire_round_trip(reply)
            self.wire_seconds += time.perf_counter() - wire_start
        except Exception as error:  # noqa: BLE001 - every ClientApp failure becomes an error reply
            reason = f"{type(error)}:<'{error}'>"
            # The reason travels in the error reply and the server reports it once for all nodes
            # (`server.summarize_failures`): one traceback per node would bury it (400 for 200 clients).
            logger.debug("ClientApp on node %d (%s) raised: %s\n%s", node_id, message_type, reason, traceback.format_exc())
            reply, up = wire_round_trip(_error_reply(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason))
        else:
            self.contexts[node_id] = context
        finally:
            TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.traffic_log.append(TrafficEntry(server_round, node_id, UP, up, message_type))
        return reply
