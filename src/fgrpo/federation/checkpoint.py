"""Crash-safe server checkpoints: everything needed to continue a federated run exactly.

A checkpoint holds the global adapter, the strategy's mutable state (FGRPO
baselines and histories, FedOpt moments, FedAvgM momentum, a DP accountant),
the RNG states the server consumes (Flower samples clients with `random`, its
DP noise uses NumPy's global RNG), the in-process clients' persistent state,
the round number and the length of metrics.jsonl at that round. Resuming
truncates metrics.jsonl back to that length, so a run killed at any point and
resumed writes exactly the records an uninterrupted run writes.

The file is written atomically (temp file, fsync, rename, fsync of the
directory): a crash or a full disk while writing leaves the previous
checkpoint intact. It is a pickle, so only resume run directories you trust
(the same trust as loading any PyTorch checkpoint).
"""

from __future__ import annotations

import errno
import os
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fgrpo.errors import ConfigError, FederationError
from fgrpo.federation.wire import arrays_to_record, record_to_arrays

CHECKPOINT_NAME = "checkpoint.pkl"
FORMAT_VERSION = 1

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


def save_checkpoint(run_dir: Path, state: ServerState) -> Path:
    path = Path(run_dir) / CHECKPOINT_NAME
    payload = pickle.dumps({"version": FORMAT_VERSION, "state": state}, protocol=pickle.HIGHEST_PROTOCOL)
    atomic_write_bytes(path, payload)
    return path


def load_checkpoint(run_dir: Path) -> ServerState:
    """The last complete checkpoint in RUN_DIR, or a clear error saying why there is none."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise ConfigError(
            f"cannot resume '{run_dir}': it has no {CHECKPOINT_NAME} (the run stopped before its first checkpoint, "
            "or this is not a federated run directory); start it again with --overwrite"
        )
    try:
        data = pickle.loads(path.read_bytes())
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise ConfigError(f"cannot resume: checkpoint '{path}' is damaged ({type(error).__name__}: {error})") from None
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION or not isinstance(data.get("state"), ServerState):
        raise ConfigError(f"cannot resume: '{path}' is not an fgrpo checkpoint of format version {FORMAT_VERSION}")
    return data["state"]


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
