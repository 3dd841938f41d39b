"""The results directory: --overwrite deletes only what fgrpo provably created, and never loses a run."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fgrpo.cli import app
from fgrpo.errors import ConfigError
from fgrpo.reporting.results import MARKER_NAME, is_fgrpo_dir, prepare_run_dir, run_directory


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with a hash of its bytes (the 'byte-identical' check)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def users_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    (path / "data").mkdir()
    (path / "data" / "owners.csv").write_text("a,b\n1,2\n")
    return path


def write_config(tmp_path: Path, **federation) -> Path:
    from conftest import small_config_dict
    from fgrpo.config import config_from_dict, dump_config

    data = small_config_dict(tmp_path)
    data["federation"] = {**data["federation"], "rounds": 1, **federation}
    path = tmp_path / "config.toml"
    path.write_text(dump_config(config_from_dict(data)))
    return path


def test_overwrite_refuses_a_folder_fgrpo_did_not_create_and_leaves_it_byte_identical(tmp_path):
    folder = users_folder(tmp_path / "mine")
    before = snapshot(folder)
    with pytest.raises(ConfigError, match=f"fgrpo did not create it.*{MARKER_NAME}"):
        prepare_run_dir(folder, overwrite=True)
    assert snapshot(folder) == before


def test_cli_run_overwrite_into_a_users_folder_is_refused_with_one_line(tmp_path):
    config = write_config(tmp_path)
    folder = users_folder(tmp_path / "mine")
    before = snapshot(folder)
    result = CliRunner().invoke(app, ["run", str(config), "-o", str(folder), "--overwrite", "--quiet"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "fgrpo did not create it" in result.output
    assert snapshot(folder) == before


@pytest.mark.parametrize("where", ["cwd", "parent", "empty", "home"])
def test_current_directory_parents_and_home_are_never_results_directories(tmp_path, monkeypatch, where):
    work = users_folder(tmp_path / "home" / "project")
    (work / MARKER_NAME).write_text(json.dumps({"created_by": "fgrpo"}))  # even a forged marker does not help
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    target = {"cwd": ".", "parent": "..", "empty": "", "home": str(tmp_path / "home")}[where]
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="current directory|home directory"):
        prepare_run_dir(target, overwrite=True)
    assert snapshot(tmp_path) == before


def test_an_existing_file_as_output_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="is an existing file, not a directory"):
        prepare_run_dir(tmp_path / "notes.txt")


def test_fresh_directory_gets_the_marker_and_an_empty_marked_folder_counts_as_empty(tmp_path):
    run = prepare_run_dir(tmp_path / "run")
    assert is_fgrpo_dir(tmp_path / "run") and run.created
    prepare_run_dir(tmp_path / "run")  # only the marker: no --overwrite needed


def test_a_failed_start_puts_the_replaced_run_back_and_a_clean_start_replaces_it(tmp_path):
    with run_directory(tmp_path / "run") as first:
        (first.path / "metrics.jsonl").write_text('{"old": 1}\n')
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError):
        with run_directory(tmp_path / "run", overwrite=True) as second:
            (second.path / "config.toml").write_text("new")
            assert not (second.path / "metrics.jsonl").exists()  # the new run writes into a fresh folder
            raise RuntimeError("typo in the config")
    assert snapshot(tmp_path) == before  # the old run is back, byte for byte, and nothing else is left
    with run_directory(tmp_path / "run", overwrite=True) as third:
        (third.path / "metrics.jsonl").write_text('{"new": 1}\n')
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"new": 1}\n'
    assert sorted(os.listdir(tmp_path)) == ["run"]  # the replaced run is gone once the new one started


def test_a_failed_fresh_start_leaves_nothing_so_the_retry_needs_no_overwrite(tmp_path):
    with pytest.raises(RuntimeError):
        with run_directory(tmp_path / "run"):
            raise RuntimeError("bad reward name")
    assert not (tmp_path / "run").exists()
    with pytest.raises(RuntimeError):
        (tmp_path / "empty").mkdir()
        with run_directory(tmp_path / "empty") as run:
            (run.path / "config.toml").write_text("x")
            raise RuntimeError("bad")
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())  # the user's folder stays


def test_cli_overwrite_with_a_config_that_fails_to_start_keeps_the_old_run(tmp_path):
    config = write_config(tmp_path)
    out = tmp_path / "run"
    first = CliRunner().invoke(app, ["run", str(config), "-o", str(out), "--quiet"])
    assert first.exit_code == 0, first.output
    before = snapshot(out)
    bad = CliRunner().invoke(
        app, ["run", str(config), "-o", str(out), "--overwrite", "--quiet", "--set", 'tasks.rewards=[{name="exakt_match"}]']
    )
    assert bad.exit_code == 2 and "exakt_match" in bad.output and "Traceback" not in bad.output
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "run"]


def test_compare_overwrite_replaces_the_whole_comparison(tmp_path):
    config = write_config(tmp_path)
    out = tmp_path / "cmp"
    first = CliRunner().invoke(app, ["compare", str(config), "--methods", "local", "--seeds", "1", "-o", str(out), "--quiet"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(
        app, ["compare", str(config), "--methods", "fedavg", "--seeds", "1", "-o", str(out), "--quiet", "--overwrite"]
    )
    assert again.exit_code == 0, again.output
    assert not (out / "local").exists()
    report = (out / "report" / "report.md").read_text() if (out / "report" / "report.md").exists() else ""
    rows = [line for line in report.splitlines() if line.startswith("| local")]
    assert rows == []


def test_cli_workers_and_threads_flags_are_checked_as_runtime_keys(tmp_path):
    config = write_config(tmp_path)
    for flags, key in ((["--workers", "0"], "runtime.workers"), (["--threads", "lots"], "runtime.threads")):
        result = CliRunner().invoke(app, ["run", str(config), "-o", str(tmp_path / "out"), "--quiet", *flags])
        assert result.exit_code == 2 and "Traceback" not in result.output and key in result.output


# ------------------------------------------------------------------ -o where no folder can be made (issue 24)


@pytest.mark.parametrize("where", ["under_file", "proc"])
def test_an_output_directory_that_cannot_be_made_is_one_clear_error(tmp_path, where):
    (tmp_path / "f").write_text("x")
    if where == "proc" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    path = tmp_path / "f" / "run" if where == "under_file" else Path("/proc/fgrpo-run")
    with pytest.raises(ConfigError, match=f"output directory '{path}' cannot be created: .*; choose another -o"):
        prepare_run_dir(path)


def test_a_read_only_parent_is_one_clear_error_and_an_overwritten_run_comes_back(tmp_path, monkeypatch):
    old = tmp_path / "run"
    prepare_run_dir(old).commit()
    (old / "metrics.jsonl").write_text("{}\n")
    before = snapshot(old)

    def refuse(self, *args, **kwargs):  # as a read-only folder answers (root would be let through by chmod 555)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(ConfigError, match="cannot be created: Permission denied"):
        prepare_run_dir(tmp_path / "ro" / "run")
    with pytest.raises(ConfigError, match="cannot be created: Permission denied"):
        prepare_run_dir(old, overwrite=True)
    monkeypatch.undo()
    assert snapshot(old) == before


def test_an_os_error_that_slips_through_is_still_one_line_naming_the_path(tmp_path, monkeypatch):
    import fgrpo.reporting.report as report

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/somewhere/report.md")

    monkeypatch.setattr(report, "write_report", refuse)
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "'/somewhere/report.md': Permission denied" in result.output
