"""Crash-safe server checkpoints: everything needed to continue a federated run exactly.

A checkpoint holds the global adapter, the strategy's mutable state (FGRPO
baselines and histories, FedOpt moments, FedAvgM momentum, a DP accountant),
the RNG states the server consumes (Flower samples clients with `random`, its
DP noise uses NumPy's global RNG), the in-process clients' persistent state,
the round number and the length and hash of metrics.jsonl at that round.
Resuming truncates metrics.jsonl back to that length, so a run killed at any
point and resumed writes exactly the records an uninterrupted run writes; it
does so only when the file's first bytes still hash to the checkpoint's and
every record after them belongs to a later round (`server.check_metrics_prefix`).

Format (version 3): one safetensors file. The arrays are its tensors; the rest
is JSON in its metadata, with a format version and an HMAC-SHA-256 over the
JSON and every tensor's bytes, keyed with this user's key
(`fgrpo.federation.signing`), which lives outside every run folder: a
checkpoint is trusted only if fgrpo wrote it. A plain hash (version 2) could
be recomputed by anyone who can write the run folder, so a crafted state
(`server_round = -5`, `metrics_offset = 0`) passed; version 2 checkpoints are
refused, since nothing tells them apart from crafted ones. Loading parses JSON
and raw arrays only, so even a checkpoint with a stolen key cannot run code
(version 1 was a pickle, which could). The file is written atomically (temp file, fsync, rename, fsync of the
directory): a crash or a full disk while writing leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fgrpo.errors import ConfigError, FederationError
from fgrpo.federation.signing import key_path, keyed_digest, same_digest, signing_key
from fgrpo.federation.wire import arrays_to_record, record_to_arrays

CHECKPOINT_NAME = "checkpoint.safetensors"
FORMAT_VERSION = 3
METADATA_KEY = "fgrpo-checkpoint"

# Mutable attributes of Flower's strategies and ours that change from round to round.
STRATEGY_STATE_ATTRS = ("m_t", "v_t", "current_arrays", "momentum_vector")


@dataclass
class ServerState:
    """The server side of a run after `server_round` complete rounds."""

    server_round: int
    arrays: dict[str, np.ndarray]
    strategy: dict[str, Any]
    python_rng: Any
    numpy_rng: Any
    metrics_offset: int
    config_text: str
    initial: dict[str, float]
    final_accuracy: float
    elapsed_s: float
    grid_state: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    metrics_sha256: str | None = None  # of metrics.jsonl's first `metrics_offset` bytes


def _plain(value: Any) -> Any:
    """ArrayRecords become {'__arrays__': {name: ndarray}} so the pickle does not depend on Flower's classes."""
    if isinstance(value, ArrayRecord):
        return {"__arrays__": record_to_arrays(value)}
    return value


def _unplain(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"__arrays__"}:
        return arrays_to_record(value["__arrays__"])
    return value


def strategy_state(strategy: Any) -> dict[str, Any]:
    """The strategy's mutable state: its own `state_dict()`, Flower's optimizer moments, a wrapped strategy's."""
    state: dict[str, Any] = {"class": type(strategy).__name__}
    if hasattr(strategy, "state_dict") and not hasattr(strategy, "accountant"):
        state["state_dict"] = strategy.state_dict()
    for name in STRATEGY_STATE_ATTRS:
        if hasattr(strategy, name):
            state[name] = _plain(getattr(strategy, name))
    if getattr(strategy, "accountant", None) is not None:
        state["accountant"] = strategy.accountant.state_dict()
    if hasattr(strategy, "strategy"):  # Flower's DP wrappers hold the real strategy
        state["wrapped"] = strategy_state(strategy.strategy)
    return state


def load_strategy_state(strategy: Any, state: dict[str, Any]) -> None:
    if state.get("class") != type(strategy).__name__:
        raise ConfigError(
            f"checkpoint was written by strategy {state.get('class')}, but this run builds {type(strategy).__name__}"
        )
    if "state_dict" in state:
        strategy.load_state_dict(state["state_dict"])
    for name in STRATEGY_STATE_ATTRS:
        if name in state:
            setattr(strategy, name, _unplain(state[name]))
    if "accountant" in state:
        strategy.accountant.load_state_dict(state["accountant"])
    if "wrapped" in state:
        load_strategy_state(strategy.strategy, state["wrapped"])


def capture_rng() -> tuple[Any, Any]:
    return random.getstate(), np.random.get_state()


def restore_rng(python_rng: Any, numpy_rng: Any) -> None:
    random.setstate(python_rng)
    np.random.set_state(numpy_rng)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write `payload` to `path` so that a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        why = "the disk is full" if error.errno == errno.ENOSPC else str(error)
        raise FederationError(
            f"could not write checkpoint '{path}': {why}. The previous checkpoint (if any) is intact; "
            "free space and continue with --resume"
        ) from error


class _Encoder:
    """Nested Python state → JSON + named arrays. Only plain data survives: no classes, no code."""

    def __init__(self) -> None:
        self.tensors: dict[str, np.ndarray] = {}

    def encode(self, value: Any) -> Any:
        if isinstance(value, ArrayRecord):
            return {"__arrays__": {k: self.encode(v.numpy()) for k, v in value.items()}}
        if isinstance(value, np.ndarray):
            key = f"t{len(self.tensors)}"
            self.tensors[key] = np.ascontiguousarray(value)
            return {"__tensor__": key}
        if isinstance(value, (bytes, bytearray)):
            return {"__bytes__": self.encode(np.frombuffer(bytes(value), dtype=np.uint8))}
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, tuple):
            return {"__tuple__": [self.encode(v) for v in value]}
        if isinstance(value, list):
            return [self.encode(v) for v in value]
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: self.encode(v) for k, v in value.items()}
            return {"__items__": [[self.encode(k), self.encode(v)] for k, v in value.items()]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"checkpoint state holds a {type(value).__name__}, which fgrpo does not store")


def _decode(value: Any, tensors: dict[str, np.ndarray]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, inner), = value.items()
        if tag == "__tensor__":
            return tensors[inner]
        if tag == "__bytes__":
            return _decode(inner, tensors).tobytes()
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in inner)
        if tag == "__items__":
            return {_decode(k, tensors): _decode(v, tensors) for k, v in inner}
        if tag == "__arrays__":
            return arrays_to_record({k: _decode(v, tensors) for k, v in inner.items()})
    return {k: _decode(v, tensors) for k, v in value.items()}


def _digest(key: bytes, state_json: str, tensors: dict[str, np.ndarray]) -> str:
    """The keyed digest of a checkpoint's JSON state and every tensor (name, dtype, shape and bytes)."""

    def parts():
        yield state_json.encode("utf-8")
        for name in sorted(tensors):
            array = np.ascontiguousarray(tensors[name])
            yield f"{name}|{array.dtype.str}|{array.shape}|".encode()
            yield array.tobytes()

    return keyed_digest(key, parts())


def file_sha256(path: Path, limit: int | None = None) -> str:
    """SHA-256 of a file's first `limit` bytes (all of it when None)."""
    digest = hashlib.sha256()
    remaining = limit
    with open(path, "rb") as handle:
        while remaining is None or remaining > 0:
            chunk = handle.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return digest.hexdigest()


def save_checkpoint(run_dir: Path, state: ServerState) -> Path:
    from safetensors.numpy import save

    encoder = _Encoder()
    fields = {name: encoder.encode(getattr(state, name)) for name in ServerState.__dataclass_fields__}
    state_json = json.dumps(fields)
    metadata = {
        METADATA_KEY: state_json,
        "format": "fgrpo-server-checkpoint",
        "version": str(FORMAT_VERSION),
        "hmac-sha256": _digest(signing_key(), state_json, encoder.tensors),
    }
    path = Path(run_dir) / CHECKPOINT_NAME
    atomic_write_bytes(path, save(encoder.tensors, metadata=metadata))
    return path


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / CHECKPOINT_NAME).is_file()


def load_checkpoint(run_dir: Path) -> ServerState:
    """The last complete checkpoint in RUN_DIR, or a clear error saying why there is none."""
    from safetensors import safe_open

    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        old = " (it has a checkpoint.pkl from fgrpo 0.1, a pickle that fgrpo no longer loads)" if (Path(run_dir) / "checkpoint.pkl").exists() else ""
        raise ConfigError(
            f"cannot resume '{run_dir}': it has no {CHECKPOINT_NAME}{old} (the run stopped before its first "
            "checkpoint, or this is not a federated run directory); start it again in a new directory"
        )
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # noqa: BLE001 - any parse failure means a damaged file
        raise ConfigError(f"cannot resume: checkpoint '{path}' is damaged ({type(error).__name__}: {error})"[:400]) from None
    if metadata.get("format") != "fgrpo-server-checkpoint" or metadata.get("version") != str(FORMAT_VERSION):
        raise ConfigError(f"cannot resume: '{path}' is not an fgrpo checkpoint of format version {FORMAT_VERSION}")
    state_json = metadata.get(METADATA_KEY, "")
    if not same_digest(metadata.get("hmac-sha256", ""), _digest(signing_key(), state_json, tensors)):
        raise ConfigError(
            f"cannot resume: checkpoint '{path}' was not written by fgrpo with this user's key '{key_path()}' "
            "(it is damaged, was edited, or was signed with another key); start the run again in a new directory"
        )
    try:
        fields = _decode(json.loads(state_json), tensors)
        state = ServerState(**fields)
    except (ValueError, TypeError, KeyError) as error:
        raise ConfigError(f"cannot resume: checkpoint '{path}' is damaged ({type(error).__name__}: {error})"[:400]) from None
    return state


def config_differences(saved_text: str, current_text: str, ignore: tuple[str, ...]) -> list[str]:
    """Dotted keys whose values differ between two resolved configs (TOML text), except `ignore`."""
    from fgrpo.config import tomllib

    def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for key, value in node.items():
                out.update(flatten(value, f"{prefix}{key}."))
            return out
        return {prefix[:-1]: node}

    saved, current = flatten(tomllib.loads(saved_text)), flatten(tomllib.loads(current_text))
    keys = sorted(set(saved) | set(current))
    return [k for k in keys if k not in ignore and saved.get(k) != current.get(k)]
