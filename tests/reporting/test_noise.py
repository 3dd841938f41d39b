"""The terminal shows fgrpo's progress; the libraries' bars, deprecation warnings and INFO logs only with --verbose."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

ROOT = Path(__file__).resolve().parents[2]
NOISE = ("Loading weights", "Writing model shards", "FutureWarning", "DeprecationWarning", "INFO :")


def run_cli(tmp_path: Path, *flags: str) -> str:
    from conftest import small_config_dict

    tmp_path.mkdir(parents=True, exist_ok=True)
    data = small_config_dict(tmp_path, federation={"rounds": 1})
    config = tmp_path / "c.toml"
    config.write_text(tomli_w.dumps(data))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    for key in ("FGRPO_VERBOSE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "PYTHONWARNINGS"):
        env.pop(key, None)  # whatever this test session set must not decide the outcome
    result = subprocess.run(
        [sys.executable, "-m", "fgrpo.cli", *flags, "run", str(config), "--overwrite"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_a_tiny_run_prints_no_library_noise_unless_verbose(tmp_path):
    quiet = run_cli(tmp_path / "quiet")
    assert [word for word in NOISE if word in quiet] == [], quiet[-3000:]
    assert "fgrpo: global held-out accuracy" in quiet  # fgrpo's own summary is still there
    loud = run_cli(tmp_path / "loud", "--verbose")
    assert "Loading weights" in loud  # the same run does make the noise: the quiet one hid it


def test_verbose_is_passed_to_child_processes_through_the_environment(monkeypatch):
    from fgrpo.reporting.noise import QUIET_ENV, quiet_libraries, set_verbose, verbose

    for key in QUIET_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("FGRPO_VERBOSE", raising=False)
    set_verbose(True)
    assert verbose() and os.environ["FGRPO_VERBOSE"] == "1"
    quiet_libraries()
    assert not any(key in os.environ for key in QUIET_ENV)  # verbose: nothing switched off
    set_verbose(False)
    quiet_libraries()
    assert all(os.environ[key] == value for key, value in QUIET_ENV.items())
