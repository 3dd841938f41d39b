"""deploy.commands and the `fgrpo flower` commands on bad input: one clear error each, never a user's file replaced.

These need no Flower binaries (nothing is started)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fgrpo.cli import app
from fgrpo.deploy import commands
from fgrpo.errors import ConfigError


def invoke(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "[::1]", "superlink.example.org", "node-1"])
def test_check_host_accepts_addresses_and_dns_names(host):
    assert commands.check_host(host) == host


@pytest.mark.parametrize("host, message", [("", "is empty"), ("  ", "is empty"), ("bad host!", "neither an IP"),
                                           ("-x.org", "neither an IP"), ("a..b", "neither an IP")])
def test_check_host_refuses_what_flower_would_take_and_fail_on_later(host, message):
    with pytest.raises(ConfigError, match=message):
        commands.check_host(host)


@pytest.mark.parametrize("address, expected", [("127.0.0.1:9093", ("127.0.0.1", 9093)), ("[::1]:9093", ("[::1]", 9093)),
                                               ("link.example.org:1", ("link.example.org", 1))])
def test_parse_address(address, expected):
    assert commands.parse_address(address) == expected


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:70000", "::1:9093", ":9093", "h:x"])
def test_parse_address_refuses_a_missing_or_bad_port_and_host(address):
    with pytest.raises(ConfigError, match="SuperLink address"):
        commands.parse_address(address)


def test_join_address_brackets_ipv6():
    assert commands.join_address("::1", 9093) == "[::1]:9093" and commands.join_address("h", 1) == "h:1"


# ------------------------------------------------------------------ fgrpo flower certs / keys


def test_certs_keep_the_users_own_files_even_with_overwrite(tmp_path):
    (tmp_path / "ca.crt").write_text("MY CA")
    refused = invoke("flower", "certs", tmp_path)
    assert refused.exit_code == 2 and "already holds ca.crt" in refused.output and "--overwrite" in refused.output
    forced = invoke("flower", "certs", tmp_path, "--overwrite")
    assert forced.exit_code == 2 and "refusing to overwrite ca.crt" in forced.output
    assert (tmp_path / "ca.crt").read_text() == "MY CA" and not (tmp_path / "server.key").exists()


def test_certs_replace_their_own_files_only_with_overwrite(tmp_path):
    assert invoke("flower", "certs", tmp_path / "c").exit_code == 0
    first = (tmp_path / "c" / "server.key").read_bytes()
    assert invoke("flower", "certs", tmp_path / "c").exit_code == 2
    assert (tmp_path / "c" / "server.key").read_bytes() == first
    assert invoke("flower", "certs", tmp_path / "c", "--overwrite").exit_code == 0
    assert (tmp_path / "c" / "server.key").read_bytes() != first


@pytest.mark.parametrize("target", ["file", "under_file"])
def test_certs_into_a_file_is_one_clear_error(tmp_path, target):
    (tmp_path / "f").write_text("x")
    path = tmp_path / "f" if target == "file" else tmp_path / "f" / "sub"
    result = invoke("flower", "certs", path)
    assert result.exit_code == 2 and "not a folder" in result.output


def test_certs_refuse_a_bad_host_name(tmp_path):
    result = invoke("flower", "certs", tmp_path / "c", "--host", "bad host!")
    assert result.exit_code == 2 and "neither an IP" in result.output and not (tmp_path / "c").exists()


def test_keys_keep_the_users_node_keys(tmp_path):
    (tmp_path / "supernode1").write_text("MY KEY")
    for extra in ([], ["--overwrite"]):
        result = invoke("flower", "keys", tmp_path, "-n", "2", *extra)
        assert result.exit_code == 2 and "supernode1" in result.output
    assert (tmp_path / "supernode1").read_text() == "MY KEY" and not (tmp_path / "supernode0").exists()
    assert invoke("flower", "keys", tmp_path / "k", "-n", "1").exit_code == 0
    assert (tmp_path / "k" / "supernode0").stat().st_mode & 0o777 == 0o600
    assert invoke("flower", "keys", tmp_path / "k", "-n", "1", "--overwrite").exit_code == 0


# ------------------------------------------------------------------ fgrpo flower connection


def test_connection_refuses_an_address_without_port_and_a_missing_root_cert(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    no_port = invoke("flower", "connection", "127.0.0.1")
    assert no_port.exit_code == 2 and "must be host:port" in no_port.output
    no_cert = invoke("flower", "connection", "127.0.0.1:9093", "--root-cert", tmp_path / "missing.crt")
    assert no_cert.exit_code == 2 and "missing.crt" in no_cert.output and "no such file" in no_cert.output
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("text, message", [("[superlink\n", "not valid TOML"), ("superlink = 3\n", "must be a table"),
                                           (b"\xff\xfe", "cannot be read")])
def test_connection_with_a_broken_flower_config_names_it_and_leaves_it(tmp_path, monkeypatch, text, message):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    config = tmp_path / "config.toml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = config.read_bytes()
    result = invoke("flower", "connection", "127.0.0.1:9093")
    assert result.exit_code == 2 and message in result.output and str(config) in result.output
    assert config.read_bytes() == before


# ------------------------------------------------------------------ fgrpo flower commands


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[federation]\nnum_clients = 2\n")
    return path


@pytest.mark.parametrize("args, message", [
    (["--host", ""], "--host is empty"),
    (["--host", "bad host!"], "neither an IP"),
    (["--port", "0"], "--port"),
    (["--port", "70000"], "--port"),
])
def test_commands_refuse_a_bad_host_or_port(config_file, args, message):
    result = invoke("flower", "commands", config_file, *args)
    assert result.exit_code == 2 and message in result.output and "flower-superlink" not in result.stdout


def test_commands_refuse_a_missing_or_empty_tls_folder(config_file, tmp_path):
    missing = invoke("flower", "commands", config_file, "--tls", tmp_path / "nope")
    assert missing.exit_code == 2 and "is not a folder" in missing.output
    (tmp_path / "empty").mkdir()
    empty = invoke("flower", "commands", config_file, "--tls", tmp_path / "empty")
    assert empty.exit_code == 2 and "lacks ca.crt, server.pem, server.key" in empty.output
    assert invoke("flower", "certs", tmp_path / "certs").exit_code == 0
    made = invoke("flower", "commands", config_file, "--tls", tmp_path / "certs")
    assert made.exit_code == 0 and "--ssl-certfile" in made.stdout


def test_commands_refuse_missing_data_files_and_auth_keys(config_file, tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    missing = invoke("flower", "commands", config_file, "--data", tmp_path / "a.jsonl", "--data", tmp_path / "b.jsonl")
    assert missing.exit_code == 2 and "--data: no such file" in missing.output and "b.jsonl" in missing.output
    assert invoke("flower", "certs", tmp_path / "certs").exit_code == 0
    no_keys = invoke("flower", "commands", config_file, "--tls", tmp_path / "certs", "--auth", tmp_path / "keys")
    assert no_keys.exit_code == 2 and "supernode0.pub" in no_keys.output


def test_commands_bracket_an_ipv6_host(config_file):
    result = invoke("flower", "commands", config_file, "--host", "::1")
    assert result.exit_code == 0 and "'[::1]:9093'" in result.stdout


def test_commands_say_how_a_supernode_keeps_its_model_warm(config_file):
    result = invoke("flower", "commands", config_file)
    assert result.exit_code == 0, result.output
    nodes = [line for line in result.stdout.splitlines() if "flower-supernode" in line and not line.startswith("#")]
    assert len(nodes) == 2 and all(line.startswith("FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1 flower-supernode") for line in nodes)
    assert "warm worker per run" in result.stdout and "warm=false" in result.stdout
