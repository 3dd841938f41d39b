"""One client's local round: global adapter in → E GRPO steps on private prompts → (θ_k, n_k, reward stats) out.

Nothing here knows which aggregation strategy runs, and prompts, completions
and per-example rewards never leave this module: only the adapter and
aggregate statistics are returned.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from fgrpo.config import Config, TasksConfig
from fgrpo.errors import ConfigError
from fgrpo.core.evaluate import evaluate
from fgrpo.core.learner import GRPOLearner, ProximalTerm, mean_variance, seeded
from fgrpo.core.model import get_trainable_arrays, set_trainable_arrays, trainable_parameters
from fgrpo.data.node_spec import owner_name, owner_tasks
from fgrpo.data.partition_cache import cached_partition
from fgrpo.data.rewards import OWNER_COLUMN
from fgrpo.core.pipeline import build_task_splits
from fgrpo.data.tasks import Example
from fgrpo.federation import wire


@dataclass
class ClientData:
    """A client's private examples: its training prompts, its validation and its held-out test split."""

    client_id: int
    train: list[Example]
    test: list[Example]
    validation: list[Example] = field(default_factory=list)

    def heldout(self, split: str) -> list[Example]:
        """The examples evaluation uses: the test split, or validation (`evaluation.split`)."""
        if split != "validation":
            return self.test
        if not self.validation and self.test:
            raise ConfigError(
                f"evaluation.split = 'validation', but client {self.client_id} has no validation examples; "
                "set tasks.validation_per_family (families) or validation_fraction (files, sources) above 0"
            )
        return self.validation


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
    if config.federation.clients:
        return [
            owner_client_data(owner_tasks(config.tasks, owner, k), k, owner_name(owner, k), owner.size)
            for k, owner in enumerate(config.federation.clients)
        ]
    splits = build_task_splits(config.tasks)
    options = {"alpha": config.federation.partition.alpha}
    scheme = config.federation.partition.scheme
    seed = config.tasks.seed
    by = config.tasks.partition_by

    def shares(pool: list[Example]) -> list[list[Example]]:
        if not pool:
            return [[] for _ in range(num_clients)]
        parts = cached_partition(partition_labels(pool, by), scheme, num_clients, seed, **options)
        return [[pool[i] for i in part] for part in parts]

    train, test, validation = shares(splits.train), shares(splits.test), shares(splits.validation)
    return [ClientData(k, train[k], test[k], validation[k]) for k in range(num_clients)]


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


def owner_client_data(tasks: TasksConfig, client_id: int, name: str, size: int | None = None) -> ClientData:
    """Every example of one owner (its [tasks] from `node_spec.owner_tasks`), each tagged with the owner's name.

    With `size`, the client trains on a seeded random `size` of its training
    prompts (not the first ones: generated families come one after another).
    The tag is the `owner` column reward functions receive; a centralized run
    scores each pooled example with its owner's functions by it.
    """
    splits = build_task_splits(tasks)
    train = splits.train
    if size is not None and size < len(train):
        train = random.Random(tasks.seed).sample(train, size)

    def tagged(examples: list[Example]) -> list[Example]:
        return [dataclasses.replace(ex, meta={**ex.meta, OWNER_COLUMN: name}) for ex in examples]

    return ClientData(client_id, tagged(train), tagged(splits.test), tagged(splits.validation))


def pooled_data(config: Config) -> ClientData:
    """Centralized mode: one client holding every example (every owner's, when the config lists owners)."""
    if config.federation.clients:
        shares = all_client_data(config, len(config.federation.clients))
        return ClientData(0, *([ex for share in shares for ex in getattr(share, part)] for part in ("train", "test", "validation")))
    splits = build_task_splits(config.tasks)
    return ClientData(0, splits.train, splits.test, splits.validation)


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
    optimizer_state: dict[str, np.ndarray] | None = None,
    measure_in_round: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Train from `start_arrays` for `local_steps` GRPO steps; return (θ_k, metrics).

    The optimizer starts fresh unless `optimizer_state` (this client's AdamW
    moments from its previous round, `learner.optimizer_state_arrays()`) is given.
    `reward-mean-var` is the squared standard error of `reward-mean` (from
    per-prompt means). With `measure_in_round`, the client also scores θ_t and
    θ_k on the same fresh prompts (none of this round's training prompts) and
    reports the mean per-prompt improvement `gain-inround` and its squared
    standard error `gain-inround-var` (FGRPO's in-round gain). The probe runs
    under its own seeds, so the training itself is unchanged.
    """
    model = learner.model
    set_trainable_arrays(model, start_arrays)
    learner.reset_optimizer()
    learner.steps_taken, learner.step_context = 0, " of this local round"  # one learner serves every in-process client
    if optimizer_state is not None:
        learner.load_optimizer_state_arrays(optimizer_state)
    proximal = None
    if proximal_mu > 0:
        anchor = {name: p.detach().clone() for name, p in trainable_parameters(model).items()}
        proximal = ProximalTerm(proximal_mu, anchor)
    rng = random.Random(seed)
    batches = [rng.sample(data.train, min(prompts_per_step, len(data.train))) for _ in range(local_steps)]
    probe = in_round_probe(data.train, batches, prompts_per_step, seed) if measure_in_round else None
    if probe:
        with seeded(seed + PROBE_SEED_OFFSET):
            before = learner.prompt_rewards(probe)  # (P,) the global policy θ_t
    steps = []
    with seeded(seed):
        for batch in batches:
            steps.append(learner.step(batch, proximal))
    means = [s["train/reward_mean"] for s in steps]
    metrics = {
        wire.REWARD_MEAN: float(np.mean(means)),
        wire.REWARD_MEAN_VAR: float(sum(s["train/reward_mean_var"] for s in steps) / len(steps) ** 2),
        wire.REWARD_STD: pooled_std(means, [s["train/reward_std"] for s in steps]),
        wire.ACCURACY: float(np.mean([s["train/accuracy"] for s in steps])),
        "kl": float(np.mean([s["train/kl"] for s in steps])),
        "completion-len": float(np.mean([s["train/completion_len"] for s in steps])),
        wire.TRAIN_TIME: float(sum(s["train/step_s"] for s in steps)),
    }
    if probe:
        with seeded(seed + PROBE_SEED_OFFSET + 1):
            improvement = learner.prompt_rewards(probe) - before  # (P,) θ_k − θ_t per prompt
        metrics["gain-inround"] = float(improvement.mean())
        metrics["gain-inround-var"] = mean_variance(improvement)
    # Views, not copies: the ClientApp serialises them into its reply before this model trains again.
    return get_trainable_arrays(model, copy=False), metrics


PROBE_SEED_OFFSET = 7_919  # the in-round probe samples with seeds of its own


def in_round_probe(train: list[Example], batches: list[list[Example]], size: int, seed: int) -> list[Example]:
    """`size` training prompts that none of this round's batches uses (all prompts if every one is used)."""
    used = {id(ex) for batch in batches for ex in batch}
    fresh = [ex for ex in train if id(ex) not in used] or list(train)
    return random.Random(seed + PROBE_SEED_OFFSET).sample(fresh, min(size, len(fresh)))


def evaluate_arrays(
    learner: GRPOLearner, arrays: dict[str, np.ndarray], examples: list[Example], max_completion_length: int
) -> dict[str, float]:
    """Greedy held-out accuracy of the given weights on `examples` (per family too)."""
    set_trainable_arrays(learner.model, arrays)
    with torch.inference_mode():
        return evaluate(
            learner.model, learner.tokenizer, examples, max_completion_length, prefix="eval", sample=learner.sample
        )
