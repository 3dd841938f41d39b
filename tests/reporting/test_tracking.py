"""output.report_to: a federated run's metrics.jsonl records reach TensorBoard's event file and W&B
(a real offline run read back from its .wandb file, and a fake that records the calls)."""

from __future__ import annotations

import importlib.machinery
import json
import struct
import sys
import types

import numpy as np
import pytest

from fgrpo.config import config_from_dict
from fgrpo.errors import ConfigError
from fgrpo.federation import wire
from fgrpo.federation.inprocess import InProcessGrid
from fgrpo.federation.server import run_federation
from fgrpo.reporting.tracking import TENSORBOARD_DIR, record_scalars

from fake_apps import fake_client_app

THETA0 = {"layer.lora_A.default.weight": np.zeros((2, 3), np.float32), "layer.lora_B.default.weight": np.ones((3, 2), np.float32)}
LAYOUT = {"files": {"adapter_config.json": "{}"}, "weights_file": "adapter_model.safetensors", "names": {k: k for k in THETA0}}


def fake_app():
    """No model: client k adds k + 1 to θ, reports reward 0.1·(k + 1) and held-out accuracy 0.25·(k + 1)."""
    return fake_client_app(THETA0, LAYOUT, reward=lambda cid, server_round: 0.1 * (cid + 1))


def run(tmp_path, **output):
    config = config_from_dict(
        {"federation": {"method": "fgrpo", "num_clients": 2, "rounds": 2, "min_train_clients": 2},
         "output": {"dir": str(tmp_path / "run"), "save_adapter": False, **output}}
    )
    grid = InProcessGrid(fake_app(), [{"partition-id": i, "num-partitions": 2} for i in range(2)], run_config={wire.CONFIG_KEY: ""})
    run_federation(grid, config, tmp_path / "run", progress=False)
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def expected_scalars(records) -> dict[str, dict[int, float]]:
    """What every tracker must receive: each record's numbers, by tag and step, read from metrics.jsonl."""
    expected: dict[str, dict[int, float]] = {}
    for record in records:
        placed = record_scalars(record)
        if placed is not None:
            for tag, value in placed[1].items():
                expected.setdefault(tag, {})[placed[0]] = value
    return expected


def test_record_scalars_names_client_metrics_per_client_and_drops_text_and_nulls():
    client = {"kind": "client", "method": "fgrpo", "seed": 0, "round": 3, "client": 2,
              "client/reward_mean": 0.5, "agg/weight": 0.25, "agg/gain": None}
    assert record_scalars(client) == (3, {"client/reward_mean/client2": 0.5, "agg/weight/client2": 0.25})
    failure = {"kind": "failure", "method": "fgrpo", "seed": 0, "round": 1, "node": 7, "client": 1, "reason": "timeout"}
    assert record_scalars(failure) is None
    step = {"kind": "step", "method": "centralized", "seed": 0, "step": 4, "train/loss": 1.5, "flag": True}
    assert record_scalars(step) == (4, {"train/loss": 1.5})


def test_a_runs_tensorboard_event_file_holds_what_metrics_jsonl_holds(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    records = run(tmp_path, report_to=["tensorboard"])
    events = EventAccumulator(str(tmp_path / "run" / TENSORBOARD_DIR), size_guidance={"tensors": 0})
    events.Reload()
    written = {
        tag: {e.step: float(make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)} for tag in events.Tags()["tensors"]
    }
    expected = expected_scalars(records)
    for tag in ("global/acc_heldout", "comm/bytes_up", "time/round_s", "client/reward_mean/client1", "agg/weight/client0"):
        assert tag in expected  # the run logged it, so the comparison below covers it
    assert written.keys() == expected.keys()
    for tag, by_step in expected.items():
        assert written[tag] == pytest.approx(by_step, rel=1e-6), tag  # float32 in the event file
    assert sorted(written["global/acc_heldout"]) == [0, 1, 2]  # round 0 (before training) and both rounds
    assert written["client/reward_mean/client1"][2] == pytest.approx(0.2)


class FakeWandb(types.ModuleType):
    """Records what fgrpo asks of wandb; never contacts anything."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # "installed", for importlib.util.find_spec
        self.inits, self.logs, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def log(self, scalars, step):
                fake.logs.append((step, dict(scalars)))

            def finish(self):
                fake.finished += 1

        return Run()


def test_wandb_gets_one_run_with_the_config_and_every_record_at_its_round(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    records = run(tmp_path, report_to="wandb", wandb_mode="offline", wandb_project="consortium")
    (init,) = fake.inits
    assert init["mode"] == "offline" and init["project"] == "consortium" and init["dir"] == str(tmp_path / "run")
    assert init["name"] == "fgrpo-seed0" and init["config"]["federation"]["method"] == "fgrpo"
    assert fake.finished == 1
    logged: dict[str, dict[int, float]] = {}
    for step, scalars in fake.logs:
        for tag, value in scalars.items():
            logged.setdefault(tag, {})[step] = value
    assert logged == expected_scalars(records)
    steps = [step for step, _ in fake.logs]
    assert steps == sorted(steps)  # wandb drops a step lower than one it has seen


def test_wandb_mode_is_left_to_wandb_unless_set(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run(tmp_path, report_to=["wandb"])
    assert "mode" not in fake.inits[0]


def offline_wandb_records(path):
    """The protobuf records of a W&B offline run file (`run-<id>.wandb`).

    wandb ≥ 0.31 ships no reader of its own, so this follows the file's documented framing (LevelDB's log
    format): a 7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks, each a 7-byte header
    (CRC32C, little-endian length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes.
    """
    from wandb.proto import wandb_internal_pb2

    block, data = 32768, path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:  # a block's tail too short for a chunk header is padding
            position += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_a_real_offline_wandb_run_holds_the_config_and_every_record_at_its_round(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing outside tmp_path
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    records = run(tmp_path, report_to="wandb", wandb_mode="offline", wandb_project="consortium")
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    history: dict[str, dict[int, float]] = {}
    runs = []
    for record in offline_wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            runs.append(record.run)
        elif kind == "history":
            for item in record.history.item:
                tag = item.key or "/".join(item.nested_key)
                if not tag.startswith("_"):  # wandb's own _step, _runtime, _timestamp
                    history.setdefault(tag, {})[record.history.step.num] = json.loads(item.value_json)
    (wandb_run,) = runs
    assert wandb_run.project == "consortium" and wandb_run.display_name == "fgrpo-seed0"
    config = {item.key: json.loads(item.value_json) for item in wandb_run.config.update}
    assert config["federation"]["method"] == "fgrpo"
    expected = expected_scalars(records)
    assert "global/acc_heldout" in expected and "agg/weight/client1" in expected
    assert history.keys() == expected.keys()
    for tag, by_step in expected.items():
        assert history[tag] == pytest.approx(by_step), tag


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_a_missing_tracker_library_is_one_config_error_naming_the_extra(tmp_path, monkeypatch, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # as if not installed
    with pytest.raises(ConfigError, match=rf"output.report_to.*pip install 'fgrpo\[{tracker}\]'"):
        run(tmp_path, report_to=[tracker])
    assert not (tmp_path / "run").exists()  # the failed start removed what it created


def test_report_to_takes_trls_spellings():
    def report_to(value):
        return config_from_dict({"output": {"report_to": value}}).output.report_to

    assert report_to("none") == [] and report_to([]) == []
    assert report_to("all") == ["tensorboard", "wandb"]
    assert report_to("tensorboard") == ["tensorboard"]
    assert report_to(["wandb", "wandb"]) == ["wandb"]
    with pytest.raises(ConfigError, match="report_to"):
        report_to(["mlflow"])
