"""The hand-off to a node's warm worker: the frame, what a worker accepts, who may reach it, and a forwarding
ClientApp process that never imports torch."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fgrpo.errors import ConfigError, FederationError
from fgrpo.federation import handoff
from fgrpo.federation.handoff import FrameError


def make_message(content: RecordDict, kind: str = MessageType.TRAIN, node_id: int = 3, run_id: int = 7) -> Message:
    """A message as a SuperNode delivers it (Flower's task identity set, an id given)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, 0
    message = Message(content, node_id, kind)
    message.metadata.__dict__["_message_id"] = "m" * 64
    return message


def make_context(node_config: dict, run_config: dict | None = None, node_id: int = 3, run_id: int = 7) -> Context:
    return Context(run_id=run_id, node_id=node_id, node_config=node_config, state=RecordDict(), run_config=run_config or {})


def frame_bytes(header: dict, blobs: list[bytes]) -> bytes:
    left, right = socket.socketpair()
    with left, right:
        handoff.send_frame(left, header, blobs)
        left.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: right.recv(1 << 16), b""))


def read_bytes(data: bytes):
    left, right = socket.socketpair()
    with left, right:
        left.sendall(data)
        left.shutdown(socket.SHUT_WR)
        return handoff.read_frame(right)


def _head(header: dict) -> bytes:
    text = json.dumps(header).encode()
    return handoff.MAGIC + struct.pack(">I", len(text)) + text


def test_a_frame_round_trips_with_empty_and_binary_blobs():
    header, blobs = read_bytes(frame_bytes({"kind": "reply"}, [b"\x00\x01" * 1000, b""]))
    assert header["kind"] == "reply" and blobs == [b"\x00\x01" * 1000, b""]


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"GET / HTTP/1.1\r\n\r\n", "magic"),
        (handoff.MAGIC + struct.pack(">I", handoff.MAX_HEADER + 1), "header of"),
        (handoff.MAGIC + struct.pack(">I", 4) + b"\xff\xfe{}", "UTF-8 JSON"),
        (handoff.MAGIC + struct.pack(">I", 2) + b"[]", "JSON object"),
        (_head({"kind": "message", "sizes": [-1]}), "sizes"),
        (_head({"kind": "x", "sizes": [2**40]}), "sizes"),
        (_head({"kind": "x", "sizes": [1] * 5}), "sizes"),
        (_head({"kind": "x"}), "sizes"),
        (_head({"kind": "x", "sizes": [10]}) + b"abc", "closed"),
        (handoff.MAGIC[:3], "closed"),
    ],
)
def test_a_malformed_frame_is_one_clear_refusal(data, reason):
    with pytest.raises(FrameError, match=reason):
        read_bytes(data)


def test_random_bytes_are_refused_never_crash_the_reader():
    rng = np.random.default_rng(0)
    for size in (1, 7, 12, 100, 5000):
        with pytest.raises(FrameError):
            read_bytes(rng.bytes(size))


def test_a_request_carries_flowers_own_message_and_context():
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "config": ConfigRecord({"server-round": 2})})
    message, context = make_message(content), make_context({"partition-id": 1})
    context.state["kept"] = ArrayRecord({"m": Array(np.ones(2, np.float64))})
    got, got_context = handoff.decode_request({"kind": "message"}, handoff.encode_request(message, context))
    assert got.metadata.message_type == MessageType.TRAIN and got.metadata.message_id == message.metadata.message_id
    np.testing.assert_array_equal(got.content["arrays"]["a"].numpy(), arrays["a"])
    assert got.content["config"]["server-round"] == 2
    assert got_context.node_config == {"partition-id": 1} and got_context.run_id == 7
    np.testing.assert_array_equal(got_context.state["kept"]["m"].numpy(), np.ones(2))


def test_garbage_protobuf_is_refused():
    with pytest.raises(FrameError, match="protobuf"):
        handoff.decode_request({"kind": "message"}, [b"\xff" * 50, b"\x00garbage"])
    with pytest.raises(FrameError, match="two parts"):
        handoff.decode_request({"kind": "message"}, [b""])


class _Planted:
    """Unpickling this would write a file: the proof that something was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path(self.path).write_text, ("unpickled!",))


def _array(dtype: str, shape: tuple, data: bytes) -> Array:
    return Array(dtype, shape, handoff.NUMPY_STYPE, data)


def test_arrays_are_checked_and_a_planted_pickle_is_never_loaded(tmp_path):
    planted = tmp_path / "planted"
    buffer = io.BytesIO()
    np.save(buffer, np.array([_Planted(str(planted))], dtype=object), allow_pickle=True)
    npy32 = io.BytesIO()
    np.save(npy32, np.zeros((2, 2), np.float32))
    bad = {
        "pickle": _array("float32", (1,), buffer.getvalue()),
        "object": _array("object", (1,), buffer.getvalue()),
        "shape": _array("float32", (3, 3), npy32.getvalue()),
        "dtype": _array("float64", (2, 2), npy32.getvalue()),
        "stype": Array("float32", (2, 2), "torch.Tensor", npy32.getvalue()),
        "bytes": _array("float32", (2, 2), b"\x93NUMPY garbage"),
    }
    for name, array in bad.items():
        content = RecordDict({"arrays": ArrayRecord({"x": array})})
        with pytest.raises(FrameError, match="array arrays/x"):
            handoff.decode_request({"kind": "message"}, handoff.encode_request(make_message(content), make_context({})))
        assert not planted.exists(), name
    handoff.check_arrays(RecordDict({"arrays": ArrayRecord({"x": _array("float32", (2, 2), npy32.getvalue())})}), "ok")


def test_the_workers_folder_is_the_users_alone(tmp_path):
    fresh = handoff.owner_only_dir(tmp_path / "fresh")
    assert (os.stat(fresh).st_mode & 0o777) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(ConfigError, match="open to other users") as refused:
        handoff.owner_only_dir(shared)
    assert str(tmp_path) not in refused.value.public  # a node's paths stay on the node
    (tmp_path / "link").symlink_to(fresh)
    with pytest.raises(ConfigError, match="symlink"):
        handoff.owner_only_dir(tmp_path / "link")
    assert (os.stat(shared).st_mode & 0o777) == 0o755  # refused, not changed


def test_one_socket_per_node_and_run_and_a_path_too_long_is_one_clear_error(tmp_path):
    folder = Path(tempfile.mkdtemp(prefix="fgrpo-t-"))
    try:
        a = handoff.socket_path(make_context({handoff.WARM_DIR: str(folder)}, run_id=1))
        b = handoff.socket_path(make_context({handoff.WARM_DIR: str(folder)}, run_id=2))
        c = handoff.socket_path(make_context({handoff.WARM_DIR: str(folder)}, node_id=4, run_id=1))
        assert len({a, b, c}) == 3 and a.parent == folder
    finally:
        os.rmdir(folder)
    deep = tmp_path / ("d" * 100)
    with pytest.raises(ConfigError, match="shorter"):
        handoff.socket_path(make_context({handoff.WARM_DIR: str(deep)}))


def test_warm_is_the_default_and_the_node_config_is_checked(monkeypatch):
    assert handoff.warm_enabled({}) and not handoff.warm_enabled({"warm": False}) and not handoff.warm_enabled({"warm": "false"})
    with pytest.raises(ConfigError, match="true or false"):
        handoff.warm_enabled({"warm": 1})
    assert handoff.idle_seconds({}) == handoff.DEFAULT_IDLE_S and handoff.idle_seconds({"warm-idle-s": 5}) == 5.0
    monkeypatch.setattr(handoff, "WARM_SUPPORTED", False)  # an OS without Unix sockets: as before, unless asked
    assert not handoff.warm_enabled({})
    with pytest.raises(ConfigError, match="Unix sockets"):
        handoff.warm_enabled({"warm": "true"})
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="above 0"):
        handoff.idle_seconds({"warm-idle-s": 0})


def test_the_peer_is_known_by_its_user_id():
    if not hasattr(socket, "SO_PEERCRED"):
        pytest.skip("no SO_PEERCRED on this OS (the 0700 folder is the guard there)")
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        assert handoff.peer_uid(left) == os.geteuid()


def test_a_workers_error_and_refusal_reach_the_clientapp_as_errors():
    message, context = make_message(RecordDict({"config": ConfigRecord({})})), make_context({})
    with pytest.raises(ConfigError, match="public text"):
        handoff._reply(message, context, {"kind": "raised", "error": "ConfigError", "text": "public text"}, [])
    with pytest.raises(FederationError, match="refused the message: bad"):
        handoff._reply(message, context, {"kind": "refused", "reason": "bad"}, [])
    reply = handoff._reply(message, context, {"kind": "error-reply", "code": 3, "reason": "r"}, [])
    assert reply.has_error() and reply.error.code == 3


# A forwarding ClientApp process: what a SuperNode's `flwr-clientapp` runs for one message.
CHILD = r"""
import json, sys
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fgrpo.federation.nodeapp import client_app
spec = json.loads(Path(sys.argv[1]).read_text())
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
context = Context(run_id=7, node_id=3, node_config=spec["node"], state=RecordDict(), run_config=spec["run"])
message = Message(RecordDict({"config": ConfigRecord({})}), 3, MessageType.QUERY)
message.metadata.__dict__["_message_id"] = "q" * 64
reply = client_app(message, context)
heavy = sorted(m for m in ("torch", "transformers", "peft", "fgrpo.core", "fgrpo.federation.clientapp") if m in sys.modules)
print(json.dumps({"arrays": len(reply.content["arrays"]), "heavy": heavy}))
"""


def test_a_forwarding_clientapp_process_imports_no_torch_and_gets_the_workers_reply(tmp_path):
    """The ClientApp that Flower loads per message (`nodeapp`) hands a query to a warm worker it starts, and gets
    θ₀ back without importing torch; the worker stays for the next message, its socket 0600, and ends when asked."""
    from conftest import small_config_dict

    from fgrpo.config import config_from_dict, dump_config

    folder = Path(tempfile.mkdtemp(prefix="fgrpo-t-"))
    config = config_from_dict(small_config_dict(tmp_path))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"node": {"partition-id": 0, "num-partitions": 2, handoff.WARM_DIR: str(folder)},
                                "run": {"fgrpo-config": dump_config(config)}}))
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, str(spec)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result == {"arrays": result["arrays"], "heavy": []} and result["arrays"] > 0
        (sock,) = folder.glob("*.sock")
        assert (os.stat(sock).st_mode & 0o777) == 0o600
        pid = int(Path(f"{sock}.pid").read_text())
        os.kill(pid, 0)  # the worker outlived the ClientApp process that started it
    finally:
        for pid_file in folder.glob("*.pid"):
            os.kill(int(pid_file.read_text()), 15)
        _wait_gone(folder)
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def _wait_gone(folder: Path, timeout_s: float = 20) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while list(folder.glob("*.pid")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(folder.glob("*.pid")), "a warm worker did not end on SIGTERM"


def test_a_hand_off_error_leaves_the_node_without_its_paths(tmp_path):
    """Flower sends a ClientApp's exception text to the server: the hand-off's errors go in their public form."""
    from fgrpo.federation import nodeapp

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    query = make_message(RecordDict({"config": ConfigRecord({})}), MessageType.QUERY)
    with pytest.raises(ConfigError) as error:
        nodeapp.handle(query, make_context({handoff.WARM_DIR: str(shared)}))
    assert "warm workers' folder is unusable" in str(error.value) and str(tmp_path) not in str(error.value)
    socket_error = nodeapp.public_error(OSError(13, "Permission denied", str(tmp_path)))  # a PermissionError
    assert str(socket_error).startswith("PermissionError in this node") and str(tmp_path) not in str(socket_error)


def test_the_timing_line_a_forward_logs_is_the_one_the_benchmark_reads():
    line = handoff.TIMING.format(kind="train", total=1.2345, work=1.0, handoff=0.2345)
    assert re.search(handoff.TIMING_PATTERN, f"INFO : {line}").groups() == ("train", "1.234", "1.000", "0.234")
