"""The hand-off from a node's per-message ClientApp process to its warm worker: where it listens, who may reach
it, the frame both sides speak, and the ClientApp side of one call.

Why: Flower (>= 1.21) starts a fresh `flwr-clientapp` process for every message, which would import torch and
load the model again each time. A warm worker (`fgrpo.federation.warm_node`) keeps them for one run on one node;
the ClientApp process only forwards the message to it. This module imports no torch, transformers or peft, so a
forwarding ClientApp process stays cheap (tests/federation/test_handoff.py checks it in a fresh interpreter).

Who may reach a worker: its Unix socket lives in a folder that only the node's OS user can enter (0700, owned by
that user, not a symlink; checked, never repaired), the socket itself is 0600, and the worker checks each peer's
user id (SO_PEERCRED, where the OS offers it). No network port is opened.

The frame, both ways: 8 magic bytes, a 4-byte big-endian header length, a JSON header (an object, at most
`MAX_HEADER` bytes, whose "sizes" lists the byte length of each blob), then the blobs. A request's blobs are
the Message and the Context as Flower's own protobufs (`flwr.common.serde`): the very objects the SuperNode
hands a ClientApp, so the worker runs the same ClientApp on the same inputs (same results, same node-trust
checks), and parsing them executes nothing (protobuf, no pickle). Every array in them is checked before use:
numpy serialisation only, a dtype from `ALLOWED_DTYPES`, and the shape and bytes that `np.load(...,
allow_pickle=False)` finds must match what the record claims. A reply is the reply's RecordDict and the
node's new Context.state (protobufs), the ClientApp's error, or a refusal.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Error, Message, RecordDict

from fgrpo import errors
from fgrpo.errors import ConfigError, FederationError

logger = logging.getLogger(__name__)

# Node config keys (`--node-config`): the node decides whether and where it keeps a warm worker.
WARM = "warm"  # true (default): forward each message to a warm worker; false: today's one process per message
WARM_DIR = "warm-dir"  # folder of the workers' sockets and logs (0700); default: $XDG_RUNTIME_DIR/fgrpo, else /tmp/fgrpo-<uid>
WARM_IDLE_S = "warm-idle-s"  # a worker with no message for this long ends (its run is over or stalled)

DEFAULT_IDLE_S = 600.0
START_TIMEOUT_S = 120.0  # how long a ClientApp waits for a fresh worker's socket
MAGIC = b"FGRPOHO1"
MAX_HEADER = 64 * 1024
MAX_BLOB = 8 * 2**30  # a message bigger than 8 GiB is refused, not read
MAX_BLOBS = 4
SOCKET_PATH_MAX = 107  # sun_path on Linux (104 on macOS: there a longer path fails at bind with its own error)
# Arrays a message may carry: what adapters, compressed updates and optimizer moments are made of. No object,
# string or void dtypes (np.load refuses pickled objects anyway; these never need structure).
ALLOWED_DTYPES = frozenset(
    {"float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"}
)
NUMPY_STYPE = "numpy.ndarray"
# The error types a worker may name in a "raised" reply; anything else is raised as FgrpoError.
ERROR_TYPES = {cls.__name__: cls for cls in (
    errors.FgrpoError, errors.ConfigError, errors.DataError, errors.RewardError, errors.ModelError,
    errors.TrainingError, errors.FederationError,
)}


class FrameError(Exception):
    """A frame that is not the hand-off protocol (the reason is safe to send back: it quotes nothing received)."""


class Closed(FrameError):
    """The peer closed the connection before a frame began."""


# ---------------------------------------------------------------- the frame


def send_frame(sock: socket.socket, header: Mapping, blobs: Sequence[bytes] = ()) -> None:
    text = json.dumps({**header, "sizes": [len(b) for b in blobs]}).encode()
    sock.sendall(MAGIC + struct.pack(">I", len(text)) + text)
    for blob in blobs:
        if blob:  # an empty one is no bytes at all (and a send to a peer that has read everything may fail)
            sock.sendall(blob)


def _read_exact(sock: socket.socket, size: int, *, at_start: bool = False) -> bytes:
    """`size` bytes; memory grows with the bytes that arrive, not with the size a peer claims."""
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(size - got, 1 << 20))
        if not chunk:
            if at_start and got == 0:
                raise Closed("the connection closed before a frame")
            raise FrameError(f"the connection closed {got} bytes into a {size}-byte part of a frame")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket) -> tuple[dict, list[bytes]]:
    """(header, blobs) of the next frame; FrameError for anything that is not a well-formed frame."""
    magic = _read_exact(sock, len(MAGIC), at_start=True)
    if magic != MAGIC:
        raise FrameError("not an fgrpo hand-off frame (wrong magic bytes)")
    (length,) = struct.unpack(">I", _read_exact(sock, 4))
    if length > MAX_HEADER:
        raise FrameError(f"frame header of {length} bytes (at most {MAX_HEADER})")
    try:
        header = json.loads(_read_exact(sock, length).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FrameError("frame header is not UTF-8 JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("kind"), str):
        raise FrameError("frame header is not a JSON object with a 'kind'")
    sizes = header.get("sizes")
    if (
        not isinstance(sizes, list) or len(sizes) > MAX_BLOBS
        or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_BLOB for s in sizes)
    ):
        raise FrameError(f"frame header 'sizes' must list at most {MAX_BLOBS} byte counts of 0..{MAX_BLOB}")
    return header, [_read_exact(sock, size) for size in sizes]


# ---------------------------------------------------------------- what a frame carries


def check_arrays(records: RecordDict, where: str) -> None:
    """Every array in `records` is a plain numpy array of an allowed dtype whose bytes match its claimed shape."""
    for name, record in records.items():
        if not isinstance(record, ArrayRecord):
            continue
        for key, array in record.items():
            label = f"{where} array {name}/{key}"
            if array.stype != NUMPY_STYPE or array.dtype not in ALLOWED_DTYPES:
                raise FrameError(f"{label}: {array.stype} of dtype {array.dtype!r} is not allowed "
                                 f"(numpy arrays of {', '.join(sorted(ALLOWED_DTYPES))})")
            try:
                value = array.numpy()  # np.load(..., allow_pickle=False)
            except Exception as error:  # noqa: BLE001 - any parse failure is a refusal
                raise FrameError(f"{label}: not a numpy array ({type(error).__name__})") from None
            if str(value.dtype) != array.dtype or tuple(value.shape) != tuple(array.shape):
                raise FrameError(f"{label}: its bytes hold {value.dtype}{list(value.shape)}, "
                                 f"not the {array.dtype}{list(array.shape)} it claims")


def encode_request(message: Message, context: Context) -> list[bytes]:
    from flwr.common.serde import context_to_proto, message_to_proto

    return [message_to_proto(message).SerializeToString(), context_to_proto(context).SerializeToString()]


def decode_request(header: Mapping, blobs: Sequence[bytes]) -> tuple[Message, Context]:
    """The Message and Context of a request frame, every array checked; FrameError otherwise."""
    from flwr.common.serde import context_from_proto, message_from_proto
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    if header.get("kind") != "message" or len(blobs) != 2:
        raise FrameError("expected a 'message' frame with two parts (message, context)")
    try:
        message_proto, context_proto = ProtoMessage(), ProtoContext()
        message_proto.ParseFromString(blobs[0])
        context_proto.ParseFromString(blobs[1])
        message, context = message_from_proto(message_proto), context_from_proto(context_proto)
    except Exception as error:  # noqa: BLE001 - protobuf's DecodeError, or a record Flower rejects
        raise FrameError(f"the message or context is not Flower's protobuf ({type(error).__name__})") from None
    if not message.has_content():
        raise FrameError("the message has no content")
    check_arrays(message.content, "message")
    check_arrays(context.state, "context state")
    return message, context


def decode_records(blob: bytes, where: str) -> RecordDict:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    try:
        proto = ProtoRecordDict()
        proto.ParseFromString(blob)
        records = recorddict_from_proto(proto)
    except Exception as error:  # noqa: BLE001
        raise FrameError(f"{where} is not Flower's protobuf ({type(error).__name__})") from None
    check_arrays(records, where)
    return records


def encode_records(records: RecordDict) -> bytes:
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(records).SerializeToString()


# ---------------------------------------------------------------- where a node's workers live


# Unix sockets and file locks: Linux and macOS. Elsewhere a node runs without a warm worker unless it asks for one.
WARM_SUPPORTED = os.name == "posix" and hasattr(socket, "AF_UNIX")


def warm_enabled(node_config: Mapping) -> bool:
    """Whether this node hands its messages to a warm worker (node config `warm`; default: where the OS allows)."""
    value = node_config.get(WARM, WARM_SUPPORTED)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not isinstance(value, bool):
        raise ConfigError(f"node config {WARM} = {value!r} must be true or false",
                          public=f"node config {WARM} must be true or false (its value stays on the node)")
    if value and not WARM_SUPPORTED:
        raise ConfigError(f"node config {WARM} = true needs Unix sockets, which this OS lacks; set {WARM}=false")
    return value


def idle_seconds(node_config: Mapping) -> float:
    value = node_config.get(WARM_IDLE_S, DEFAULT_IDLE_S)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"node config {WARM_IDLE_S} = {value!r} must be a number of seconds above 0",
                          public=f"node config {WARM_IDLE_S} must be a number of seconds above 0")
    return float(value)


def default_warm_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "fgrpo"
    return Path(tempfile.gettempdir()) / f"fgrpo-{os.geteuid()}"


def owner_only_dir(path: Path) -> Path:
    """`path`, made if missing (0700), and checked: a real folder of this user that nobody else may enter.

    An existing folder with wider permissions is refused, not changed: it may be someone else's choice, and a
    socket in it could be reached (or replaced) by other users.
    """
    public = f"node config {WARM_DIR}: the warm workers' folder is unusable (the details stay in the node's log)"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(path)
    except OSError as error:
        raise ConfigError(f"warm workers' folder '{path}' cannot be made: {error.strerror or error}", public=public) from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"warm workers' folder '{path}' is not a folder (a symlink or a file)", public=public)
    if info.st_uid != os.geteuid():
        raise ConfigError(f"warm workers' folder '{path}' belongs to user id {info.st_uid}, not to this node's user "
                          f"({os.geteuid()}); give node config {WARM_DIR} a folder of your own", public=public)
    if info.st_mode & 0o077:
        raise ConfigError(f"warm workers' folder '{path}' is open to other users (mode {oct(info.st_mode & 0o777)}); "
                          f"`chmod 700` it or give node config {WARM_DIR} another folder", public=public)
    return path


def socket_path(context: Context) -> Path:
    """This (node, run)'s socket: one warm worker per node and run, so runs never share a process."""
    given = str(context.node_config.get(WARM_DIR, "") or "")
    folder = owner_only_dir(Path(given).expanduser() if given else default_warm_dir())
    path = folder / f"n{context.node_id & (2**64 - 1):x}-r{context.run_id & (2**64 - 1):x}.sock"
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        raise ConfigError(
            f"warm worker socket '{path}' is {len(os.fsencode(path))} bytes, longer than a Unix socket path may be "
            f"({SOCKET_PATH_MAX}); give node config {WARM_DIR} a shorter folder",
            public=f"node config {WARM_DIR}: the folder's path is too long for a Unix socket",
        )
    return path


def peer_uid(conn: socket.socket) -> int | None:
    """The user id of the process at the other end of a Unix socket (None where the OS does not say)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


# ---------------------------------------------------------------- the ClientApp side of one call


def watched_process() -> tuple[int, float]:
    """(pid, start time) of the long-lived process a fresh worker should outlive no longer than.

    In a `flwr-clientapp` process, the SuperNode it serves (the nearest `flower-supernode` ancestor; else its
    parent, a SuperExec): when the SuperNode goes, its workers go. Anywhere else (an in-process grid, a test),
    this process itself.
    """
    import psutil

    me = psutil.Process()
    if Path(sys.argv[0]).name.startswith("flwr-clientapp"):
        chosen = me.parent() or me
        for ancestor in me.parents():
            try:
                if any(Path(part).name.startswith("flower-supernode") for part in ancestor.cmdline()[:2]):
                    chosen = ancestor
                    break
            except (psutil.AccessDenied, psutil.NoSuchProcess):
                continue
        me = chosen
    return me.pid, me.create_time()


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return sock
    except OSError as error:
        sock.close()
        if error.errno in (errno.ENOENT, errno.ECONNREFUSED):
            return None  # no worker, or a dead one's socket file
        raise


@contextlib.contextmanager
def _spawn_lock(path: Path):
    """One ClientApp process at a time decides whether this (node, run) needs a new worker."""
    import fcntl

    fd = os.open(f"{path}.spawn", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def start_worker(path: Path, context: Context) -> subprocess.Popen:
    """A detached warm worker for this (node, run): its own session (a signal to the ClientApp process's group
    does not reach it), the ClientApp process's environment and working directory, its log beside its socket."""
    pid, started = watched_process()
    package_root = str(Path(__file__).resolve().parents[2])  # this very fgrpo, wherever Flower runs from
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [package_root, os.environ.get("PYTHONPATH", "")] if p)}
    command = [
        sys.executable, "-m", "fgrpo.federation.warm_node", "--socket", str(path),
        "--run-id", str(context.run_id), "--node-id", str(context.node_id),
        "--idle-s", repr(idle_seconds(context.node_config)), "--watch-pid", str(pid), "--watch-started", repr(started),
    ]
    log = os.open(path.with_suffix(".log"), os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
    try:
        # The ClientApp process's working directory: a node's relative data-path means there what it means here.
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=os.getcwd(), start_new_session=True)
    finally:
        os.close(log)
    logger.info("started warm worker %d for run %d on node %d (log: %s)", process.pid, context.run_id,
                context.node_id, path.with_suffix(".log"))
    return process


def connect(context: Context, path: Path, timeout_s: float = START_TIMEOUT_S) -> socket.socket:
    """A connection to this (node, run)'s warm worker at `path` (`socket_path`), starting one if none listens."""
    sock = _connect(path)
    if sock is not None:
        return sock
    with _spawn_lock(path):
        sock = _connect(path)  # another ClientApp process may have started it meanwhile
        if sock is not None:
            return sock
        process = start_worker(path, context)
        deadline = time.monotonic() + timeout_s
        while (sock := _connect(path)) is None:
            if process.poll() is not None:
                raise FederationError(
                    f"the warm worker for run {context.run_id} exited with code {process.returncode} before it "
                    f"listened; its log: {path.with_suffix('.log')}",
                    public="this node's warm worker could not start (its log on the node says why)",
                )
            if time.monotonic() > deadline:
                raise FederationError(f"the warm worker did not listen on '{path}' within {timeout_s:.0f} s",
                                      public="this node's warm worker did not start in time")
            time.sleep(0.05)
        return sock


def forward(message: Message, context: Context) -> Message:
    """Run one message on this node's warm worker; its reply, with the node's Context.state updated.

    A worker that dies mid-message (killed, out of memory) is this message's error, so the server records a
    failed client; the next message starts a new worker, which rebuilds what it needs from the Context.
    """
    kind = message.metadata.message_type
    started = time.perf_counter()
    path = socket_path(context)
    with connect(context, path) as sock:
        try:
            send_frame(sock, {"kind": "message"}, encode_request(message, context))
            header, blobs = read_frame(sock)
        except (FrameError, ConnectionError) as error:  # Closed, a reset or a broken pipe: no reply came
            raise FederationError(
                f"this node's warm worker ended during the {kind} message ({error}); it was killed or crashed, and "
                f"the next message starts a new one (its log: {path.with_suffix('.log')})",
                public=f"this node's warm worker ended during the {kind} message (killed or crashed)",
            ) from None
    reply = _reply(message, context, header, blobs)
    log_timing(kind, time.perf_counter() - started, header.get("work_s"))
    return reply


TIMING = "fgrpo warm worker: {kind} message in {total:.3f} s (work {work:.3f} s, hand-off {handoff:.3f} s)"
# TIMING's line read back (benchmarks/flower_overhead.py): groups kind, total, work, hand-off.
TIMING_PATTERN = r"fgrpo warm worker: (\w+) message in ([\d.]+) s \(work ([\d.]+) s, hand-off ([\d.]+) s\)"


def log_timing(kind: str, total: float, work) -> None:
    """One line per message in the SuperNode's log (Flower's logger: what a `flwr-clientapp` process prints goes
    there): where the message's time went once Flower handed it over. `benchmarks/flower_overhead.py` reads it."""
    from flwr.common.logger import log

    work = float(work) if isinstance(work, (int, float)) and not isinstance(work, bool) else 0.0
    log(logging.INFO, TIMING.format(kind=kind, total=total, work=work, handoff=max(total - work, 0.0)))


def _reply(message: Message, context: Context, header: Mapping, blobs: Sequence[bytes]) -> Message:
    kind = header.get("kind")
    if kind == "reply" and len(blobs) == 2:
        content, state = decode_records(blobs[0], "the worker's reply"), decode_records(blobs[1], "the worker's state")
        for key in list(context.state.keys()):
            del context.state[key]
        for key, record in state.items():
            context.state[key] = record
        return Message(content, reply_to=message)
    if kind == "error-reply":
        return Message(Error(code=int(header.get("code", 0)), reason=str(header.get("reason", ""))), reply_to=message)
    if kind == "raised":  # the ClientApp's error, already in its value-free form (clientapp.private_errors_mod)
        raise ERROR_TYPES.get(str(header.get("error")), errors.FgrpoError)(str(header.get("text", "")))
    if kind == "refused":
        raise FederationError(f"this node's warm worker refused the message: {header.get('reason', '')}")
    raise FederationError(f"this node's warm worker sent an unknown reply ({str(kind)[:40]!r})")
