"""One client's local round: global adapter in → E GRPO steps on private prompts → (θ_k, n_k, reward stats) out.

Nothing here knows which aggregation strategy runs, and prompts, completions
and per-example rewards never leave this module: only the adapter and
aggregate statistics are returned.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from fgrpo.config import Config
from fgrpo.errors import ConfigError
from fgrpo.core.evaluate import evaluate
from fgrpo.core.learner import GRPOLearner, ProximalTerm, seeded
from fgrpo.core.model import get_trainable_arrays, set_trainable_arrays, trainable_parameters
from fgrpo.data.partition import partition
from fgrpo.core.pipeline import build_task_pool
from fgrpo.data.tasks import Example


@dataclass
class ClientData:
    """A client's private examples: its training prompts and its held-out split."""

    client_id: int
    train: list[Example]
    test: list[Example]


def client_data(config: Config, client_id: int, num_clients: int) -> ClientData:
    """Partition the configured pool and keep client `client_id`'s share (see `all_client_data`)."""
    return all_client_data(config, num_clients)[client_id]


def all_client_data(config: Config, num_clients: int) -> list[ClientData]:
    """Every client's share of the configured pool, from one partitioning.

    Train and held-out sets are partitioned with the same scheme and seed, so a
    client's held-out split follows its own (non-IID) distribution, and the
    clients' held-out splits together are exactly the pooled held-out set.
    One call builds all shares, so a process simulating 1,000 clients builds
    the pool and partitions it once, not once per client.
    """
    train_pool, test_pool = build_task_pool(config.tasks)
    options = {"alpha": config.federation.partition.alpha}
    scheme = config.federation.partition.scheme
    seed = config.tasks.seed
    by = config.tasks.partition_by
    train_parts = partition(partition_labels(train_pool, by), scheme, num_clients, seed, **options)
    test_parts = partition(partition_labels(test_pool, by), scheme, num_clients, seed, **options)
    return [
        ClientData(k, [train_pool[i] for i in train_parts[k]], [test_pool[i] for i in test_parts[k]])
        for k in range(num_clients)
    ]


def partition_labels(examples: list[Example], by: str = "family") -> list[str]:
    """The label each example is partitioned on: its family, or a column it carries ('source', 'subject', ...).

    Built-in synthetic examples carry no columns; their 'source' is their family.
    """
    if by == "family":
        return [ex.family for ex in examples]
    labels = []
    for ex in examples:
        if by in ex.meta:
            labels.append(str(ex.meta[by]))
        elif by == "source":
            labels.append(ex.family)
        else:
            columns = ", ".join(sorted(ex.meta)) or "none (a built-in family)"
            raise ConfigError(
                f"tasks.partition_by = '{by}', but an example of '{ex.meta.get('source', ex.family)}' has no column "
                f"'{by}' (its columns: {columns}); use 'family', 'source' or a column every source has"
            )
    return labels


def pooled_data(config: Config) -> ClientData:
    """Centralized mode: one client holding every example."""
    train_pool, test_pool = build_task_pool(config.tasks)
    return ClientData(0, train_pool, test_pool)


def round_seed(seed: int, client_id: int, server_round: int) -> int:
    """A seed per (run, client, round): results do not depend on client order."""
    return (seed * 1_000_003 + client_id * 10_007 + server_round) % 2**31


def pooled_std(means: list[float], stds: list[float]) -> float:
    """Std over equal-sized batches from their means and (population) stds."""
    means_arr, stds_arr = np.asarray(means), np.asarray(stds)
    second_moment = np.mean(stds_arr**2 + means_arr**2)
    return float(np.sqrt(max(second_moment - np.mean(means_arr) ** 2, 0.0)))


def local_round(
    learner: GRPOLearner,
    start_arrays: dict[str, np.ndarray],
    data: ClientData,
    *,
    local_steps: int,
    prompts_per_step: int,
    seed: int,
    proximal_mu: float = 0.0,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Train from `start_arrays` for `local_steps` GRPO steps; return (θ_k, metrics)."""
    model = learner.model
    set_trainable_arrays(model, start_arrays)
    learner.reset_optimizer()
    learner.steps_taken, learner.step_context = 0, " of this local round"  # one learner serves every in-process client
    proximal = None
    if proximal_mu > 0:
        anchor = {name: p.detach().clone() for name, p in trainable_parameters(model).items()}
        proximal = ProximalTerm(proximal_mu, anchor)
    rng = random.Random(seed)
    steps = []
    with seeded(seed):
        for _ in range(local_steps):
            batch = rng.sample(data.train, min(prompts_per_step, len(data.train)))
            steps.append(learner.step(batch, proximal))
    means = [s["train/reward_mean"] for s in steps]
    metrics = {
        "reward-mean": float(np.mean(means)),
        "reward-std": pooled_std(means, [s["train/reward_std"] for s in steps]),
        "accuracy": float(np.mean([s["train/accuracy"] for s in steps])),
        "kl": float(np.mean([s["train/kl"] for s in steps])),
        "completion-len": float(np.mean([s["train/completion_len"] for s in steps])),
        "train-time": float(sum(s["train/step_s"] for s in steps)),
    }
    # Views, not copies: the ClientApp serialises them into its reply before this model trains again.
    return get_trainable_arrays(model, copy=False), metrics


def evaluate_arrays(
    learner: GRPOLearner, arrays: dict[str, np.ndarray], examples: list[Example], max_completion_length: int
) -> dict[str, float]:
    """Greedy held-out accuracy of the given weights on `examples` (per family too)."""
    set_trainable_arrays(learner.model, arrays)
    with torch.inference_mode():
        return evaluate(
            learner.model, learner.tokenizer, examples, max_completion_length, prefix="eval", sample=learner.sample
        )
