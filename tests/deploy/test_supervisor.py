"""Tests for fgrpo.deploy.supervisor: a local SuperLink and SuperNodes as processes, also from a venv not activated."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from fgrpo.deploy import supervisor
from fgrpo.deploy.commands import missing_binaries

pytestmark = pytest.mark.skipif(bool(missing_binaries()), reason=f"Flower binaries not installed: {missing_binaries()}")

NOT_ACTIVATED = os.pathsep.join(["/usr/bin", "/bin"])  # a shell where this venv's bin folder is not on PATH


def test_flowers_own_programs_are_found_when_the_venv_is_not_activated(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", NOT_ACTIVATED)
    env = supervisor.LocalFederation([{"partition-id": 0}], tmp_path).env
    # The SuperLink and SuperNodes start these by name, from the PATH they are given.
    for name in ("flower-superexec", "flwr-serverapp", "flwr-clientapp"):
        found = shutil.which(name, path=env["PATH"])
        assert found is not None and Path(found).parent == Path(sys.executable).parent, name
    assert env["PATH"].endswith(NOT_ACTIVATED)  # the user's PATH is kept, after it


@pytest.mark.slow
@pytest.mark.flower
def test_fgrpo_flower_launch_runs_from_a_venv_that_is_not_activated(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from conftest import small_config_dict
    from fgrpo.cli import app
    from fgrpo.config import config_from_dict, dump_config

    data = small_config_dict(tmp_path, federation={"num_clients": 1, "rounds": 1, "min_train_clients": 1})
    (tmp_path / "run.toml").write_text(dump_config(config_from_dict(data)))
    monkeypatch.setenv("PATH", NOT_ACTIVATED)
    result = CliRunner().invoke(app, ["flower", "launch", str(tmp_path / "run.toml"), "-o", str(tmp_path / "out"), "--timeout", "500"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "summary.json").exists()
