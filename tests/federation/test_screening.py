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
from fgrpo.federation.reply_checks import bind_client, bind_size, check_evaluate_metrics, check_train_metrics, dtype_problem
from fgrpo.federation.screening import capped_sizes
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


def hostile_app(tamper, tamper_init=None) -> ClientApp:
    """Honest replies, except what `tamper(kind, pid, server_round, metrics, arrays)` changes.

    `tamper` returns (metrics, arrays, metrics record name, extra records) or raises;
    `tamper_init(pid, content)` returns the init reply's content in place of the real one.
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
        record = None if arrays is None else ArrayRecord(
            {k: v if isinstance(v, Array) else Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
        )
        return reply(msg, metrics, record, name, extra)

    app.train()(lambda msg, context: handle("train", msg, context))
    app.evaluate()(lambda msg, context: handle("evaluate", msg, context))
    def init(msg: Message, context: Context) -> Message:
        reply = client_init(msg, context)  # θ₀ comes from the real ClientApp (the server holds no model)
        if tamper_init is None:
            return reply
        return Message(tamper_init(int(context.node_config["partition-id"]), reply.content), reply_to=msg)

    app.query()(init)
    return app


def fake_config(tmp_path, method="fgrpo", num_clients=3, rounds=2, save_adapter=False):
    from conftest import small_config_dict

    data = small_config_dict(tmp_path)
    data["federation"] = {**data["federation"], "method": method, "num_clients": num_clients, "rounds": rounds,
                          "min_train_clients": 1, "partition": {"scheme": "iid"}}
    data["output"] = {"dir": str(tmp_path / "run"), "save_adapter": save_adapter}
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


@pytest.mark.parametrize("dtype", ["<U2", "|S1", "bool", "int32", "complex64", "garbage"])
def test_arrays_that_are_not_floating_point_are_a_failure_not_a_crash_or_a_new_model(tmp_path, dtype):
    """Before: unicode and bytes arrays crashed the server (ValueError); bool and int32 were averaged in."""

    def tamper(kind, pid, server_round, metrics, arrays):
        if kind == "train" and pid == 1:
            first = next(iter(arrays))
            arrays[first] = garbage_array(arrays[first].shape) if dtype == "garbage" else arrays[first].astype(dtype)
        return metrics, arrays, "metrics", None

    config = fake_config(tmp_path)
    run_app(hostile_app(tamper), config, tmp_path / "run")
    (reason,) = {r["reason"] for r in records(tmp_path / "run", "failure")}
    if dtype == "garbage":
        assert reason.endswith("does not decode as a numpy array (ValueError)")
    else:
        assert reason.endswith(f"is {np.dtype(dtype)}, expected floating point (float16/float32/float64)")
    assert [r["clients/aggregated"] for r in records(tmp_path / "run", "round")[1:]] == [2, 2]


# ------------------------------------------------------------------ the rules, on their own


def test_init_reply_rules():
    from fgrpo.federation.export import layout_to_text
    from fgrpo.federation.reply_checks import read_init_reply

    theta = {"w": np.zeros((2, 3), np.float32)}
    layout = {"files": {}, "weights_file": "model.safetensors", "names": {"w": "w"}}

    def content(extra=None):
        records = {"arrays": ArrayRecord({"w": Array(theta["w"])}), "config": ConfigRecord({"checkpoint-layout": layout_to_text(layout)})}
        return RecordDict({**records, **(extra or {})})

    got, got_layout = read_init_reply(content())
    assert got_layout == layout and got["w"].tolist() == theta["w"].tolist()
    with pytest.raises(FederationError, match="one ArrayRecord and one ConfigRecord and nothing else"):
        read_init_reply(content({"m": MetricRecord({"x": 1.0})}))
    with pytest.raises(FederationError, match=r"θ₀: 'w' has shape \(2, 3\), the checkpointed run's has \(2, 4\)"):
        read_init_reply(content(), {"w": np.zeros((2, 4), np.float32)})  # --resume onto another adapter's θ_t
    with pytest.raises(FederationError, match="θ₀ does not match the checkpointed run's arrays"):
        read_init_reply(content(), {"v": np.zeros((2, 3), np.float32)})


def test_evaluation_families_are_bounded():
    many = {"client-id": 0, "num-examples": 1001, **{f"acc/f{i}": 0.5 for i in range(1001)}, **{f"n/f{i}": 1 for i in range(1001)}}
    assert check_evaluate_metrics({**many, "acc_heldout": 0.5}, 3).startswith("at most 1000 'acc/<family>' metrics")
    long = {"client-id": 0, "num-examples": 1, "acc_heldout": 0.5, "acc/" + "x" * 201: 0.5, "n/" + "x" * 201: 1}
    assert check_evaluate_metrics(long, 3).startswith("at most 1000")


def test_dtype_rule():
    assert dtype_problem({"a": np.zeros(2, np.float16), "b": np.zeros(2, np.float64)}) is None
    assert dtype_problem({"a": np.zeros(2, ">f4")}) == "array 'a' is >f4, expected floating point (float16/float32/float64)"
    assert dtype_problem({"a": np.zeros(2, np.int8)}).startswith("array 'a' is int8")


def test_unit_weight_must_be_one_when_it_is_the_weight():
    ok = train_metrics(1)
    assert check_train_metrics(ok, 3, "unit-weight") is None
    assert check_train_metrics({**ok, "unit-weight": 10**9}, 3, "unit-weight") == "'unit-weight' must be 1 (every client weighs the same under DP)"


def test_a_size_is_bound_at_first_sight():
    sizes: dict[int, int] = {}
    assert bind_size(0, 10, sizes) is None and sizes == {0: 10}
    assert bind_size(0, 8, sizes) is None  # fewer examples than before: kept
    assert bind_size(0, 11, sizes) == "'num-examples' = 11 is more than the 10 client 0 declared first"
    assert sizes == {0: 10}


def test_capped_sizes_by_hand():
    np.testing.assert_allclose(capped_sizes([10, 10, 1e9]), [10, 10, 20])  # K = 3: at most ½
    np.testing.assert_allclose(capped_sizes([10, 20, 30, 40]), [10, 20, 30, 36])  # K = 4: 36 / 96 = 0.375
    np.testing.assert_allclose(capped_sizes([10, 20, 30, 30]), [10, 20, 30, 30])  # within the cap: as claimed
    np.testing.assert_allclose(capped_sizes([10, 30]), [10, 10])  # K = 2: ½ each
    np.testing.assert_allclose(capped_sizes([0, 7, 1e9]), [0, 7, 7])  # a zero is not a client of the pool
    np.testing.assert_allclose(capped_sizes([1e9]), [1e9])


@given(st.lists(st.integers(0, 10**9), min_size=1, max_size=12))  # the reply rules admit integer counts only
def test_capped_sizes_hold_every_share_to_the_cap_and_change_nothing_within_it(sizes):
    from fgrpo.federation.aggregation import auto_weight_cap

    counted = capped_sizes(sizes)
    claimed = np.asarray(sizes, dtype=np.float64)
    assert np.all(counted <= claimed) and np.all(counted >= 0) and np.all((counted > 0) == (claimed > 0))
    k = int(np.sum(claimed > 0))
    if k >= 1:
        cap = auto_weight_cap(k)
        assert np.all(counted / counted.sum() <= cap + 1e-9)
        if np.all(claimed / claimed.sum() <= cap):
            np.testing.assert_allclose(counted, claimed)


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
# Every kind of array a peer can put in a record; only float16/32/64 in native byte order are weights.
DTYPES = ["<U2", "|S1", "bool", "int8", "int32", "int64", "uint16", "complex64", ">f4", "float16", "float32", "float64"]
PROBE = "fgrpo-escape-probe"  # every path a hostile layout names ends with it
NAMES = [f"../{PROBE}", f"../../{PROBE}", f"../../../{PROBE}", f"a/{PROBE}", "..", ".", "", f"{PROBE}\\x", "x\x00",
         "adapter_config.json", "config.json", "adapter_model.safetensors", "model.safetensors", "ABSOLUTE"]


def mutation(kind: str):
    targets = TRAIN_TARGETS if kind == "train" else EVALUATE_TARGETS
    return st.one_of(
        st.tuples(st.just("drop"), st.sampled_from(targets)),
        st.tuples(st.just("set"), st.sampled_from(targets), st.sampled_from(WILD)),
        st.tuples(st.just("steal"), st.integers(0, 2)),  # another (or its own) client's id
        st.tuples(st.just("rename"), st.sampled_from(["m", "train", "arrays"])),
        st.tuples(st.just("extra"), st.sampled_from(["metrics", "arrays", "config"])),
        st.tuples(st.just("arrays"), st.sampled_from(["none", "nan", "shape", "huge", "garbage"])),
        st.tuples(st.just("dtype"), st.sampled_from(DTYPES)),
        st.tuples(st.just("raise"), st.just(None)),
    )


def garbage_array(shape) -> Array:
    """An Array whose bytes are no numpy array (a peer may send any bytes under any dtype name)."""
    return Array(dtype="float32", shape=tuple(shape), stype="numpy.ndarray", data=b"\x93NUMPY-but-not-really")


def init_mutation():
    """One change to an init reply: θ₀'s values, dtypes or names, or any field of the layout."""
    return st.one_of(
        st.tuples(st.just("theta"), st.sampled_from(["nan", "1e30", "drop", "extra", "garbage", *DTYPES])),
        st.tuples(st.just("weights_file"), st.one_of(st.sampled_from(NAMES), st.integers(), st.none())),
        st.tuples(st.just("files"), st.one_of(
            st.dictionaries(st.sampled_from(NAMES), st.sampled_from(["{}", "[]", "{oops", ""]), max_size=2),
            st.lists(st.sampled_from(NAMES), max_size=2), st.text(max_size=5))),
        st.tuples(st.just("names"), st.sampled_from(["list", "empty", "duplicate", "number", "missing"])),
        st.tuples(st.just("drop_key"), st.sampled_from(["files", "names", "weights_file"])),
        st.tuples(st.just("text"), st.one_of(st.text(max_size=20), st.sampled_from(["[]", "5", "null", "{", "[" * 5000]))),
        st.tuples(st.just("value"), st.sampled_from([5, 1.5, True, b"{}", ["a"]])),
    )


def apply_init_mutation(change, content: RecordDict, tmp_path) -> RecordDict:
    from fgrpo.federation.export import layout_to_text

    what, arg = change
    theta = {k: v.numpy() for k, v in content["arrays"].items()}
    layout = json.loads(str(content["config"]["checkpoint-layout"]))
    first = next(iter(theta))
    garbage = None
    value = None
    name = lambda n: str(tmp_path / PROBE) if n == "ABSOLUTE" else n  # noqa: E731
    if what == "theta":
        if arg == "nan":
            theta[first] = np.full_like(theta[first], np.nan)
        elif arg == "1e30":
            theta[first] = np.full_like(theta[first], 1e30)
        elif arg == "drop":
            theta.pop(first)
        elif arg == "extra":
            theta["extra"] = np.zeros(2, np.float32)
        elif arg == "garbage":
            garbage = first
        else:
            theta[first] = theta[first].astype(arg)
    elif what == "weights_file":
        layout["weights_file"] = name(arg) if isinstance(arg, str) else arg
    elif what == "files":
        layout["files"] = {name(k): v for k, v in arg.items()} if isinstance(arg, dict) else arg
    elif what == "names":
        names = layout["names"]
        layout["names"] = {"list": list(names), "empty": {}, "duplicate": dict.fromkeys(names, "same"),
                           "number": dict.fromkeys(names, 1), "missing": dict(list(names.items())[1:])}[arg]
    elif what == "drop_key":
        layout.pop(arg)
    elif what == "text":
        value = arg
    elif what == "value":
        value = arg
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in theta.items()})
    if garbage is not None:
        arrays[garbage] = garbage_array(theta[garbage].shape)
    return RecordDict({"arrays": arrays, "config": ConfigRecord({"checkpoint-layout": layout_to_text(layout) if value is None else value})})


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
                             "huge": np.full_like(arrays[first], 3e38),
                             "garbage": garbage_array(arrays[first].shape)}[arg]
    elif what == "dtype":
        if arrays is not None:
            first = next(iter(arrays))
            arrays[first] = np.asarray(arrays[first]).astype(arg)
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


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data(), method=st.sampled_from(["fgrpo", "fedavg"]))
def test_random_malformed_replies_never_break_a_run_or_its_numbers(tmp_path, data, method):
    """Any values, dtypes, records, init replies and checkpoint layouts: the run ends, or fails with one clear line.

    Whatever happens, the numbers it logs are finite, and no file is written outside the run's own names.
    """
    plans = {kind: st.lists(mutation(kind), max_size=2) for kind in ("train", "evaluate")}
    init_plan = st.lists(init_mutation(), min_size=1, max_size=2)

    def tamper(kind, pid, server_round, metrics, arrays):
        name, extra = "metrics", None
        # Most replies are honest, so rounds often go through and reach every later stage.
        for change in data.draw(plans[kind] if data.draw(st.booleans()) else st.just([])):
            metrics, arrays, name, extra = apply_mutation(change, metrics, arrays)
        return metrics, arrays, name, extra

    def tamper_init(pid, content):
        for change in data.draw(init_plan if data.draw(st.booleans()) else st.just([])):
            content = apply_init_mutation(change, content, tmp_path)
        return content

    run_dir = tmp_path / "r" / f"run{next(runs)}"  # ../../../ from its adapter folder is tmp_path itself
    try:
        run_app(hostile_app(tamper, tamper_init), fake_config(tmp_path, method, save_adapter=True), run_dir)
    except FederationError as error:
        assert "\n" not in str(error) and "learning_rate" not in str(error)
    check_results(run_dir)
    assert not list(tmp_path.rglob(f"*{PROBE}*"))
    if (run_dir / "adapter").exists():  # only the names save_pretrained writes
        from fgrpo.federation.export import FILE_NAMES

        allowed = set(FILE_NAMES).union(*FILE_NAMES.values())
        assert {p.name for p in (run_dir / "adapter").iterdir()} <= allowed
