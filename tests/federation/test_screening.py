"""Client replies are screened before the server reads them: the run survives any peer.

A hand-made ClientApp sends the replies (it echoes the global adapter, so no
model trains); the real server loop, strategies and in-process grid run.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgrpo.config import config_from_dict, dump_config
from fgrpo.errors import FederationError
from fgrpo.federation.clientapp import client_init
from fgrpo.federation.wire import CONFIG_KEY
from fgrpo.federation.inprocess import InProcessGrid
from fgrpo.federation.reply_checks import bind_client, check_evaluate_metrics, check_train_metrics
from fgrpo.federation.server import run_federation
from fgrpo.deploy.runtime import node_configs


def train_metrics(pid: int) -> dict:
    return {"client-id": pid, "num-examples": 10, "reward-mean": 0.5 + 0.1 * pid, "reward-std": 0.1,
            "accuracy": 0.5, "train-time": 0.01, "kl": 0.0, "unit-weight": 1}


def evaluate_metrics(pid: int) -> dict:
    return {"client-id": pid, "num-examples": 4, "acc_heldout": 0.25 * pid, "acc/add": 0.25 * pid, "n/add": 4}


def reply(msg: Message, metrics: dict, arrays: ArrayRecord | None, metrics_name: str = "metrics", extra=None) -> Message:
    records = {} if arrays is None else {"arrays": arrays}
    records[metrics_name] = MetricRecord(metrics)
    records.update(extra or {})
    return Message(RecordDict(records), reply_to=msg)


def hostile_app(tamper) -> ClientApp:
    """Honest replies, except what `tamper(kind, pid, server_round, metrics, arrays)` changes.

    `tamper` returns (metrics, arrays, metrics record name, extra records) or raises.
    """
    app = ClientApp()

    def handle(kind: str, msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"].get("server-round", 0))
        metrics = train_metrics(pid) if kind == "train" else evaluate_metrics(pid)
        arrays = None
        if kind == "train":  # θ_t plus a small step, so the round has something to average
            arrays = {k: v.numpy() + np.float32(0.01) for k, v in msg.content["arrays"].items()}
        metrics, arrays, name, extra = tamper(kind, pid, server_round, metrics, arrays)
        record = None if arrays is None else ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        return reply(msg, metrics, record, name, extra)

    app.train()(lambda msg, context: handle("train", msg, context))
    app.evaluate()(lambda msg, context: handle("evaluate", msg, context))
    app.query()(client_init)  # θ₀ comes honestly from the real ClientApp (the server holds no model)
    return app


def fake_config(tmp_path, method="fgrpo", num_clients=3, rounds=2):
    from conftest import small_config_dict

    data = small_config_dict(tmp_path)
    data["federation"] = {**data["federation"], "method": method, "num_clients": num_clients, "rounds": rounds,
                          "min_train_clients": 1, "partition": {"scheme": "iid"}}
    data["output"] = {"dir": str(tmp_path / "run"), "save_adapter": False}
    return config_from_dict(data)


def run_app(app, config, run_dir):
    grid = InProcessGrid(app, node_configs(config), run_config={CONFIG_KEY: dump_config(config)})
    return run_federation(grid, config, run_dir, progress=False)


def records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def only(pid, kind, change):
    """A tamper function that changes partition `pid`'s `kind` replies with `change(metrics)`."""

    def tamper(k, p, server_round, metrics, arrays):
        if k == kind and p == pid:
            change(metrics)
        return metrics, arrays, "metrics", None

    return tamper


# ------------------------------------------------------------------ one bad peer, through the real server


def test_a_training_reply_without_accuracy_is_a_failure_not_a_keyerror(tmp_path):
    config = fake_config(tmp_path)
    run_app(hostile_app(only(1, "train", lambda m: m.pop("accuracy"))), config, tmp_path / "run")
    reasons = {r["reason"] for r in records(tmp_path / "run", "failure")}
    assert reasons == {"missing metrics ['accuracy']"}
    assert [r["clients/aggregated"] for r in records(tmp_path / "run", "round")[1:]] == [2, 2]


def test_a_metrics_record_with_another_name_is_read(tmp_path):
    def tamper(kind, pid, server_round, metrics, arrays):
        return metrics, arrays, "stats", None

    config = fake_config(tmp_path)
    run_app(hostile_app(tamper), config, tmp_path / "run")
    assert records(tmp_path / "run", "failure") == []
    assert {r["client"] for r in records(tmp_path / "run", "client") if "agg/weight" in r} == {0, 1, 2}


def test_evaluation_replies_are_screened_like_training_replies(tmp_path):
    def tamper(kind, pid, server_round, metrics, arrays):
        if kind == "evaluate" and pid == 1:
            metrics["acc_heldout"] = 1e9
        if kind == "evaluate" and pid == 2 and server_round == 2:
            metrics.pop("client-id")
        return metrics, arrays, "metrics", None

    config = fake_config(tmp_path)
    run_app(hostile_app(tamper), config, tmp_path / "run")
    rounds = records(tmp_path / "run", "round")
    # client 1 is left out: the pooled accuracy is client 0's 0.0 and client 2's 0.5 (4 examples each)
    assert [r["global/acc_heldout"] for r in rounds] == [0.25, 0.25, 0.0]
    reasons = [(r["round"], r["reason"]) for r in records(tmp_path / "run", "failure")]
    assert (0, "evaluate: 'acc_heldout' must be a finite number in [0, 1]") in reasons
    assert (2, "evaluate: missing metrics ['client-id']") in reasons


@pytest.mark.parametrize("method", ["fgrpo", "fedavg"])
def test_a_node_cannot_take_another_clients_id(tmp_path, method):
    config = fake_config(tmp_path, method)
    run_app(hostile_app(only(2, "train", lambda m: m.update({"client-id": 0}))), config, tmp_path / "run")
    failures = records(tmp_path / "run", "failure")
    assert len(failures) == 2  # rounds 1 and 2, under the impersonator's own id
    assert all(f["client"] == 2 and f["reason"] == "node reported client-id 0, but it is client 2" for f in failures)
    weights = [(r["round"], r["client"]) for r in records(tmp_path / "run", "client") if "agg/weight" in r]
    assert sorted(weights) == [(1, 0), (1, 1), (2, 0), (2, 1)]


@pytest.mark.parametrize("method", ["fgrpo", "fedavg"])
def test_two_nodes_claiming_one_new_id_get_neither(tmp_path, method):
    def tamper(kind, pid, server_round, metrics, arrays):
        if pid == 2:
            metrics["client-id"] = 1  # from the very first reply: nobody holds id 1 yet
        return metrics, arrays, "metrics", None

    config = fake_config(tmp_path, method)
    run_app(hostile_app(tamper), config, tmp_path / "run")
    round0 = [f for f in records(tmp_path / "run", "failure") if f["round"] == 0]
    assert [f["reason"] for f in round0] == ["evaluate: client-id 1 was reported by several nodes in this round"] * 2
    assert {r["client"] for r in records(tmp_path / "run", "client") if r["round"] == 0} == {0}


def test_a_node_cannot_switch_to_a_second_id(tmp_path):
    config = fake_config(tmp_path, num_clients=4)
    run_app(hostile_app(only(1, "train", lambda m: m.update({"client-id": 3}))), config, tmp_path / "run")
    reasons = {r["reason"] for r in records(tmp_path / "run", "failure")}
    assert reasons == {"node reported client-id 3, but it is client 1"}


@pytest.mark.parametrize("client_id", [2**53, 2**63 - 1, -1, 3])
def test_fgrpo_survives_an_id_out_of_range(tmp_path, client_id):
    config = fake_config(tmp_path)
    run_app(hostile_app(only(0, "train", lambda m: m.update({"client-id": client_id}))), config, tmp_path / "run")
    assert {r["reason"] for r in records(tmp_path / "run", "failure")} == {"'client-id' must be an integer in [0, 2] (federation.num_clients = 3)"}


def test_a_non_finite_reward_never_reaches_fgrpos_gain(tmp_path):
    config = fake_config(tmp_path)
    run_app(hostile_app(only(0, "train", lambda m: m.update({"reward-mean": math.inf}))), config, tmp_path / "run")
    assert {r["reason"] for r in records(tmp_path / "run", "failure")} == {"metrics ['reward-mean'] must be finite numbers"}
    assert all(r.get("agg/gain") is not None for r in records(tmp_path / "run", "client") if "agg/weight" in r)


# ------------------------------------------------------------------ the rules, on their own


def test_train_metrics_rules():
    ok = train_metrics(1)
    assert check_train_metrics(ok, 3) is None
    assert check_train_metrics({**ok, "accuracy": 1.5}, 3) == "'accuracy' must be a finite number in [0, 1]"
    assert check_train_metrics({**ok, "num-examples": 2.0}, 3) == "'num-examples' must be an integer in [0, 1000000000]"
    assert check_train_metrics({**ok, "client-id": 1.0}, 3).startswith("'client-id' must be an integer")
    assert check_train_metrics({**ok, "kl": math.nan}, 3) == "metrics ['kl'] must be finite numbers"
    assert check_train_metrics({**ok, "train-time": -1.0}, 3) == "'train-time' must be >= 0 and bounded"


def test_evaluate_metrics_rules():
    ok = evaluate_metrics(1)
    assert check_evaluate_metrics(ok, 3) is None
    assert "unmatched: ['add']" in check_evaluate_metrics({k: v for k, v in ok.items() if k != "n/add"}, 3)
    assert check_evaluate_metrics({**ok, "n/add": 3}, 3) == "the 'n/<family>' counts do not add up to num-examples = 4"
    assert check_evaluate_metrics({"client-id": 0, "num-examples": 0}, 3) is None
    assert check_evaluate_metrics({"client-id": 0, "num-examples": 2}, 3) == "missing metric 'acc_heldout' (num-examples = 2)"


def test_binding_holds_for_the_whole_run():
    bindings: dict[int, int] = {}
    assert bind_client(11, 0, bindings) is None and bindings == {11: 0}
    assert bind_client(11, 0, bindings) is None
    assert bind_client(22, 0, bindings) == "client-id 0 belongs to node 11"
    assert bind_client(11, 1, bindings) == "node reported client-id 1, but it is client 0"
    assert bindings == {11: 0}


# ------------------------------------------------------------------ property: any peer, full rounds

TRAIN_TARGETS = ["client-id", "num-examples", "reward-mean", "reward-std", "accuracy", "train-time", "kl", "unit-weight"]
EVALUATE_TARGETS = ["client-id", "num-examples", "acc_heldout", "acc/add", "n/add"]
WILD = [math.nan, math.inf, -math.inf, -1, -1.0, 0, 0.5, 1.5, 2, 1e9, 1e300, 2**31, 2**53, 2**63 - 1]


def mutation(kind: str):
    targets = TRAIN_TARGETS if kind == "train" else EVALUATE_TARGETS
    return st.one_of(
        st.tuples(st.just("drop"), st.sampled_from(targets)),
        st.tuples(st.just("set"), st.sampled_from(targets), st.sampled_from(WILD)),
        st.tuples(st.just("steal"), st.integers(0, 2)),  # another (or its own) client's id
        st.tuples(st.just("rename"), st.sampled_from(["m", "train", "arrays"])),
        st.tuples(st.just("extra"), st.sampled_from(["metrics", "arrays", "config"])),
        st.tuples(st.just("arrays"), st.sampled_from(["none", "nan", "shape", "huge"])),
        st.tuples(st.just("raise"), st.just(None)),
    )


def apply_mutation(change, metrics, arrays):
    name, extra = "metrics", None
    what, arg, *rest = change
    if what == "drop":
        metrics.pop(arg, None)
    elif what == "set":
        metrics[arg] = rest[0]
    elif what == "steal":
        metrics["client-id"] = arg
    elif what == "rename":
        name = arg if arg != "arrays" or arrays is None else "metrics"
    elif what == "extra":
        extra = {
            "extra": {
                "metrics": MetricRecord({"x": 1.0}),
                "arrays": ArrayRecord({"x": Array(np.zeros(2, dtype=np.float32))}),
                "config": ConfigRecord({"x": "y"}),
            }[arg]
        }
    elif what == "arrays":
        if arg == "none":
            arrays = None
        elif arrays is not None:
            first = next(iter(arrays))
            arrays[first] = {"nan": np.full_like(arrays[first], np.nan), "shape": np.zeros(3, np.float32),
                             "huge": np.full_like(arrays[first], 3e38)}[arg]
    elif what == "raise":
        raise RuntimeError("peer crashed")
    return metrics, arrays, name, extra


def finite_numbers(value, where=""):
    """Every number in a JSON value, with where it is; NaN / Infinity tokens are refused while parsing."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from finite_numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from finite_numbers(item, f"{where}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield where, value


def strict_json(text: str):
    def refuse(token):
        raise AssertionError(f"non-finite {token} in JSON")

    return json.loads(text, parse_constant=refuse)


def check_results(run_dir):
    if not (run_dir / "metrics.jsonl").exists():
        return
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    files = [strict_json(line) for line in lines]
    if (run_dir / "summary.json").exists():
        files.append(strict_json((run_dir / "summary.json").read_text()))
    for record in files:
        for where, number in finite_numbers(record):
            assert math.isfinite(number), (where, record)
            if "acc" in where:
                assert 0.0 <= number <= 1.0, (where, record)
        if record.get("kind") == "client":
            assert None not in record.values(), record  # a client's metric was never NaN
            assert 0 <= record["client"] < 3


runs = itertools.count()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data(), method=st.sampled_from(["fgrpo", "fedavg"]))
def test_random_malformed_replies_never_break_a_run_or_its_numbers(tmp_path, data, method):
    plans = {kind: st.lists(mutation(kind), max_size=2) for kind in ("train", "evaluate")}

    def tamper(kind, pid, server_round, metrics, arrays):
        name, extra = "metrics", None
        # Most replies are honest, so rounds often go through and reach every later stage.
        for change in data.draw(plans[kind] if data.draw(st.booleans()) else st.just([])):
            metrics, arrays, name, extra = apply_mutation(change, metrics, arrays)
        return metrics, arrays, name, extra

    run_dir = tmp_path / f"run{next(runs)}"
    try:
        run_app(hostile_app(tamper), fake_config(tmp_path, method), run_dir)
    except FederationError as error:
        assert "\n" not in str(error)
    check_results(run_dir)
