"""The wire contract between the ServerApp and the ClientApp: records, keys, metric names, one update rule.

What travels (flwr 1.42 Message API):

- server → client, train: RecordDict {"arrays": θ_t, "config": {"server-round",
  "local-steps", "local-only", and the strategy's own keys such as FedProx's
  "proximal-mu"}}; evaluate: the same with the θ to score.
- client → server, train: {"arrays": θ_k (or its compressed delta; fedsa: its
  LoRA A matrices only, `federation/fedsa.py`),
  "metrics": {"client-id", "num-examples", "reward-mean", "reward-std",
  "accuracy", "train-time", "unit-weight"}}; evaluate: {"metrics":
  {"client-id", "num-examples", "acc_heldout", "acc/<family>", "n/<family>"}}.
- server → client, query (before round 0): {"config": {}}; the reply:
  {"arrays": θ₀, "config": {"checkpoint-layout": JSON}} — the server holds no
  model, so θ₀ and how to save the final weights come from a client
  (`fgrpo.core.model.checkpoint_layout`, `fgrpo.federation.export`).

Numpy and Flower's record types only: the server imports this without torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context

from fgrpo.config import Config, config_from_dict, load_config, tomllib
from fgrpo.registry import ACC_HELDOUT, BY_NAME, METHODS, WEIGHTED_METHODS  # noqa: F401  (re-exported)

# Run config ([tool.flwr.app.config] in pyproject.toml).
CONFIG_KEY = "fgrpo-config"  # the whole resolved fgrpo config as TOML text
RUN_DIR_KEY = "run-dir"
RESUME_KEY = "resume"

# RecordDict entries.
ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"

# Train / evaluate config the server sends.
SERVER_ROUND = "server-round"  # Flower's strategies add it
LOCAL_STEPS = "local-steps"
PROMPTS_PER_STEP = "prompts-per-step"
LOCAL_ONLY = "local-only"
PROXIMAL_MU = "proximal-mu"  # FedProx adds it

# Metrics a client sends.
CLIENT_ID = "client-id"  # stable id (partition-id), unlike Flower's ephemeral node id
NUM_EXAMPLES = "num-examples"
REWARD_MEAN = "reward-mean"
REWARD_MEAN_VAR = "reward-mean-var"  # squared standard error of reward-mean (from per-prompt means)
REWARD_STD = "reward-std"
GAIN_IN_ROUND = "gain-inround"  # FGRPO in_round gain: θ_k's improvement over θ_t on fresh prompts
GAIN_IN_ROUND_VAR = "gain-inround-var"  # its squared standard error
ACC_GLOBAL_SET = "acc_global_set"  # local-only: its model on every owner's held-out data
ACCURACY = "accuracy"
TRAIN_TIME = "train-time"
LORA_RANK = "lora-rank"  # the rank r the client trained; its LoRA arrays come truncated to it (federation/hetlora.py)
UNIT_WEIGHT = "unit-weight"  # 1 for every client: the weight key of uniform averaging (DP)
FAMILY_ACC = "acc/"  # + family
FAMILY_N = "n/"  # + family

# The init reply (a query message before round 0).
CHECKPOINT_LAYOUT = "checkpoint-layout"

# A node's Context.state.
LOCAL_ADAPTER_KEY = "local-adapter"  # local-only: the client's own adapter
RESIDUAL_KEY = "compression-residual"  # error feedback of the compression codec
PERSONAL_KEY = "personal-lora-b"  # fedsa: the client's own LoRA B matrices, never sent
OPTIMIZER_KEY = "optimizer-state"  # federation.keep_optimizer_state: the client's AdamW moments, never sent


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def arrays_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes the arrays take on the wire (raw, uncompressed)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


def scale_update(
    current: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray], factor: float
) -> dict[str, np.ndarray]:
    """θ + s·(θ_k − θ), computed in float64, each array keeping θ_k's dtype.

    Every rescaled update goes through here: norm clipping, client-side DP
    clipping and the simulated attacker.
    """
    scaled = {}
    for key, theta in current.items():
        theta64 = np.asarray(theta, dtype=np.float64)
        new = theta64 + factor * (np.asarray(arrays[key], dtype=np.float64) - theta64)
        scaled[key] = new.astype(np.asarray(arrays[key]).dtype)
    return scaled


@lru_cache(maxsize=4)
def config_from_text(text: str) -> Config:
    """The run's fgrpo config from the run config's TOML text; empty text = the packaged quickstart scenario."""
    if not text.strip():  # `flwr run .` with the pyproject defaults
        from importlib.resources import files

        return load_config(Path(str(files("fgrpo") / "scenarios" / "quickstart.toml")))
    return config_from_dict(tomllib.loads(text), source=f"run config '{CONFIG_KEY}'")


def config_text(context: Context) -> str:
    return str(context.run_config[CONFIG_KEY])


def config_from_context(context: Context) -> Config:
    return config_from_text(config_text(context))
