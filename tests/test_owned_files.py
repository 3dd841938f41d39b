"""owned_files: fgrpo replaces a file in a user's folder only with --overwrite and only if it wrote those bytes."""

from __future__ import annotations

import pytest

from fgrpo.errors import ConfigError
from fgrpo.owned_files import MANIFEST_NAME, read_manifest, staged_folder, write_files, wrote


def test_new_files_are_written_and_recorded(tmp_path):
    folder = tmp_path / "new" / "folder"
    (path,) = write_files(folder, {"a.key": b"secret"}, overwrite=False, what="key folder", private=["a.key"])
    assert path.read_bytes() == b"secret" and path.stat().st_mode & 0o777 == 0o600
    assert wrote(folder, "a.key") and set(read_manifest(folder)) == {"a.key"}


def test_an_existing_file_needs_overwrite_and_fgrpos_own_bytes(tmp_path):
    write_files(tmp_path, {"ca.crt": b"v1"}, overwrite=False, what="certificate folder")
    with pytest.raises(ConfigError, match="already holds ca.crt; pass --overwrite"):
        write_files(tmp_path, {"ca.crt": b"v2"}, overwrite=False, what="certificate folder")
    write_files(tmp_path, {"ca.crt": b"v2"}, overwrite=True, what="certificate folder")
    assert (tmp_path / "ca.crt").read_bytes() == b"v2"

    (tmp_path / "ca.crt").write_bytes(b"the user's own CA, written over fgrpo's")  # same name, other bytes
    with pytest.raises(ConfigError, match="refusing to overwrite ca.crt.*fgrpo did not write it"):
        write_files(tmp_path, {"ca.crt": b"v3"}, overwrite=True, what="certificate folder")
    assert (tmp_path / "ca.crt").read_bytes() == b"the user's own CA, written over fgrpo's"


def test_a_users_file_is_never_replaced_and_nothing_is_written(tmp_path):
    (tmp_path / "server.key").write_bytes(b"mine")
    with pytest.raises(ConfigError, match="refusing to overwrite server.key"):
        write_files(tmp_path, {"ca.crt": b"x", "server.key": b"y"}, overwrite=True, what="certificate folder")
    assert (tmp_path / "server.key").read_bytes() == b"mine"
    assert not (tmp_path / "ca.crt").exists()  # refused before anything was written


def test_a_forged_manifest_entry_does_not_unlock_a_users_file(tmp_path):
    (tmp_path / "report.md").write_text("my notes")
    (tmp_path / MANIFEST_NAME).write_text('{"files": {"report.md": "0000"}}')
    with pytest.raises(ConfigError, match="refusing to overwrite report.md"):
        write_files(tmp_path, {"report.md": b"x"}, overwrite=True, what="report folder")


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_a_file_where_the_folder_should_be_is_one_clear_error(tmp_path, where):
    (tmp_path / "f").write_text("x")
    folder = tmp_path / "f" if where == "file" else tmp_path / "f" / "sub"
    with pytest.raises(ConfigError, match="not a folder"):
        write_files(folder, {"a": b"x"}, overwrite=True, what="key folder")


def test_staged_folder_moves_in_keeps_user_files_and_drops_its_own_stale_ones(tmp_path):
    out = tmp_path / "merged"
    with staged_folder(out, overwrite=False, what="merged model folder") as stage:
        (stage / "config.json").write_text("{}")
        (stage / "model-00001.safetensors").write_bytes(b"shard")
    (out / "NOTES.md").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        with staged_folder(out, overwrite=False, what="merged model folder"):
            pytest.fail("the body must not run: refused before the expensive work")
    with staged_folder(out, overwrite=True, what="merged model folder") as stage:
        (stage / "config.json").write_text('{"v": 2}')
        (stage / "model.safetensors").write_bytes(b"one file")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "NOTES.md", "config.json", "model.safetensors"]
    assert (out / "NOTES.md").read_text() == "mine" and (out / "config.json").read_text() == '{"v": 2}'


def test_staged_folder_refuses_a_users_file_of_the_same_name_and_changes_nothing(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("my own config")
    with pytest.raises(ConfigError, match="refusing to overwrite config.json"):
        with staged_folder(out, overwrite=True, what="merged model folder") as stage:
            (stage / "config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"] and (out / "config.json").read_text() == "my own config"
