"""A node owns its data and its code: server-sent paths and modules are refused unless the node allows them."""

from __future__ import annotations

import json
import os

import pytest
from flwr.app import Context, RecordDict

from fgrpo.config import config_from_dict, dump_config
from fgrpo.data.node_spec import NodeSpec, load_node_data_config, node_spec, node_tasks
from fgrpo.errors import ConfigError, DataError, FederationError
from fgrpo.federation.clientapp import client_app, node_config_from_context, node_data
from fgrpo.federation.wire import CONFIG_KEY
from fgrpo.federation.inprocess import InProcessGrid
from fgrpo.federation.server import run_federation

SECRET = "patient-4711-diagnosis"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def node_context(config, **node) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 1, **node},
                   state=RecordDict(), run_config={CONFIG_KEY: dump_config(config)})


def files_config(tmp_path, path, **tasks):
    from conftest import small_config_dict

    data = small_config_dict(tmp_path)
    data["tasks"] = {**data["tasks"], "files": [{"path": str(path)}], **tasks}
    return config_from_dict(data)


def test_a_node_refuses_files_the_server_names(tmp_path):
    path = write_jsonl(tmp_path / "private.jsonl", [{"prompt": "1+1=", "answer": "2"}] * 5)
    config = files_config(tmp_path, path)
    with pytest.raises(ConfigError, match=r"does not read files the server names \(tasks.files\[0\].path\).*allow-server-data=true"):
        node_data(node_context(config))
    assert len(node_data(node_context(config, **{"allow-server-data": True})).train) > 0


def test_a_deployed_run_that_names_files_stops_at_round_zero_with_the_nodes_reason(tmp_path):
    path = write_jsonl(tmp_path / "private.jsonl", [{"prompt": "1+1=", "answer": "2"}] * 5)
    config = files_config(tmp_path, path)
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]  # SuperNodes that allow nothing
    grid = InProcessGrid(client_app, nodes, run_config={CONFIG_KEY: dump_config(config)})
    with pytest.raises(FederationError, match=r"round 0: .*2 nodes.*does not read files the server names"):
        run_federation(grid, config, tmp_path / "run", progress=False)


def test_a_node_refuses_reward_code_the_server_names():
    from fgrpo.config import TasksConfig

    tasks = TasksConfig(rewards=[{"name": "exact_match"}, {"name": "evil.module:run"}])
    with pytest.raises(ConfigError, match=r"does not import code the server names \(tasks.rewards\[1\].name\)"):
        node_tasks(tasks, NodeSpec())
    assert node_tasks(tasks, NodeSpec(allow_server_code=True)) is tasks
    assert node_tasks(TasksConfig(rewards=[{"name": "exact_match"}]), NodeSpec()).rewards[0].name == "exact_match"


def test_a_nodes_data_config_is_its_only_source_of_data_and_reward_code(tmp_path):
    (tmp_path / "owner").mkdir()
    write_jsonl(tmp_path / "owner" / "mine.jsonl", [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(10)])
    (tmp_path / "owner" / "owner.toml").write_text(
        '[[files]]\npath = "mine.jsonl"\nfamily = "mine"\n\n[[rewards]]\nname = "partial_credit"\n'
    )
    elsewhere = write_jsonl(tmp_path / "server-chose.jsonl", [{"prompt": "x", "answer": "1"}])
    config = files_config(tmp_path, elsewhere, rewards=[{"name": "evil.module:run"}])
    context = node_context(config, **{"data-config": str(tmp_path / "owner" / "owner.toml")})
    data = node_data(context)
    assert {ex.family for ex in data.train + data.test} == {"mine"}  # not the server's file, nor its families
    assert len(data.train) + len(data.test) == 10
    tasks = node_config_from_context(context).tasks
    assert tasks.families == []  # the node trains on its own data only, not on the run's families
    from fgrpo.federation.clientapp import learner_config_text
    from fgrpo.federation.wire import config_from_text, config_text

    # The policy is built from the run's config: the tiny model's warm start (so the base model) is the server's.
    assert config_from_text(learner_config_text(config_text(context))).tasks.families == config.tasks.families
    assert [r.name for r in tasks.rewards] == ["partial_credit"]
    assert [f.path for f in tasks.files] == [str((tmp_path / "owner" / "mine.jsonl").resolve())]


def test_a_data_config_with_an_unknown_key_is_refused(tmp_path):
    (tmp_path / "owner.toml").write_text('[[file]]\npath = "x.jsonl"\n')
    with pytest.raises(ConfigError, match=r"data-config .*unknown key 'file' — did you mean 'files'"):
        load_node_data_config(tmp_path / "owner.toml")
    with pytest.raises(ConfigError, match="allow-server-data = 'yes' must be true or false"):
        node_spec({"allow-server-data": "yes"})


@pytest.mark.parametrize("bad_row", [{"prompt": "1+1=", "answer": {"note": SECRET}}, {"prompt": ["not", SECRET], "answer": "2"}])
def test_errors_that_leave_the_node_quote_no_data(tmp_path, bad_row):
    path = write_jsonl(tmp_path / "private.jsonl", [{"prompt": "1+1=", "answer": "2"}, bad_row])
    config = files_config(tmp_path, path)
    with pytest.raises(DataError) as info:  # the server chose the path and the node allowed it: the worst case
        node_data(node_context(config, **{"allow-server-data": True}))
    message = str(info.value)
    assert "private.jsonl line 2" in message and SECRET not in message and "not" not in message.split(":")[-1]


def test_a_malformed_source_file_is_reduced_to_its_kind(tmp_path):
    (tmp_path / "data.csv").write_text(f'question,answer\n"{SECRET}",\n')
    from conftest import small_config_dict

    data = small_config_dict(tmp_path)
    data["tasks"] = {**data["tasks"], "sources": [{"name": "s", "path": str(tmp_path / "data.csv")}]}
    config = config_from_dict(data)
    with pytest.raises(DataError) as info:
        node_data(node_context(config, **{"allow-server-data": True}))
    assert SECRET not in str(info.value) and "data.csv" in str(info.value)


def test_flower_commands_say_that_nodes_refuse_server_named_files(tmp_path):
    from typer.testing import CliRunner

    from fgrpo.cli import app

    path = write_jsonl(tmp_path / "private.jsonl", [{"prompt": "1+1=", "answer": "2"}] * 5)
    (tmp_path / "c.toml").write_text(f'[[tasks.files]]\npath = "{path}"\n[federation]\nnum_clients = 2\n')
    result = CliRunner().invoke(app, ["flower", "commands", str(tmp_path / "c.toml")])
    assert result.exit_code == 0, result.output
    assert "the config names tasks.files[0].path: SuperNodes refuse server-chosen files and code" in result.output


def test_a_data_config_with_only_rewards_keeps_the_runs_partition(tmp_path):
    from conftest import small_config_dict

    (tmp_path / "owner.toml").write_text('[[rewards]]\nname = "partial_credit"\n')
    config = config_from_dict(small_config_dict(tmp_path))
    context = node_context(config, **{"data-config": str(tmp_path / "owner.toml")})
    assert {ex.family for ex in node_data(context).train} == {"add", "sort"}  # the built-in families, partitioned
    assert [r.name for r in node_config_from_context(context).tasks.rewards] == ["partial_credit"]


def test_model_and_template_paths_the_server_names_are_read_only_where_the_node_allows_it(tmp_path, monkeypatch):
    from fgrpo.config import ModelConfig
    from fgrpo.data.node_spec import node_model
    from fgrpo.errors import ModelError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local-model").mkdir(parents=True)
    for source in ("tiny", "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"):  # named models and hub ids
        assert node_model(ModelConfig(source=source), NodeSpec()).source == source
    for source in ("/etc", "/no/such/model", "./m", "~/m", "a/b/c", "model.gguf", "org/local-model"):
        with pytest.raises(ModelError, match=r"cannot be used on this node") as refused:
            node_model(ModelConfig(source=source), NodeSpec())
        assert refused.value.public == str(refused.value)  # it may leave the node as it is
        assert node_model(ModelConfig(source=source), NodeSpec(allow_server_data=True)).source == source
    mine = node_model(ModelConfig(source="/etc"), NodeSpec(model_source="/models/mine"))
    assert mine.source == "/models/mine"  # the node's own copy, whatever the run names


def test_a_server_named_template_fails_the_same_way_whatever_the_node_holds(tmp_path, monkeypatch):
    from pathlib import Path

    from fgrpo.config import ModelConfig
    from fgrpo.data.node_spec import node_model

    (tmp_path / "present.jinja").write_text("{{ messages[0]['content'] }}")
    (tmp_path / "latin1.jinja").write_bytes(b"\xe9")
    (tmp_path / "locked.jinja").write_text("x")
    real_read = Path.read_text

    def read_text(path, *args, **kwargs):  # the tests run as root, which chmod cannot lock out
        if path.name == "locked.jinja":
            raise PermissionError(13, "Permission denied")
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)

    def seen(name: str, spec: NodeSpec) -> str:
        path = str(tmp_path / name)
        with pytest.raises(ConfigError) as refused:
            node_model(ModelConfig(chat_template=path), spec)
        return str(refused.value).replace(path, "PATH")

    views = {seen("present.jinja", NodeSpec())}  # refused: the node does not read files the server names
    allowed = NodeSpec(allow_server_data=True)
    os.mkfifo(tmp_path / "fifo.jinja")  # reading it would never end
    views |= {seen(name, allowed) for name in ("missing.jinja", "locked.jinja", "latin1.jinja", "", "fifo.jinja")}
    assert len(views) == 1 and "cannot be used on this node" in views.pop()
    template = str(tmp_path / "present.jinja")
    assert node_model(ModelConfig(chat_template=template), allowed).chat_template == template
    own = node_model(ModelConfig(chat_template="/etc/passwd"), NodeSpec(chat_template=template))
    assert own.chat_template == template  # the node's own template: the run's path is never opened
    with pytest.raises(ConfigError) as missing:
        node_model(ModelConfig(), NodeSpec(chat_template=str(tmp_path / "secret-name.jinja")))
    assert "secret-name" in str(missing.value) and "secret-name" not in missing.value.public


def test_node_config_values_stay_on_the_node(tmp_path):
    from fgrpo.data.node_spec import public_message

    (tmp_path / "owner.toml").write_text(f'size = "{SECRET}"\n[[families]]\nname = "add"\n')
    with pytest.raises(ConfigError) as invalid:
        load_node_data_config(tmp_path / "owner.toml")
    assert SECRET in str(invalid.value)  # the node's own operator sees the value
    assert SECRET not in public_message(invalid.value) and "size" in public_message(invalid.value)
    with pytest.raises(ConfigError) as flag:
        node_spec({"allow-server-data": SECRET})
    assert SECRET not in public_message(flag.value) and "allow-server-data must be true or false" in public_message(flag.value)
    with pytest.raises(ConfigError) as out_of_range:
        node_data(node_context(config_from_dict(__import__("conftest").small_config_dict(tmp_path)),
                               **{"partition-id": 4711, "num-partitions": 2}))
    assert "4711" in str(out_of_range.value) and "4711" not in public_message(out_of_range.value)
    missing, locked = FileNotFoundError(2, "No such file", "/x"), PermissionError(13, "Permission denied", "/x")
    assert public_message(missing) == public_message(locked)


def test_flower_commands_say_that_nodes_refuse_a_server_named_model_path(tmp_path):
    from typer.testing import CliRunner

    from fgrpo.cli import app

    (tmp_path / "c.toml").write_text('[model]\nsource = "/models/mine"\nchat_template = "/models/chat.jinja"\n'
                                     "[federation]\nnum_clients = 2\n")
    result = CliRunner().invoke(app, ["flower", "commands", str(tmp_path / "c.toml")])
    assert result.exit_code == 0, result.output
    assert "the config names model.source, model.chat_template: SuperNodes refuse" in result.output
    assert "model-source / chat-template" in result.output
