"""The ClientApp's view of a node: per-owner data and reward functions ([[federation.clients]] / a data-config)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fgrpo.config import config_from_dict, dump_config
from fgrpo.errors import ConfigError
from fgrpo.federation.clientapp import learner_config_text, node_config_from_context, node_data, shared_learner
from fgrpo.federation.wire import CONFIG_KEY

SIMULATED = {"allow-server-data": True, "allow-server-code": True}  # what `fgrpo run` gives its nodes


def owners_config(tmp_path, **federation):
    """Three owners: different data, different reward functions, different reward scales."""
    from conftest import small_config_dict

    path = tmp_path / "clinic.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"double {i} =", "answer": str(2 * i)}) + "\n" for i in range(30)))
    data = small_config_dict(tmp_path)
    data["federation"] = {
        **data["federation"],
        "min_train_clients": 1,
        "clients": [
            {"name": "adder", "families": [{"name": "add", "difficulty": 1}], "rewards": [{"name": "exact_match"}]},
            {"name": "sorter", "families": [{"name": "sort", "difficulty": 2}], "rewards": [{"name": "partial_credit"}],
             "reward_scale": [-1.0, 1.0]},
            {"name": "clinic", "files": [{"path": str(path), "family": "doubling"}], "rewards": [{"name": "format"}],
             "reward_scale": [0.0, 10.0], "size": 5},
        ],
        **federation,
    }
    del data["federation"]["num_clients"]  # follows the list
    return config_from_dict(data)


def context(config, partition_id, **node) -> Context:
    return Context(run_id=1, node_id=100 + partition_id, state=RecordDict(), run_config={CONFIG_KEY: dump_config(config)},
                   node_config={"partition-id": partition_id, "num-partitions": len(config.federation.clients), **node})


def test_each_simulated_client_holds_exactly_its_owners_data(tmp_path):
    config = owners_config(tmp_path)
    assert config.federation.num_clients == 3
    shares = [node_data(context(config, k, **SIMULATED)) for k in range(3)]
    assert [{ex.family for ex in s.train + s.test} for s in shares] == [{"add"}, {"sort"}, {"doubling"}]
    assert [{ex.meta["owner"] for ex in s.train + s.test} for s in shares] == [{"adder"}, {"sorter"}, {"clinic"}]
    assert len(shares[2].train) == 5  # size
    # size unset: all of them (counted without the validation carve, which takes every copy of a carved prompt)
    uncarved = config.model_copy(update={"tasks": config.tasks.model_copy(update={"validation_per_family": 0})})
    assert len(node_data(context(uncarved, 0, **SIMULATED)).train) == config.tasks.train_per_family
    assert {ex.reward_scale for ex in shares[1].train} == {(-1.0, 1.0)} and {ex.reward_scale for ex in shares[2].train} == {(0.0, 10.0)}
    prompts = [{ex.prompt for ex in s.train + s.test + s.validation} for s in shares]
    assert not prompts[0] & prompts[1] and not prompts[0] & prompts[2] and not prompts[1] & prompts[2]
    # The node's config holds its own entry only: nothing downstream can read another owner's spec.
    node = node_config_from_context(context(config, 1, **SIMULATED))
    assert node.federation.clients == [] and [f.name for f in node.tasks.families] == ["sort"]
    assert "clinic.jsonl" not in dump_config(node)


def test_owners_with_different_reward_functions_score_the_same_completion_differently(tmp_path):
    from fgrpo.data.rewards import compute_rewards

    config = owners_config(tmp_path)
    example = node_data(context(config, 0, **SIMULATED)).train[0]  # an 'add' prompt
    wrong = "9" + example.answer  # well formed, wrong: exact 0, partial credit > 0, format 1
    rewards = []
    for k in range(3):
        reward = shared_learner(context(config, k, **SIMULATED)).reward
        rewards.append(float(compute_rewards([example], [wrong], reward).scores[0]))
    assert rewards[0] == 0.0 and 0.0 < rewards[1] < 1.0 and rewards[2] == 1.0
    # ... while every owner trains the same policy (one model in the process).
    learners = {id(shared_learner(context(config, k, **SIMULATED)).model) for k in range(3)}
    assert len(learners) == 1


def test_a_deployed_node_takes_only_its_own_entry_and_only_what_it_allows(tmp_path):
    config = owners_config(tmp_path)
    with pytest.raises(ConfigError, match=r"does not read files the server names \(federation\.clients\[2\]\.files\[0\]\.path\)"):
        node_data(context(config, 2))  # a SuperNode that allows nothing
    assert {ex.family for ex in node_data(context(config, 0)).train} == {"add"}  # families name no file: fine
    with pytest.raises(ConfigError, match=r"partition-id = 3, but federation.clients lists 3 owners"):
        node_data(context(config, 3, **SIMULATED))
    coded = owners_config(tmp_path).model_dump()
    coded["federation"]["clients"][0]["rewards"] = [{"name": "evil.module:run"}]
    coded = config_from_dict(coded)
    with pytest.raises(ConfigError, match=r"does not import code the server names \(federation\.clients\[0\]\.rewards\[0\]\.name\)"):
        node_config_from_context(context(coded, 0))


def test_a_data_config_holds_the_same_owner_spec_as_a_federation_clients_entry(tmp_path):
    """Deployment: node k's own file with entry k's keys gives the same examples and rewards as the simulation."""
    import tomli_w

    config = owners_config(tmp_path)
    entry = config.federation.clients[2].model_dump(exclude_none=True)
    (tmp_path / "owner.toml").write_text(tomli_w.dumps(entry))
    run = config.model_copy(update={"federation": config.federation.model_copy(update={"clients": []})})  # the server lists no owners
    deployed = node_data(context(run, 2, **{"data-config": str(tmp_path / "owner.toml")}))
    simulated = node_data(context(config, 2, **SIMULATED))
    assert [ex.prompt for ex in deployed.train] == [ex.prompt for ex in simulated.train]
    assert [ex.prompt for ex in deployed.test] == [ex.prompt for ex in simulated.test]
    assert deployed.train[0].meta["owner"] == "clinic" and deployed.train[0].reward_scale == (0.0, 10.0)
    rewards = shared_learner(context(run, 2, **{"data-config": str(tmp_path / "owner.toml")})).reward
    assert [t.name for t in rewards.terms] == ["format"]


def test_the_policy_ignores_data_and_rewards_so_in_process_owners_share_it(tmp_path):
    from fgrpo.federation.wire import config_from_text

    config = owners_config(tmp_path)
    learner = config_from_text(learner_config_text(dump_config(config)))
    assert learner.federation.clients == [] and [r.name for r in learner.tasks.rewards] == ["exact_match"]
    assert learner.tasks.families == config.tasks.families  # the tiny model's warm start


def test_a_centralized_run_pools_every_owner_and_scores_each_example_with_its_owners_rewards(tmp_path):
    from fgrpo.data.rewards import compute_rewards

    config = owners_config(tmp_path, method="centralized")
    pooled = node_data(Context(run_id=1, node_id=5, state=RecordDict(), run_config={CONFIG_KEY: dump_config(config)},
                               node_config={"partition-id": 0, "num-partitions": 1, **SIMULATED}))
    shares = [node_data(context(owners_config(tmp_path), k, **SIMULATED)) for k in range(3)]
    assert [ex.prompt for ex in pooled.train] == [ex.prompt for s in shares for ex in s.train]
    reward = shared_learner(Context(run_id=1, node_id=5, state=RecordDict(), run_config={CONFIG_KEY: dump_config(config)},
                                    node_config={"partition-id": 0, "num-partitions": 1, **SIMULATED})).reward
    batch = [shares[0].train[0], shares[1].train[0]]
    batch = [batch[0], batch[0].__class__(batch[0].prompt, batch[0].answer, batch[0].family, (0.0, 1.0), "exact",
                                          {"owner": "sorter"})]  # the same example, scored as each owner
    wrong = "9" + batch[0].answer
    scores = compute_rewards(batch, [wrong, wrong], reward).scores
    assert scores[0] == 0.0 and 0.0 < scores[1] < 1.0


def test_an_unknown_reward_function_of_an_owner_names_its_key(tmp_path):
    data = owners_config(tmp_path).model_dump()
    data["federation"]["clients"][1]["rewards"] = [{"name": "partial_credit"}, {"name": "exact_mach"}]
    with pytest.raises(ConfigError, match=r"federation\.clients\[1\]\.rewards\[1\]\.name: unknown reward function 'exact_mach'"):
        shared_learner(context(config_from_dict(data), 1, **SIMULATED))


def test_a_three_owner_run_in_process_trains_each_owner_on_its_own_reward(tmp_path):
    from fgrpo.deploy.runtime import run_simulation

    config = owners_config(tmp_path, rounds=1)
    run_simulation(config, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = {r["client"]: r["client/reward_mean"] for r in records if r.get("round") == 1 and "client/reward_mean" in r}
    assert sorted(rewards) == [0, 1, 2]
    assert 0.0 <= rewards[0] <= 1.0 and -1.0 <= rewards[1] <= 1.0 and 0.0 <= rewards[2] <= 10.0
    assert np.isfinite(list(rewards.values())).all()


def server_view(tmp_path, config, **node) -> str:
    """What the server learns when the nodes fail: its error, and the failure records of metrics.jsonl."""
    from fgrpo.errors import FederationError
    from fgrpo.federation.clientapp import client_app
    from fgrpo.federation.inprocess import InProcessGrid
    from fgrpo.federation.server import run_federation

    nodes = [{"partition-id": i, "num-partitions": 2, **node} for i in range(2)]
    grid = InProcessGrid(client_app, nodes, run_config={CONFIG_KEY: dump_config(config)})
    with pytest.raises(FederationError) as failed:
        run_federation(grid, config, tmp_path / "run", progress=False)
    metrics = tmp_path / "run" / "metrics.jsonl"
    seen = str(failed.value).replace(str(tmp_path), "TMP") + (metrics.read_text() if metrics.exists() else "")
    return re.sub(r"nodes \([^)]*\)", "nodes (…)", seen)  # node ids are drawn at random


def test_a_reward_functions_message_never_leaves_the_node(tmp_path, monkeypatch, caplog):
    from conftest import small_config_dict

    (tmp_path / "leaky_reward.py").write_text(
        "def reward(prompts, completions, answer, **kwargs):\n"
        "    raise ValueError(f'expected SECRET-ANSWER-5-6, got {completions[0]!r}')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("fgrpo.federation.clientapp._LOGGED", set())  # the node logs each public text once
    data = small_config_dict(tmp_path)
    data["tasks"]["rewards"] = [{"name": "leaky_reward:reward"}]
    data["federation"]["rounds"] = 1
    with caplog.at_level("WARNING", logger="fgrpo.federation.clientapp"):
        seen = server_view(tmp_path, config_from_dict(data), **SIMULATED)
    assert "RewardError: reward function reward raised ValueError (its message stays in the node's log)" in seen
    assert "SECRET-ANSWER" not in seen
    assert "SECRET-ANSWER-5-6" in caplog.text  # the node's operator still reads it


def test_a_chat_templates_own_error_never_leaves_the_node(tmp_path):
    from conftest import small_config_dict

    template = tmp_path / "chat.jinja"
    template.write_text("{{ raise_exception('NODE-SECRET-42') }}")
    data = small_config_dict(tmp_path)
    data["model"]["chat_template"] = str(template)
    seen = server_view(tmp_path, config_from_dict(data), **SIMULATED)
    assert "ModelError: failed on this node with a message that may quote its files" in seen
    assert "NODE-SECRET-42" not in seen
    refused = server_view(tmp_path, config_from_dict(data))  # nodes that read no file the server names
    assert "model.chat_template = 'TMP/chat.jinja' cannot be used on this node" in refused


def test_a_server_named_model_path_looks_the_same_whether_it_exists_or_not(tmp_path):
    from conftest import small_config_dict

    def view(source: str, **node) -> str:
        data = small_config_dict(tmp_path)
        data["model"]["source"] = source
        return server_view(tmp_path, config_from_dict(data), **node).replace(source, "SOURCE")

    for node in ({}, SIMULATED):  # refused, or allowed and failing to load
        seen = {view(source, **node) for source in ("/etc", "/no/such/fgrpo-model", "/tmp")}
        assert len(seen) == 1, seen
        assert "model.source = 'SOURCE' cannot be used on this node" in seen.pop()


def test_a_nodes_own_model_source_is_not_sent_in_the_layout(tmp_path):
    from flwr.app import Message, MessageType
    from flwr.app import ConfigRecord

    from fgrpo.federation import wire
    from fgrpo.federation.clientapp import client_init
    from fgrpo.federation.export import layout_from_text

    config = config_from_dict(__import__("conftest").small_config_dict(tmp_path))
    node = context(config, 0, **{"model-source": "tiny", "num-partitions": 2})
    layout = layout_from_text(str(client_init(
        Message(RecordDict({wire.CONFIG: ConfigRecord({})}), dst_node_id=100, message_type=MessageType.QUERY), node
    ).content[wire.CONFIG][wire.CHECKPOINT_LAYOUT]))
    assert json.loads(layout["files"]["adapter_config.json"])["base_model_name_or_path"] == config.model.source
