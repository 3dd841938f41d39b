"""A node's warm worker: same results as a fresh ClientApp process, runs kept apart, and its faults.

The federation tests run the real ServerApp loop on an `InProcessGrid` whose nodes run the ClientApp that Flower
loads per message (`fgrpo.federation.nodeapp`): each node's messages go to real warm worker processes, as on a
SuperNode, without starting Flower itself (tests/deploy/test_deploy.py does that).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fgrpo.config import config_from_dict, dump_config
from fgrpo.federation import handoff
from fgrpo.federation.handoff import FrameError
from fgrpo.federation.warm_node import WarmWorker
from fgrpo.federation.wire import CONFIG_KEY

NODEAPP = "fgrpo.federation.nodeapp:client_app"


@pytest.fixture
def warm_dir():
    """A short folder of this test's own (socket paths are limited to 107 bytes); every worker in it ends after."""
    folder = Path(tempfile.mkdtemp(prefix="fgrpo-t-"))
    yield folder
    for pid_file in folder.glob("*.pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 20
    while list(folder.glob("*.pid")) and time.monotonic() < deadline:
        time.sleep(0.1)
    leftover = list(folder.glob("*.pid"))
    shutil.rmtree(folder, ignore_errors=True)
    assert not leftover, "a warm worker outlived its test"


def config_for(tmp_path: Path, **federation):
    from conftest import small_config_dict

    from fgrpo.core.pipeline import resolve_model_source

    config = config_from_dict(small_config_dict(tmp_path, federation=federation))
    resolve_model_source(config.model, config.tasks)  # the tiny warm start, once, before any worker reads it
    return config


def nodes(config, warm_dir: Path, warm: bool = True) -> list[dict]:
    from fgrpo.deploy.runtime import node_configs

    return [{**node, handoff.WARM: warm, handoff.WARM_DIR: str(warm_dir)} for node in node_configs(config)]


def run(config, node_list, out: Path, **grid_options) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    from fgrpo.federation.inprocess import InProcessGrid
    from fgrpo.federation.server import run_federation

    grid = InProcessGrid(NODEAPP, node_list, run_config={CONFIG_KEY: dump_config(config)}, **grid_options)
    run_federation(grid, config, out, progress=False)
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def worker_pid(warm_dir: Path, node_id: int) -> int:
    (pid_file,) = warm_dir.glob(f"n{node_id:x}-*.sock.pid")
    return int(pid_file.read_text())


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


def test_a_worker_serves_one_run_of_one_node_and_refuses_any_other():
    worker = WarmWorker(run_id=7, node_id=3)
    first = Context(run_id=7, node_id=3, node_config={"partition-id": 0}, state=RecordDict(), run_config={"c": "a"})
    worker._check_same_run(first)
    for other in (
        Context(run_id=8, node_id=3, node_config={"partition-id": 0}, state=RecordDict(), run_config={"c": "a"}),
        Context(run_id=7, node_id=4, node_config={"partition-id": 0}, state=RecordDict(), run_config={"c": "a"}),
        Context(run_id=7, node_id=3, node_config={"partition-id": 0, "allow-server-code": True}, state=RecordDict(),
                run_config={"c": "a"}),
        Context(run_id=7, node_id=3, node_config={"partition-id": 0}, state=RecordDict(), run_config={"c": "b"}),
    ):
        with pytest.raises(FrameError):
            worker._check_same_run(other)
    header, blobs = worker.answer({"kind": "message"}, [b"\x01garbage", b""])
    assert header["kind"] == "refused" and "protobuf" in header["reason"] and blobs == []


@pytest.mark.slow
def test_warm_results_equal_a_fresh_process_even_when_the_worker_is_killed_between_rounds(tmp_path, warm_dir):
    """With optimizer state kept across rounds, the final adapter is bit-identical to the run without warm workers
    (the ClientApp in this process, as a fresh ClientApp process runs it), also when the node's worker is killed after
    its round-1 reply (as a restarted node, or a worker that expired): the next message starts a new worker, and
    what changes between rounds comes with the node's Context.state."""
    config = config_for(tmp_path, keep_optimizer_state=True, eval_every=2, num_clients=1, min_train_clients=1)
    cold = run(config, nodes(config, warm_dir, warm=False), tmp_path / "cold")
    assert not list(warm_dir.glob("*.sock")), "warm=false started a worker"
    killed: list[int] = []
    warm_nodes = nodes(config, warm_dir)

    def kill_after_first_train(node_id: int, reply) -> None:
        if reply.metadata.message_type == "train" and not killed:
            killed.append(worker_pid(warm_dir, node_id))
            kill(killed[0])

    from fgrpo.federation.inprocess import InProcessGrid

    grid_nodes = InProcessGrid(NODEAPP, warm_nodes).get_node_ids()  # the ids a grid with this seed gives
    warm = run(config, warm_nodes, tmp_path / "warm", on_message=kill_after_first_train)
    assert killed and worker_pid(warm_dir, grid_nodes[0]) != killed[0], "the node's worker was not replaced"
    assert set(warm) == set(cold)
    for name in cold:
        np.testing.assert_array_equal(warm[name], cold[name], err_msg=name)
    assert not [r for r in records(tmp_path / "warm") if r["kind"] == "failure"]


@pytest.mark.slow
def test_a_worker_killed_mid_message_is_a_failed_client_and_the_next_round_works(tmp_path, warm_dir, monkeypatch):
    config = config_for(tmp_path, min_train_clients=1, eval_every=2)
    warm_nodes = nodes(config, warm_dir)
    from fgrpo.federation.inprocess import InProcessGrid

    target = InProcessGrid(NODEAPP, warm_nodes).get_node_ids()[1]
    real_send, killed = handoff.send_frame, []

    def send_then_kill(sock, header, blobs=()):
        real_send(sock, header, blobs)
        if header.get("kind") != "message" or killed or f"n{target:x}-" not in str(sock.getpeername()):
            return
        message, _ = handoff.decode_request(header, blobs)
        if message.metadata.message_type == "train":  # the worker holds node 1's round-1 train message: kill it
            killed.append(worker_pid(warm_dir, target))
            kill(killed[0])

    monkeypatch.setattr(handoff, "send_frame", send_then_kill)
    run(config, warm_nodes, tmp_path / "run")
    rows = records(tmp_path / "run")
    failures = [r for r in rows if r["kind"] == "failure"]
    assert killed and [(r["round"], r.get("client")) for r in failures] == [(1, 1)], failures
    assert "warm worker ended during the train message" in failures[0]["reason"]
    assert str(warm_dir) not in failures[0]["reason"]  # the worker's log path stays on the node
    rounds = {r["round"]: r for r in rows if r["kind"] == "round"}
    assert rounds[1]["clients/failed"] == 1 and rounds[2]["clients/failed"] == 0
    trained_2 = sorted(r["client"] for r in rows if r["kind"] == "client" and r["round"] == 2 and "agg/weight" in r)
    assert trained_2 == [0, 1]  # node 1 came back with a new worker
    assert worker_pid(warm_dir, target) != killed[0]


@pytest.mark.slow
def test_two_runs_at_once_on_one_node_are_kept_apart(tmp_path, warm_dir):
    """Two runs (different seeds, optimizer state kept) on the same node at the same time: each has its own worker,
    and each reply and each kept state equal what the ClientApp gives for that run alone."""
    from fgrpo.federation.clientapp import client_app as cold_app
    from test_handoff import make_message

    def contexts(run_id: int, seed: int, warm: bool) -> Context:
        config = config_for(tmp_path / f"r{run_id}", keep_optimizer_state=True)
        config = config.model_copy(update={"training": config.training.model_copy(update={"seed": seed})})
        node = {**nodes(config, warm_dir, warm)[0]}
        return Context(run_id=run_id, node_id=5, node_config=node, state=RecordDict(), run_config={CONFIG_KEY: dump_config(config)})

    runs = {11: 0, 12: 1}
    warm = {run_id: contexts(run_id, seed, True) for run_id, seed in runs.items()}
    cold = {run_id: contexts(run_id, seed, False) for run_id, seed in runs.items()}
    arrays = {}
    for run_id in runs:  # θ₀, from each run's own model
        query = make_message(RecordDict({"config": ConfigRecord({})}), "query", node_id=5, run_id=run_id)
        arrays[run_id] = cold_app(query, cold[run_id]).content["arrays"]
    for server_round in (1, 2):
        replies: dict = {}

        def train(run_id: int, context: Context, key: str) -> None:
            content = RecordDict({"arrays": arrays[run_id], "config": ConfigRecord({"server-round": server_round})})
            message = make_message(content, "train", node_id=5, run_id=run_id)
            replies[key, run_id] = (handoff.forward if key == "warm" else cold_app)(message, context)

        threads = [threading.Thread(target=train, args=(run_id, warm[run_id], "warm")) for run_id in runs]
        for thread in threads:
            thread.start()
        for run_id in runs:
            train(run_id, cold[run_id], "cold")
        for thread in threads:
            thread.join(timeout=300)
        for run_id in runs:
            got, want = replies["warm", run_id].content["arrays"], replies["cold", run_id].content["arrays"]
            for name in want:
                np.testing.assert_array_equal(got[name].numpy(), want[name].numpy(), err_msg=f"run {run_id} {name}")
            assert set(warm[run_id].state) == set(cold[run_id].state) == {"optimizer-state"}
            for name, array in cold[run_id].state["optimizer-state"].items():
                np.testing.assert_array_equal(warm[run_id].state["optimizer-state"][name].numpy(), array.numpy())
        first, second = (replies["warm", run_id].content["arrays"] for run_id in runs)
        assert any(not np.array_equal(first[k].numpy(), second[k].numpy()) for k in first)  # the runs did differ
    pids = {int(p.read_text()) for p in warm_dir.glob("*.pid")}
    assert len(pids) == 2, "each run needs a worker of its own"


@pytest.mark.slow
def test_a_live_worker_refuses_garbage_and_goes_on(tmp_path, warm_dir):
    from test_handoff import make_message

    config = config_for(tmp_path)
    context = Context(run_id=7, node_id=3, node_config=nodes(config, warm_dir)[0], state=RecordDict(),
                      run_config={CONFIG_KEY: dump_config(config)})
    query = make_message(RecordDict({"config": ConfigRecord({})}), "query")
    first = handoff.forward(query, context)
    path = handoff.socket_path(context)
    rng = np.random.default_rng(1)
    garbage = [rng.bytes(64), b"GET / HTTP/1.1\r\n\r\n", handoff.MAGIC + b"\xff\xff\xff\xff"]
    for data in garbage:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            header, _ = handoff.read_frame(sock)
            assert header["kind"] == "refused" and header["reason"]
    other_run = Context(run_id=8, node_id=3, node_config=context.node_config, state=RecordDict(), run_config=context.run_config)
    with socket.socket(socket.AF_UNIX) as sock:  # a well-formed message of another run, sent to this run's worker
        sock.connect(str(path))
        handoff.send_frame(sock, {"kind": "message"}, handoff.encode_request(query, other_run))
        header, _ = handoff.read_frame(sock)
        assert header["kind"] == "refused" and "serves run 7" in header["reason"]
    with socket.socket(socket.AF_UNIX) as sock:  # a peer that hangs up mid-frame
        sock.connect(str(path))
        sock.sendall(handoff.MAGIC + (100).to_bytes(4, "big") + b"{")
    again = handoff.forward(query, context)
    assert {k: v.numpy().tolist() for k, v in again.content["arrays"].items()} == \
        {k: v.numpy().tolist() for k, v in first.content["arrays"].items()}
    log = Path(str(path).removesuffix(".sock") + ".log").read_text()
    assert log.count("refused a request") >= 4 and "query message 2" in log


@pytest.mark.slow
def test_a_warm_node_refuses_server_named_files_as_a_fresh_process_does(tmp_path, warm_dir):
    """The node-trust rules run in the worker on the node's own config: a run naming a data file is refused by a
    node without allow-server-data, with the same value-free error as without a worker, and nothing is read."""
    from fgrpo.federation.clientapp import client_app as cold_app
    from fgrpo.errors import FgrpoError
    from test_handoff import make_message

    private = tmp_path / "server-named.jsonl"
    private.write_text('{"prompt": "secret prompt", "answer": "42"}\n' * 10)
    from conftest import small_config_dict

    data = small_config_dict(tmp_path)
    data["tasks"]["files"] = [{"path": str(private), "family": "f"}]
    config = config_from_dict(data)
    node = {"partition-id": 0, "num-partitions": 2, handoff.WARM_DIR: str(warm_dir)}  # no allow-server-data
    query = make_message(RecordDict({"config": ConfigRecord({})}), "query")

    def raised(app) -> FgrpoError:
        context = Context(run_id=7, node_id=3, node_config=node, state=RecordDict(), run_config={CONFIG_KEY: dump_config(config)})
        with pytest.raises(FgrpoError) as error:
            app(query, context)
        return error.value

    warm, cold = raised(handoff.forward), raised(cold_app)
    assert (type(warm), str(warm)) == (type(cold), str(cold))
    assert "allow-server-data" in str(warm) and "secret" not in str(warm)
    assert list(warm_dir.glob("*.sock")), "the message went to a warm worker"
