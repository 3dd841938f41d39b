"""The federation loop under faulty and malicious clients, with defences and DP."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgrpo.federation.clientapp import client_evaluate, client_init, client_train, dp_clipping_mod
from fgrpo.federation.wire import CONFIG_KEY
from fgrpo.config import config_from_dict, dump_config
from fgrpo.errors import ConfigError, FederationError
from fgrpo.federation.inprocess import InProcessGrid
from fgrpo.deploy.runtime import node_configs, run_simulation
from fgrpo.federation.methods import build_strategy
from fgrpo.federation.screening import clip_replies, screen_replies
from fgrpo.federation.server import run_federation
from fgrpo.federation.strategies import FGRPO


def records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


# A healthy node must finish its round well inside the timeout even on a loaded 2-core machine;
# the slow node sleeps past it.
ROUND_TIMEOUT_S = 8.0
SLOW_NODE_S = 8.5


def faulty_app(faults: dict[int, str]) -> ClientApp:
    """The real ClientApp, except that partition p misbehaves as faults[p] says."""
    app = ClientApp(mods=[dp_clipping_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        fault = faults.get(int(context.node_config["partition-id"]))
        if fault == "raise":
            raise RuntimeError("disk on fire")
        if fault == "slow":
            time.sleep(SLOW_NODE_S)
        reply = client_train(msg, context)
        arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        if fault == "nan":
            first = next(iter(arrays))
            arrays[first] = np.full_like(arrays[first], np.nan)
        elif fault == "shape":
            first = next(iter(arrays))
            arrays[first] = np.zeros((3, 3), dtype=np.float32)
        elif fault == "nan-metric":
            reply.content["metrics"]["reward-mean"] = float("nan")
        reply.content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        return reply

    app.evaluate()(client_evaluate)
    app.query()(client_init)
    return app


def run_with(app: ClientApp, config, run_dir, **kwargs):
    grid = InProcessGrid(app, node_configs(config), run_config={CONFIG_KEY: dump_config(config)})
    return run_federation(grid, config, run_dir, progress=False, **kwargs)


def test_faulty_clients_are_excluded_with_their_reason(tmp_path):
    from conftest import small_config_dict

    data = small_config_dict(tmp_path)
    data["tasks"]["families"] = data["tasks"]["families"] * 1  # 2 families over 5 clients: by_family reuses them
    config = config_from_dict(
        {
            **data,
            "tasks": {**data["tasks"], "train_per_family": 50},
            "federation": {
                "num_clients": 5,
                "rounds": 1,
                "local_steps": 1,
                "min_train_clients": 1,
                "round_timeout_s": ROUND_TIMEOUT_S,
                "partition": {"scheme": "iid"},
            },
        }
    )
    app = faulty_app({1: "raise", 2: "nan", 3: "shape", 4: "slow"})
    run_with(app, config, tmp_path / "run")
    failures = {r["node"]: r for r in records(tmp_path / "run", "failure")}
    reasons = sorted(r["reason"] for r in failures.values())
    assert len(reasons) == 4
    assert any("disk on fire" in r for r in reasons)
    assert any("non-finite values" in r for r in reasons)
    assert any("wrong shape" in r for r in reasons)
    assert any("no reply within" in r for r in reasons)
    (round1,) = [r for r in records(tmp_path / "run", "round") if r["round"] == 1]
    assert round1["clients/failed"] == 4 and round1["clients/aggregated"] == 1
    weights = [r["agg/weight"] for r in records(tmp_path / "run", "client") if "agg/weight" in r]
    assert weights == [1.0]  # the one healthy client carries the round
    from fgrpo.reporting.report import write_report

    assert write_report(tmp_path / "run").exists()  # failure records do not trip the report


def test_too_few_healthy_clients_fail_clearly_and_keep_the_checkpoint(tmp_path):
    from conftest import small_config_dict

    data = small_config_dict(tmp_path)
    config = config_from_dict({**data, "federation": {**data["federation"], "rounds": 2, "min_train_clients": 2}})
    run_dir = tmp_path / "run"
    with pytest.raises(FederationError, match=r"only 1 of 2 clients succeeded.*metrics \['reward-mean'\] must be finite") as info:
        run_with(faulty_app({1: "nan-metric"}), config, run_dir)
    assert "--resume" in str(info.value)
    from fgrpo.federation.checkpoint import load_checkpoint

    assert load_checkpoint(run_dir).server_round == 0  # the initial state survived, ready for --resume


def attacked_config(tmp_path, name, defended: bool | None):
    """defended: True = explicit defences, None = the defaults, False = none (the defaults before issue 16)."""
    from conftest import small_config_dict

    data = small_config_dict(tmp_path / name)
    # partial credit and 4 prompts per step: every client's update is non-zero
    data["tasks"]["rewards"] = [{"name": "exact_match"}, {"name": "partial_credit"}]
    data["training"]["prompts_per_step"] = 4
    fed = {
        **data["federation"],
        "num_clients": 3,
        "rounds": 2,
        "min_train_clients": 3,
        "partition": {"scheme": "iid"},
        "attack": {"clients": [0], "reward_growth": 10.0, "update_scale": 50.0},
    }
    if defended:
        fed.update(defense={"norm_clip": 3.0, "robust": "median"}, fgrpo={"w_max": 0.45})
    elif defended is False:
        fed.update(defense={"norm_clip": "off"}, fgrpo={"w_max": 1.0, "max_tilt": "off"})
    return config_from_dict({**data, "federation": fed})


def test_attacker_wins_weight_without_defences_and_is_bounded_with_them_and_by_default(tmp_path):
    run_simulation(attacked_config(tmp_path, "open", defended=False), progress=False)
    run_simulation(attacked_config(tmp_path, "guarded", defended=True), progress=False)
    run_simulation(attacked_config(tmp_path, "default", defended=None), progress=False)
    open_clients = records(tmp_path / "open" / "run", "client")
    guarded = records(tmp_path / "guarded" / "run", "client")

    def round2(recs):
        return {r["client"]: r for r in recs if r["round"] == 2 and "agg/weight" in r}

    # The fake, ever-growing reward wins the liar (client 0) the largest FGRPO weight...
    open2 = round2(open_clients)
    assert open2[0]["agg/weight"] == max(r["agg/weight"] for r in open2.values()) > 0.9
    assert open2[0]["client/update_norm"] > 20 * np.median([r["client/update_norm"] for r in open2.values()])
    # ...with defences its weight is capped and its update scaled to 3× the round's median norm.
    guarded2 = round2(guarded)
    assert guarded2[0]["agg/weight"] <= 0.45 + 1e-9
    assert guarded2[0]["defense/clip_factor"] < 0.2
    assert all("defense/clip_factor" not in r for cid, r in guarded2.items() if cid != 0)
    # With no defence configured at all (the defaults), the same liar is capped at ½ (K = 3), its tilt at
    # 1.25 (max_tilt), and its 50× update is scaled to 1.5× the round's lower-median norm, in every round.
    for rnd in (1, 2):
        defaults = {r["client"]: r for r in records(tmp_path / "default" / "run", "client") if r["round"] == rnd and "agg/weight" in r}
        assert defaults[0]["agg/weight"] <= 0.5 + 1e-9
        lower_median = sorted(r["client/update_norm"] for r in defaults.values())[1]  # K = 3: the middle one, an honest norm
        assert defaults[0]["client/update_norm"] * defaults[0]["defense/clip_factor"] == pytest.approx(1.5 * lower_median, rel=1e-6)
        assert lower_median <= max(r["client/update_norm"] for cid, r in defaults.items() if cid != 0)


def test_dp_clips_adds_noise_and_reports_epsilon(tmp_path):
    from conftest import small_config_dict

    def dp_run(name, sigma):
        data = small_config_dict(tmp_path / name)
        fed = {**data["federation"], "method": "fedavg", "dp": {"enabled": True, "clip_norm": 0.05, "noise_multiplier": sigma}}
        return run_simulation(config_from_dict({**data, "federation": fed}), progress=False)

    low, high = dp_run("low", 0.8), dp_run("high", 2.0)
    assert 0 < high["dp/epsilon"] < low["dp/epsilon"] < math.inf
    assert low["dp/releases"] == 2 and low["dp/delta"] == 1e-5
    norms = [r["client/update_norm"] for r in records(tmp_path / "low" / "run", "client") if "client/update_norm" in r]
    assert norms and max(norms) <= 0.05 + 1e-6  # clients clipped their updates to C before sending
    rounds = [r for r in records(tmp_path / "low" / "run", "round") if r["round"] > 0]
    assert [r["dp/releases"] for r in rounds] == [1, 2]


def test_dp_refuses_methods_it_cannot_account_for(tmp_path):
    from conftest import small_config_dict

    data = small_config_dict(tmp_path)
    for method in ("fgrpo", "reward_weighted", "fedadam"):
        fed = {**data["federation"], "method": method, "dp": {"enabled": True}}
        with pytest.raises(ConfigError, match="not supported"):
            build_strategy(config_from_dict({**data, "federation": fed}), 2)
    fed = {**data["federation"], "method": "fedadam", "defense": {"robust": "median"}}
    with pytest.raises(ConfigError, match="works with methods fgrpo, reward_weighted and fedavg"):
        build_strategy(config_from_dict({**data, "federation": fed}), 2)


def test_robust_fedavg_uses_flowers_fedmedian_and_fedtrimmedavg(tmp_path):
    from conftest import small_config_dict

    data = small_config_dict(tmp_path)
    for robust, cls in (("median", "FedMedian"), ("trimmed_mean", "FedTrimmedAvg")):
        fed = {**data["federation"], "method": "fedavg", "defense": {"robust": robust}}
        assert type(build_strategy(config_from_dict({**data, "federation": fed}), 2)).__name__ == cls


# ------------------------------------------------------------------ property test on random client reports

THETA = {"lora_A": np.zeros((2, 3), dtype=np.float32), "lora_B": np.zeros(3, dtype=np.float32)}
wild = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-1e30, 1e30))


@st.composite
def client_reports(draw):
    k = draw(st.integers(1, 6))
    reports = []
    for cid in range(k):
        scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 1e6, 1e30, math.nan, math.inf]))
        values = np.array(draw(st.lists(st.floats(-1, 1), min_size=9, max_size=9)))
        with np.errstate(all="ignore"):
            flat = (values * scale).astype(np.float32)
        arrays = {"lora_A": flat[:6].reshape(2, 3), "lora_B": flat[6:]}
        metrics = {
            "client-id": cid,
            "reward-mean": draw(wild),
            "reward-std": draw(st.floats(0, 10)),
            "num-examples": draw(st.integers(0, 1000)),
            "accuracy": 0.5,
            "train-time": 1.0,
        }
        reports.append((arrays, metrics))
    return reports


def as_messages(reports):
    """Server-side train messages and the clients' replies to them."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, SUPERLINK_NODE_ID
    messages, replies = [], []
    for node, (arrays, metrics) in enumerate(reports, start=1):
        msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node, message_type="train")
        msg.metadata.__dict__["_message_id"] = f"m{node}"
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
                "metrics": MetricRecord(metrics),
            }
        )
        reply = Message(content, reply_to=msg)
        messages.append(msg)
        replies.append(reply)
    return messages, replies


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(client_reports(), st.sampled_from([None, 3.0]), st.sampled_from(["none", "median", "trimmed_mean"]))
def test_random_reports_give_finite_weights_summing_to_one_and_a_finite_model(reports, norm_clip, robust):
    messages, replies = as_messages(reports)
    ok, failures = screen_replies(messages, replies, THETA, {}, num_clients=6)
    assert len(ok) + len(failures) == len(reports)
    ok, _, _ = clip_replies(ok, THETA, norm_clip, "scale")
    strategy = FGRPO(w_max=0.45, aggregator=robust)
    strategy.current_arrays = {k: v.copy() for k, v in THETA.items()}
    for server_round in (1, 2):  # the second round has baselines, so gains are live
        if not ok:
            return
        new, _ = strategy.aggregate_train(server_round, ok)
        weights = np.array(strategy.last_aggregation.weights)
        assert np.all(np.isfinite(weights)) and np.all(weights >= 0)
        assert weights.sum() == pytest.approx(1.0)
        assert all(np.all(np.isfinite(a.numpy())) for a in new.values())


def test_a_round_zero_that_fails_on_every_client_keeps_nothing_and_advises_no_resume(tmp_path):
    from conftest import small_config_dict

    config = config_from_dict(small_config_dict(tmp_path))
    app = ClientApp()
    app.train()(client_train)
    app.query()(client_init)  # θ₀ comes from a client

    @app.evaluate()
    def broken(msg: Message, context: Context) -> Message:
        raise ValueError("data.jsonl line 3: invalid JSON")

    with pytest.raises(FederationError, match=r"round 0: no client could evaluate.*2 nodes.*line 3") as info:
        run_with(app, config, tmp_path / "run")
    assert "--resume" not in str(info.value)
    assert not (tmp_path / "run").exists()  # no checkpoint of a failed round, nothing to resume into


# ------------------------------------------------------------------ the init reply: θ₀ and the layout come from a peer

THETA0 = {"layer.lora_A.default.weight": np.zeros((2, 3), np.float32), "layer.lora_B.default.weight": np.ones((3, 2), np.float32)}
LAYOUT = {"files": {"adapter_config.json": '{"peft_type": "LORA"}'}, "weights_file": "adapter_model.safetensors",
          "names": {k: k.replace(".default", "") for k in THETA0}}
PROBE = "fgrpo-escape-probe"  # the name every escaping path ends with


def init_content(theta=THETA0, layout=LAYOUT, text=None) -> RecordDict:
    from fgrpo.federation.export import layout_to_text

    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in theta.items()})
    return RecordDict({"arrays": arrays, "config": ConfigRecord({"checkpoint-layout": layout_to_text(layout) if text is None else text})})


def hostile_inits(tmp_path) -> dict[str, tuple[RecordDict, str]]:
    """Init replies a hostile node may send, and the reason the server gives for refusing each."""
    first = next(iter(THETA0))
    with_array = lambda value: {**THETA0, first: value}  # noqa: E731
    return {
        "weights file up": (init_content(layout={**LAYOUT, "weights_file": f"../../{PROBE}"}), "'weights_file' must be one of"),
        "weights file absolute": (init_content(layout={**LAYOUT, "weights_file": str(tmp_path / PROBE)}), "'weights_file' must be one of"),
        "json file up": (init_content(layout={**LAYOUT, "files": {f"../{PROBE}": "{}"}}), "names files the server does not write"),
        "json file in a folder": (init_content(layout={**LAYOUT, "files": {f"a/{PROBE}": "{}"}}), "names files the server does not write"),
        "layout not json": (init_content(text="{oops"), "the checkpoint layout is not JSON"),
        "files a list": (init_content(text='{"files": ["a"], "weights_file": "adapter_model.safetensors", "names": {}}'), "'files' must map"),
        "layout a number": (RecordDict({"arrays": init_content()["arrays"], "config": ConfigRecord({"checkpoint-layout": 5})}), "must be JSON text"),
        "θ₀ NaN": (init_content(theta=with_array(np.full((2, 3), np.nan, np.float32))), "θ₀: non-finite values"),
        "θ₀ 1e30": (init_content(theta=with_array(np.full((2, 3), 1e30, np.float32))), "θ₀: 'layer.lora_A.default.weight' has values beyond"),
        "θ₀ unicode": (init_content(theta=with_array(np.full((2, 3), "x"))), "is <U1, expected floating point"),
        "θ₀ bytes": (init_content(theta=with_array(np.full((2, 3), b"x"))), "is |S1, expected floating point"),
        "θ₀ bool": (init_content(theta=with_array(np.ones((2, 3), bool))), "is bool, expected floating point"),
        "θ₀ int32": (init_content(theta=with_array(np.ones((2, 3), np.int32))), "is int32, expected floating point"),
        "θ₀ not the layout's": (init_content(theta={first: THETA0[first]}), "θ₀ does not match its checkpoint layout"),
    }


def init_app(init_for) -> ClientApp:
    """A model-free ClientApp whose init reply for partition p is `init_for(p)`."""
    from fake_apps import fake_client_app

    app = fake_client_app()

    @app.query()
    def init(msg: Message, context: Context) -> Message:
        return Message(init_for(int(context.node_config["partition-id"])), reply_to=msg)

    return app


def model_free_run(tmp_path, app, num_clients=3, **federation):
    config = config_from_dict({
        "federation": {"method": "fgrpo", "num_clients": num_clients, "rounds": 1, "min_train_clients": 1, **federation},
        "output": {"dir": str(tmp_path / "a" / "run"), "save_adapter": True},
    })
    grid = InProcessGrid(app, [{"partition-id": i, "num-partitions": num_clients} for i in range(num_clients)],
                         run_config={CONFIG_KEY: ""})
    return grid, lambda: run_federation(grid, config, tmp_path / "a" / "run", progress=False)


@pytest.mark.parametrize("case", list(hostile_inits(__import__("pathlib").Path("/nonexistent"))))
def test_a_hostile_init_reply_from_every_node_is_one_clear_error_and_writes_nothing(tmp_path, case):
    content, reason = hostile_inits(tmp_path)[case]
    _, run = model_free_run(tmp_path, init_app(lambda pid: content))
    with pytest.raises(FederationError, match="no client could load the model and send the starting adapter") as info:
        run()
    message = str(info.value)
    assert "3 nodes" in message and "init reply refused: " in message and reason in message
    assert "learning_rate" not in message and "\n" not in message
    assert not list(tmp_path.rglob(f"*{PROBE}*"))
    assert not (tmp_path / "a" / "run").exists()


@pytest.mark.parametrize("case", ["weights file up", "weights file absolute", "json file up", "θ₀ 1e30", "θ₀ bool"])
def test_the_run_goes_on_with_the_next_nodes_init_reply_and_records_the_refusal(tmp_path, case):
    content, reason = hostile_inits(tmp_path)[case]
    grid, run = model_free_run(tmp_path, init_app(lambda pid: content if pid == hostile else init_content()))
    asked_first = min(grid.get_node_ids())  # the server asks the nodes in id order
    hostile = int(grid.contexts[asked_first].node_config["partition-id"])
    run()
    run_dir = tmp_path / "a" / "run"
    (failure,) = records(run_dir, "failure")
    assert failure["node"] == asked_first and failure["round"] == 0
    assert failure["reason"].startswith("init reply refused: ") and reason in failure["reason"]
    assert sorted(p.name for p in (run_dir / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not list(tmp_path.rglob(f"*{PROBE}*"))
