"""Flower deployment: a real SuperLink and SuperNodes as separate processes on 127.0.0.1.

The loopback test runs the same app with `flwr run` and checks it against the
in-process runtime (same seed, same clients); the fault test kills a SuperNode
mid-run. Both start Flower's own binaries and need no Ray.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fgrpo.deploy import flower as deploy
from fgrpo.config import config_from_dict
from fgrpo.errors import ConfigError

pytestmark = pytest.mark.skipif(
    bool(deploy.missing_binaries()), reason=f"Flower binaries not installed: {deploy.missing_binaries()}"
)

# Same seed and clients give the same sampled tokens, so the two runtimes agree
# to float32 rounding; this bound allows summing the updates in another order
# and different BLAS threading in the ClientApp processes.
ADAPTER_ATOL = 1e-5
WEIGHT_ATOL = 1e-6


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def flower_config(tmp_path: Path, **federation):
    from conftest import small_config_dict

    data = small_config_dict(tmp_path)
    data["tasks"]["test_per_family"] = 4
    data["federation"].update({"eval_every": 2, **federation})
    config = config_from_dict(data)
    # Build the warm-started tiny checkpoint once, here: every Flower process reads it from FGRPO_CACHE.
    from fgrpo.core.pipeline import resolve_model_source

    resolve_model_source(config.model, config.tasks)
    return config


def adapter_tensors(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.flower
def test_flower_loopback_matches_in_process_run(tmp_path):
    """2 rounds of FGRPO via `flwr run` on SuperLink + 2 SuperNodes == the in-process run, then `fgrpo report`;
    with warm workers (the default) the final adapter is bit-identical to the run without them (`warm=false`:
    a fresh ClientApp process per message), and no worker outlives the federation."""
    from fgrpo.reporting.report import write_report
    from fgrpo.deploy.runtime import node_configs, run_simulation

    config = flower_config(tmp_path)
    sim_dir, flower_dir = tmp_path / "sim", tmp_path / "flower-run"
    run_simulation(config.model_copy(update={"output": config.output.model_copy(update={"dir": str(sim_dir)})}), progress=False)

    federation = deploy.LocalFederation(node_configs(config), tmp_path / "flower")
    with federation:
        assert all(p.poll() is None for p in [federation.superlink, *federation.supernodes])
        federation.run(config, flower_dir, timeout_s=600)
        started = federation.processes()
        assert started, "the SuperLink and SuperNodes should still be running"
    assert not [p for p in started if p.is_running() and p.status() != "zombie"], "a Flower process outlived close()"

    # The results directory has the in-process format: report works on it.
    assert {"metrics.jsonl", "config.toml", "summary.json", "adapter"} <= {p.name for p in flower_dir.iterdir()}
    flower, sim = records(flower_dir), records(sim_dir)
    assert [r["round"] for r in flower if r["kind"] == "round"] == [0, 1, 2]
    assert all(r["clients/failed"] == 0 for r in flower if r["kind"] == "round" and r["round"] > 0)
    assert write_report(flower_dir).exists()

    # Equivalence: same clients (partition-id i on node i), same aggregation weights and adapters.
    def weights(recs):
        return {(r["round"], r["client"]): r["agg/weight"] for r in recs if "agg/weight" in r}

    w_flower, w_sim = weights(flower), weights(sim)
    assert set(w_flower) == set(w_sim) == {(1, 0), (1, 1), (2, 0), (2, 1)}
    for key in w_sim:
        assert w_flower[key] == pytest.approx(w_sim[key], abs=WEIGHT_ATOL)
    warm_log = "".join(p.read_text() for p in (tmp_path / "flower" / "warm-logs").glob("*.log"))
    assert warm_log.count("train message") == 4, "each node's two train messages ran on its warm worker"
    assert warm_log.count("serves run") == 2, "one worker per node for the whole run"
    cold_dir = tmp_path / "flower-cold-run"
    with deploy.LocalFederation(node_configs(config), tmp_path / "flower-cold", warm=False) as cold:
        cold.run(config, cold_dir, timeout_s=600)
    assert not (tmp_path / "flower-cold" / "warm-logs").exists(), "warm=false started a worker"
    a_flower, a_cold = adapter_tensors(flower_dir), adapter_tensors(cold_dir)
    assert set(a_flower) == set(a_cold)
    for name in a_cold:
        np.testing.assert_array_equal(a_flower[name], a_cold[name], err_msg=name)
    a_sim = adapter_tensors(sim_dir)
    assert set(a_flower) == set(a_sim)
    for name in a_sim:
        np.testing.assert_allclose(a_flower[name], a_sim[name], rtol=0, atol=ADAPTER_ATOL, err_msg=name)
    summary_f = json.loads((flower_dir / "summary.json").read_text())
    summary_s = json.loads((sim_dir / "summary.json").read_text())
    assert summary_f["final/acc_heldout"] == summary_s["final/acc_heldout"]


@pytest.mark.slow
@pytest.mark.flower
def test_killed_supernode_fails_its_round_and_the_run_goes_on(tmp_path):
    """SIGKILL one SuperNode during round 1: the round completes with the other, counts the failure, round 2 runs."""
    from fgrpo.deploy.runtime import node_configs

    config = flower_config(tmp_path, min_train_clients=1, round_timeout_s=60.0)
    run_dir = tmp_path / "flower-run"
    errors: list[BaseException] = []

    with deploy.LocalFederation(node_configs(config), tmp_path / "flower") as federation:

        def run() -> None:
            try:
                federation.run(config, run_dir, timeout_s=900)
            except BaseException as error:  # noqa: BLE001 - re-raised in the test thread
                errors.append(error)

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 600
        # Round 0's evaluation is logged right before round 1's train messages go out.
        while not (run_dir / "metrics.jsonl").exists() or '"round": 0, "global' not in (run_dir / "metrics.jsonl").read_text():
            assert thread.is_alive() and time.monotonic() < deadline, f"round 0 never finished: {errors}"
            time.sleep(0.5)
        federation.kill_node(1)
        thread.join(timeout=900)
    assert not errors, errors
    recs = records(run_dir)
    rounds = {r["round"]: r for r in recs if r["kind"] == "round"}
    assert sorted(rounds) == [0, 1, 2]
    assert rounds[1]["clients/sampled"] == 2 and rounds[1]["clients/failed"] >= 1
    trained_1 = [r["client"] for r in recs if r["kind"] == "client" and r["round"] == 1 and "agg/weight" in r]
    assert trained_1 == [0]
    assert (run_dir / "summary.json").exists()


@pytest.mark.slow
def test_wire_carries_only_adapters_and_aggregate_statistics(tmp_path):
    """What a client sends: one ArrayRecord of adapter weights and one MetricRecord of scalars — no prompts,
    completions or per-example rewards (checked on the deserialised replies of a real in-process run)."""
    from conftest import small_config_dict

    from fgrpo.federation.clientapp import _client_data, client_app
    from fgrpo.federation.wire import CONFIG_KEY
    from fgrpo.config import dump_config
    from fgrpo.federation.inprocess import InProcessGrid
    from fgrpo.deploy.runtime import node_configs
    from fgrpo.federation.server import run_federation

    config = config_from_dict(small_config_dict(tmp_path))
    replies = []
    grid = InProcessGrid(
        client_app, node_configs(config), run_config={CONFIG_KEY: dump_config(config)},
        on_message=lambda node, reply: replies.append(reply),
    )
    run_federation(grid, config, tmp_path / "run", progress=False)
    private_text = set()
    for i in range(config.federation.num_clients):
        data = _client_data(dump_config(config), i, config.federation.num_clients, "")
        private_text |= {ex.prompt for ex in data.train + data.test} | {str(ex.answer) for ex in data.train + data.test}

    from fgrpo.federation.clientapp import _shared_learner
    from fgrpo.core.model import get_trainable_arrays

    trainable = get_trainable_arrays(_shared_learner(dump_config(config)).model)
    # One client answers the model-free server's init query: θ₀ and a model description, never data.
    (init,) = [r for r in replies if r.metadata.message_type == "query"]
    assert set(init.content.config_records) == {"config"} and set(init.content["config"]) == {"checkpoint-layout"}
    layout = str(init.content["config"]["checkpoint-layout"])
    assert not any(text in layout for text in private_text if len(text) > 3), "a prompt in the checkpoint layout"
    assert {k: tuple(a.shape) for k, a in init.content["arrays"].items()} == {k: v.shape for k, v in trainable.items()}
    replies = [r for r in replies if r is not init]
    assert len(replies) == 2 * 2 + 2 * 3  # 2 clients × (2 train + 3 evaluate)
    for reply in replies:
        content = reply.content
        assert not content.config_records, "config records can carry strings"
        assert set(content.metric_records) == {"metrics"}
        metrics = content.metric_records["metrics"]
        assert all(isinstance(v, (int, float)) for v in metrics.values()), f"non-scalar metric: {dict(metrics)}"
        assert not any(text in key for key in metrics for text in private_text if len(text) > 3), "a prompt in a metric name"
        if reply.metadata.message_type.startswith("train"):
            assert set(content.array_records) == {"arrays"}
            arrays = content.array_records["arrays"]
            assert {k: tuple(a.shape) for k, a in arrays.items()} == {k: v.shape for k, v in trainable.items()}
            assert all(a.numpy().dtype == np.float32 for a in arrays.values())
        else:
            assert not content.array_records
    # Bytes that went up: at most the adapter plus Flower's per-array headers (object ids, shapes) and a
    # few scalars — no room for anything else. (Less when identical arrays, e.g. all-zero LoRA B, are sent once.)
    adapter_bytes = sum(v.nbytes for v in trainable.values()) + 1024 * len(trainable)
    train_up = [e.num_bytes for e in grid.traffic_log if e.direction == "up" and e.message_type.startswith("train")]
    eval_up = [e.num_bytes for e in grid.traffic_log if e.direction == "up" and e.message_type.startswith("evaluate")]
    assert all(b < adapter_bytes for b in train_up), (train_up, adapter_bytes)
    assert all(b < 4096 for b in eval_up), eval_up


def test_commands_and_files(tmp_path):
    cfg_node = deploy.format_node_config({"partition-id": 1, "num-partitions": 2, "data-path": "/d/a b.jsonl", "x": True})
    assert cfg_node == 'partition-id=1 num-partitions=2 data-path="/d/a b.jsonl" x=true'
    from flwr.common.config import parse_config_args

    assert parse_config_args([cfg_node]) == {"partition-id": 1, "num-partitions": 2, "data-path": "/d/a b.jsonl", "x": True}
    with pytest.raises(ConfigError, match="quotes"):
        deploy.format_node_config({"data-path": 'a"b'})

    link = deploy.superlink_command(9100)
    assert link[:5] == ["flower-superlink", "--host", "127.0.0.1", "--port", "9100"] and "--insecure" in link
    tls = deploy.generate_tls_certificates(tmp_path / "certs")
    secure = deploy.superlink_command(9100, tls=tls, supernode_auth=True)
    assert "--insecure" not in secure and "--enable-supernode-auth" in secure and str(tls.server_key) in secure
    with pytest.raises(ConfigError, match="needs TLS"):
        deploy.superlink_command(9100, supernode_auth=True)
    (private, public), = deploy.generate_supernode_keys(tmp_path / "keys", 1)
    node = deploy.supernode_command("127.0.0.1:9100", {"partition-id": 0}, 9200, root_cert=tls.ca_cert, auth_private_key=private)
    assert "--root-certificates" in node and "--insecure" not in node and str(private) in node
    from flwr.cli.supernode.register import try_load_public_key

    assert try_load_public_key(public)  # the key format Flower's `flwr supernode register` accepts

    config = config_from_dict({"federation": {"num_clients": 2}})
    path = deploy.write_run_config(config, tmp_path / "out", tmp_path / "rc.toml")
    overrides = parse_config_args([str(path)])
    assert overrides["run-dir"] == str((tmp_path / "out").resolve())
    from fgrpo.federation.wire import config_from_text

    assert config_from_text(overrides["fgrpo-config"]) == config
    with pytest.raises(ConfigError, match=".toml"):
        deploy.write_run_config(config, tmp_path, tmp_path / "rc.txt")

    conn = deploy.write_connection("127.0.0.1:9100", root_cert=tls.ca_cert, flwr_home=tmp_path / "home")
    deploy.write_connection("10.0.0.1:9100", name="other", flwr_home=tmp_path / "home")
    from flwr.cli.flower_config import parse_superlink_connection
    import tomllib

    saved = tomllib.loads(conn.read_text())["superlink"]
    assert parse_superlink_connection(saved["fgrpo-local"], "fgrpo-local").root_certificates == str(tls.ca_cert.resolve())
    assert saved["other"] == {"address": "10.0.0.1:9100", "insecure": True} and saved["default"] == "fgrpo-local"


@pytest.mark.flower
def test_pyproject_is_a_valid_flower_app():
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import get_fused_config_from_dir, validate_config

    import tomllib

    app = deploy.flower_app_dir()
    pyproject = tomllib.loads((app / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(pyproject, check_module=True, project_dir=app / "src")
    assert ok, errors
    assert set(get_fused_config_from_dir(app, {})) == {"fgrpo-config", "run-dir", "resume"}
    import io
    import zipfile

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist()
    assert {"src/fgrpo/federation/serverapp.py", "src/fgrpo/federation/clientapp.py"} <= set(names) and not any(n.startswith(("tests/", "runs/")) for n in names)
    with pytest.raises(ConfigError, match="Flower App"):
        deploy.flower_app_dir(app / "src")


def test_missing_data_path_names_the_path(tmp_path):
    from fgrpo.federation.clientapp import _client_data
    from fgrpo.config import dump_config
    from fgrpo.errors import DataError

    text = dump_config(config_from_dict({}))
    with pytest.raises(DataError, match=str(tmp_path / "nope.jsonl")):
        _client_data(text, 0, 1, str(tmp_path / "nope.jsonl"))


def test_missing_reply_counts_as_failed(tmp_path):
    """A node that never answers (the SuperLink's timeout path) is a failed client, like an error reply."""
    from conftest import small_config_dict

    from fgrpo.federation.clientapp import client_app
    from fgrpo.federation.wire import CONFIG_KEY
    from fgrpo.config import dump_config
    from fgrpo.federation.inprocess import InProcessGrid
    from fgrpo.deploy.runtime import node_configs
    from fgrpo.federation.server import run_federation

    class SilentNodeGrid(InProcessGrid):
        def pull_messages(self, message_ids):
            replies = list(super().pull_messages(message_ids))
            silent = self._node_ids[1]
            return [r for r in replies if not (r.metadata.src_node_id == silent and r.metadata.message_type.startswith("train"))]

    # A generous timeout: the silent node is dropped by the grid, so only a loaded machine could hit it.
    config = config_from_dict(small_config_dict(tmp_path, federation={"min_train_clients": 1, "round_timeout_s": 60.0}))
    grid = SilentNodeGrid(client_app, node_configs(config), run_config={CONFIG_KEY: dump_config(config)})
    run_federation(grid, config, tmp_path / "run", progress=False)
    rounds = [r for r in records(tmp_path / "run") if r["kind"] == "round" and r["round"] > 0]
    assert [(r["clients/sampled"], r["clients/failed"]) for r in rounds] == [(2, 1), (2, 1)]


@pytest.mark.flower
def test_tls_and_supernode_authentication_on_loopback(tmp_path):
    """TLS everywhere and CLI-managed SuperNode authentication: registered nodes come online, a stranger does not."""
    nodes = [{"partition-id": 0, "num-partitions": 2}, {"partition-id": 1, "num-partitions": 2}]
    with deploy.LocalFederation(nodes, tmp_path / "flower", supernode_auth=True) as federation:
        federation.wait_online(2)
        # An unregistered key is refused: the count of online nodes stays at 2.
        (private, _), = deploy.generate_supernode_keys(tmp_path / "stranger", 1)
        certs = federation.work_dir / "certificates" / "ca.crt"
        federation.supernodes.append(federation._spawn("stranger", deploy.supernode_command(
            federation.address, {"partition-id": 2}, deploy.free_port(), root_cert=certs, auth_private_key=private,
        )))
        stranger = federation.supernodes[-1]
        deadline = time.monotonic() + 120
        while stranger.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        assert stranger.returncode not in (None, 0), "a SuperNode with an unregistered key kept running"
        assert "failed to activate supernode" in federation.log_tail("stranger", 20000).lower()
        assert federation.online_nodes() == 2


@pytest.mark.parametrize("host, warned", [("0.0.0.0", True), ("10.1.2.3", True), ("127.0.0.1", False), ("localhost", False)])
def test_insecure_commands_off_loopback_warn_loudly_on_stderr(tmp_path, host, warned):
    from typer.testing import CliRunner

    from fgrpo.cli import app

    path = tmp_path / "c.toml"
    path.write_text("[federation]\nnum_clients = 2\n")
    result = CliRunner().invoke(app, ["flower", "commands", str(path), "--host", host])
    assert result.exit_code == 0, result.output
    assert ("WITHOUT TLS" in result.stderr) == warned
    assert "WITHOUT TLS" not in result.stdout  # the commands themselves stay copy-pasteable


@pytest.mark.slow
@pytest.mark.flower
def test_three_owners_with_their_own_reward_functions_on_the_flower_loopback(tmp_path):
    """Issue 15: 3 owners, each its own data, reward function and reward scale, 1 round of 1 step via `flwr run`:
    each client's rewards lie on its own owner's scale and equal the in-process run's (same seed, same functions)."""
    from fgrpo.deploy.runtime import node_configs, run_simulation

    owners = [
        {"name": "adder", "families": [{"name": "add", "difficulty": 1}], "rewards": [{"name": "exact_match"}],
         "reward_scale": [0.0, 1.0]},
        {"name": "sorter", "families": [{"name": "sort", "difficulty": 2}], "rewards": [{"name": "partial_credit"}],
         "reward_scale": [-20.0, -10.0]},
        {"name": "formatter", "families": [{"name": "add", "difficulty": 2}], "rewards": [{"name": "format"}],
         "reward_scale": [10.0, 20.0]},
    ]
    config = flower_config(tmp_path, clients=owners, num_clients=3, min_train_clients=3, rounds=1, local_steps=1)
    sim_dir, flower_dir = tmp_path / "sim", tmp_path / "flower-run"
    run_simulation(config.model_copy(update={"output": config.output.model_copy(update={"dir": str(sim_dir)})}), progress=False)
    with deploy.LocalFederation(node_configs(config), tmp_path / "flower") as federation:
        federation.run(config, flower_dir, timeout_s=600)

    def rewards(run_dir):
        return {r["client"]: r["client/reward_mean"] for r in records(run_dir) if r["kind"] == "client" and "client/reward_mean" in r}

    flower, sim = rewards(flower_dir), rewards(sim_dir)
    assert set(flower) == {0, 1, 2}
    for client, (low, high) in enumerate(owner["reward_scale"] for owner in owners):
        assert low <= flower[client] <= high, (client, flower[client])
        assert flower[client] == pytest.approx(sim[client], abs=1e-6)
    assert not [r for r in records(flower_dir) if r["kind"] == "failure"]
