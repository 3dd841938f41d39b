"""The ServerApp side runs a federation without torch, transformers or peft ever being imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# Runs in a fresh interpreter whose import system refuses the model libraries.
SCRIPT = textwrap.dedent(
    r"""
    import json, sys
    from pathlib import Path

    FORBIDDEN = ("torch", "transformers", "peft", "trl", "fgrpo.core")

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
                raise ImportError(f"the server path imported {name}")
            return None

    sys.meta_path.insert(0, Refuse())

    import numpy as np
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fgrpo.config import config_from_dict
    from fgrpo.federation import wire
    from fgrpo.federation.export import layout_to_text
    from fgrpo.federation.inprocess import InProcessGrid
    from fgrpo.federation.serverapp import server_app  # noqa: F401  (the ServerApp module itself)
    from fgrpo.federation.server import run_federation

    out = Path(sys.argv[1])
    THETA0 = {"layer.lora_A.default.weight": np.zeros((2, 3), np.float32),
              "layer.lora_B.default.weight": np.ones((3, 2), np.float32)}
    LAYOUT = {"files": {"adapter_config.json": '{"peft_type": "LORA"}'}, "weights_file": "adapter_model.safetensors",
              "names": {k: k.replace(".default", "") for k in THETA0}}

    app = ClientApp()  # a fake client: no model, fixed updates

    @app.query()
    def init(msg, context):
        content = RecordDict({wire.ARRAYS: wire.arrays_to_record(THETA0),
                              wire.CONFIG: ConfigRecord({wire.CHECKPOINT_LAYOUT: layout_to_text(LAYOUT)})})
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg, context):
        cid = int(context.node_config["partition-id"])
        theta = wire.record_to_arrays(msg.content[wire.ARRAYS])
        trained = {k: v + (cid + 1) for k, v in theta.items()}
        metrics = {wire.CLIENT_ID: cid, wire.NUM_EXAMPLES: 10 * (cid + 1), wire.REWARD_MEAN: 0.5, wire.REWARD_STD: 0.1,
                   wire.ACCURACY: 0.5, wire.TRAIN_TIME: 0.0, wire.UNIT_WEIGHT: 1}
        return Message(RecordDict({wire.ARRAYS: wire.arrays_to_record(trained), wire.METRICS: MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg, context):
        cid = int(context.node_config["partition-id"])
        metrics = {wire.CLIENT_ID: cid, wire.NUM_EXAMPLES: 4, wire.ACC_HELDOUT: 0.25 * (cid + 1)}
        return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=msg)

    config = config_from_dict({
        "federation": {"method": sys.argv[2], "num_clients": 2, "rounds": 1, "min_train_clients": 2},
        "output": {"dir": str(out / "run"), "report_to": sys.argv[3:]},
    })
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    grid = InProcessGrid(app, nodes, run_config={wire.CONFIG_KEY: ""})
    summary = run_federation(grid, config, out / "run", progress=False)
    loaded = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft")]
    print(json.dumps({"summary": summary, "loaded": loaded}))
    """
)


@pytest.mark.parametrize("method", ["fedavg", "fgrpo"])
def test_server_runs_a_round_without_torch_and_writes_the_adapter_from_arrays(tmp_path, method):
    from safetensors.numpy import load_file

    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), method], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert report["summary"]["initial/acc_heldout"] == pytest.approx((0.25 * 4 + 0.5 * 4) / 8)
    adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert sorted(adapter) == ["layer.lora_A.weight", "layer.lora_B.weight"]  # the layout's checkpoint names
    # Clients upload θ + (k + 1). The default norm_clip = 1.5 bounds client 1's step (2, twice the
    # other's) to 1.5. With K = 2 clients no one counts for more than ½: FGRPO's weight cap, and for
    # FedAvg the size cap on their 10:20 examples (screening.capped_sizes), so both weigh them equally.
    expected_step = (1 + 1.5) / 2
    np = pytest.importorskip("numpy")
    np.testing.assert_allclose(adapter["layer.lora_A.weight"], np.full((2, 3), expected_step), rtol=1e-6)
    np.testing.assert_allclose(adapter["layer.lora_B.weight"], np.full((3, 2), 1 + expected_step), rtol=1e-6)
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").read_text() == '{"peft_type": "LORA"}'


def test_the_servers_tensorboard_writer_imports_no_torch(tmp_path):
    """output.report_to = ["tensorboard"] on the server path: tensorboard's own numpy writer, not torch's."""
    pytest.importorskip("tensorboard")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), "fedavg", "tensorboard"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["loaded"] == []
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
