"""Non-IID splits of a task pool across N clients, computed on task-family labels.

Every scheme takes `labels` (the task family of each example in a pool) and
returns the example indices of each client: `list[list[int]]`, one list per
client, disjoint, every index used at most once, deterministic given `seed`.
Working on labels rather than on examples keeps this module independent of
how tasks are represented.

The schemes wrap flwr-datasets' partitioners: the labels become a
`datasets.Dataset` with columns "label" and "idx" (the example's position in
`labels`), shuffled with `seed`, and each client's partition is read back as
its "idx" column. The up-front shuffle matters: flwr's partitioners cut each
label's examples (or the whole pool) into contiguous runs, so without it
client 0 would always get the first examples of a family, e.g. the easiest
ones when a generator orders them by difficulty. Hand-written parts are
marked in the docstrings.

Schemes (all selectable by name through `partition`):

- "iid": `IidPartitioner`, sizes differ by at most one.
- "by_family": each client holds one family (`PathologicalPartitioner`), or
  several whole families when there are fewer clients than families.
- "dirichlet": per-family Dirichlet(α) shares over clients
  (`DirichletPartitioner`); small α = strong label skew.
- "quantity_skew": client sizes grow with the client id (`LinearPartitioner`,
  `SquarePartitioner`, `ExponentialPartitioner`), label mix roughly IID.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fgrpo.errors import ConfigError, DataError

if TYPE_CHECKING:
    import datasets
    from flwr_datasets.partitioner import Partitioner
    from rich.table import Table

SCHEMES: tuple[str, ...] = ("iid", "by_family", "dirichlet", "quantity_skew")
QUANTITY_KINDS: tuple[str, ...] = ("linear", "square", "exponential")


# --------------------------------------------------------------------------- checks


def _check_labels(labels: Sequence[str]) -> list[str]:
    labels = list(labels)
    if not labels:
        raise DataError("labels is empty: a pool needs at least one example to partition")
    for position, label in enumerate(labels):
        if not isinstance(label, str):
            raise DataError(
                f"labels[{position}] is {label!r} ({type(label).__name__}); every label must be "
                "a str naming the example's task family"
            )
    return labels


def _check_common(labels: Sequence[str], num_clients: Any, seed: Any) -> list[str]:
    labels = _check_labels(labels)
    if not isinstance(num_clients, numbers.Integral) or isinstance(num_clients, bool) or num_clients < 1:
        raise ConfigError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if num_clients > len(labels):
        raise ConfigError(
            f"federation.num_clients = {num_clients} is more than the {len(labels)} examples in the pool; "
            f"allowed: 1..{len(labels)}, or add examples (tasks.train_per_family / tasks.test_per_family, data files)"
        )
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    return labels


# --------------------------------------------------------------------------- flwr glue


def _shuffled_pool(labels: list[str], seed: int) -> datasets.Dataset:
    """The labels as a Dataset ("label", "idx"), shuffled with `seed`."""
    import datasets  # imported here: `datasets` costs ~1 s, counting and tables need none of it

    pool = datasets.Dataset.from_dict({"label": labels, "idx": list(range(len(labels)))})
    return pool.shuffle(seed=seed)


def _run(partitioner: Partitioner, pool: datasets.Dataset, num_clients: int) -> list[list[int]]:
    """Assign `pool` to a fresh flwr partitioner and read every client's indices back."""
    partitioner.dataset = pool
    return [[int(i) for i in partitioner.load_partition(k)["idx"]] for k in range(num_clients)]


# --------------------------------------------------------------------------- schemes


def iid(labels: Sequence[str], num_clients: int, seed: int) -> list[list[int]]:
    """Uniformly random split: client sizes differ by at most one example.

    flwr's `IidPartitioner` cuts the pool into contiguous shards and never
    shuffles, so the randomness comes from the seeded shuffle of the pool.
    """
    from flwr_datasets.partitioner import IidPartitioner

    labels = _check_common(labels, num_clients, seed)
    return _run(IidPartitioner(num_partitions=num_clients), _shuffled_pool(labels, seed), num_clients)


def by_family(labels: Sequence[str], num_clients: int, seed: int) -> list[list[int]]:
    """One task family per client (the strongest label skew).

    With F families sorted by name:

    - num_clients >= F: client k holds family k % F, so clients cycle over the
      families, and a family's examples are split evenly (at random, by the
      seed) among the clients that hold it. Uses flwr's
      `PathologicalPartitioner(num_classes_per_partition=1,
      class_assignment_mode="deterministic")`. Which family a client holds
      does not depend on the seed, so logs stay readable across seeds.
    - num_clients < F: each client holds several whole families. Written by
      hand because `PathologicalPartitioner` gives every client the same
      number of families and lets clients share them: families go, largest
      first, to the client with the fewest examples so far (ties: lower id),
      which keeps client sizes as even as whole families allow.

    Raises ConfigError when a family has fewer examples than clients holding it.
    """
    labels = _check_common(labels, num_clients, seed)
    sizes = Counter(labels)
    families = sorted(sizes)
    pool = _shuffled_pool(labels, seed)

    if num_clients < len(families):
        load = [0] * num_clients
        owner: dict[str, int] = {}
        for family in sorted(families, key=lambda f: (-sizes[f], f)):
            client = min(range(num_clients), key=lambda k: (load[k], k))
            owner[family] = client
            load[client] += sizes[family]
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for label, index in zip(pool["label"], pool["idx"], strict=True):
            parts[owner[label]].append(int(index))
        return parts

    # Client k holds family k % F, so family j has ceil((N - j) / F) holders: that
    # fits its size for all j while N <= F * size_j + j.
    limits = {f: len(families) * sizes[f] + j for j, f in enumerate(families)}
    most_clients = min(limits.values())
    if num_clients > most_clients:
        family = min(limits, key=limits.__getitem__)
        holders = len(range(families.index(family), num_clients, len(families)))
        raise ConfigError(
            f"by_family: num_clients={num_clients} would split family {family!r} "
            f"({sizes[family]} examples) among {holders} clients; allowed: 1..{most_clients} "
            "for this pool"
        )

    from flwr_datasets.partitioner import PathologicalPartitioner

    partitioner = PathologicalPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        num_classes_per_partition=1,
        class_assignment_mode="deterministic",
        shuffle=True,
        seed=seed,
    )
    return _run(partitioner, pool, num_clients)


def dirichlet(
    labels: Sequence[str], num_clients: int, alpha: float, seed: int, min_partition_size: int = 1
) -> list[list[int]]:
    """For each family, client shares drawn from Dirichlet(alpha): small alpha = skewed.

    Uses flwr's `DirichletPartitioner` (self_balancing off). When some client
    ends up with fewer than `min_partition_size` examples it redraws, at most
    10 times, then gives up: with few families, small alpha and many clients
    that happens often, and this raises ConfigError saying so. Pass
    `min_partition_size=0` to accept empty clients.
    """
    labels = _check_common(labels, num_clients, seed)
    if (
        not isinstance(alpha, numbers.Real)
        or isinstance(alpha, bool)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise ConfigError(f"dirichlet: alpha must be a finite number > 0, got {alpha!r}")
    if (
        not isinstance(min_partition_size, numbers.Integral)
        or isinstance(min_partition_size, bool)
        or min_partition_size < 0
        or min_partition_size * num_clients > len(labels)
    ):
        raise ConfigError(
            f"dirichlet: min_partition_size must be an integer in 0..{len(labels) // num_clients} "
            f"({len(labels)} examples over {num_clients} clients), got {min_partition_size!r}"
        )

    from flwr_datasets.partitioner import DirichletPartitioner

    partitioner = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=int(min_partition_size),
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    try:
        with warnings.catch_warnings():
            # flwr warns on every redraw; the ConfigError below says it once, with the fix.
            warnings.simplefilter("ignore", UserWarning)
            return _run(partitioner, _shuffled_pool(labels, seed), num_clients)
    except ValueError as exc:
        raise ConfigError(
            f"dirichlet: no split with alpha={alpha} gave all {num_clients} clients at least "
            f"{min_partition_size} example(s) in 11 draws ({len(labels)} examples, {len(set(labels))} "
            "families); raise federation.partition.alpha, lower federation.num_clients, or add examples "
            "(tasks.train_per_family / tasks.test_per_family, or more data files)"
        ) from exc


def quantity_skew(
    labels: Sequence[str], num_clients: int, seed: int, kind: str = "linear"
) -> list[list[int]]:
    """Client sizes that grow with the client id; the label mix stays roughly IID.

    Client k (k = 1..N) gets a share of the pool proportional to k ("linear"),
    k² ("square") or e^k ("exponential"), via flwr's `LinearPartitioner`,
    `SquarePartitioner` and `ExponentialPartitioner`: the smallest client is
    always client 0, the largest the last one, and rounding leftovers go to
    the last. "exponential" is extreme (the last client holds ~63% of the
    pool), and its small clients round to 0 examples quickly (8 clients need
    more than ~1,700 examples): that raises ConfigError.
    """
    from flwr_datasets.partitioner import (
        ExponentialPartitioner,
        LinearPartitioner,
        SquarePartitioner,
    )

    kinds: dict[str, Callable[[int], Partitioner]] = {
        "linear": LinearPartitioner,
        "square": SquarePartitioner,
        "exponential": ExponentialPartitioner,
    }
    labels = _check_common(labels, num_clients, seed)
    if kind not in kinds:
        raise ConfigError(f"quantity_skew: kind must be one of {', '.join(QUANTITY_KINDS)}, got {kind!r}")
    try:
        # e^k overflows past k = 709; flwr then fails its size check, which we report.
        with np.errstate(over="ignore", invalid="ignore"):
            return _run(kinds[kind](num_clients), _shuffled_pool(labels, seed), num_clients)
    except ValueError as exc:
        raise ConfigError(
            f"quantity_skew: kind={kind!r} with num_clients={num_clients} leaves some client with "
            f"no examples out of {len(labels)}; use fewer clients, more examples or a milder kind "
            f"(one of {', '.join(QUANTITY_KINDS)})"
        ) from exc


# --------------------------------------------------------------------------- dispatch

_SCHEME_FUNCTIONS: dict[str, Callable[..., list[list[int]]]] = {
    "iid": iid,
    "by_family": by_family,
    "dirichlet": dirichlet,
    "quantity_skew": quantity_skew,
}
_SCHEME_OPTIONS: dict[str, tuple[str, ...]] = {
    "iid": (),
    "by_family": (),
    "dirichlet": ("alpha", "min_partition_size"),
    "quantity_skew": ("kind",),
}
_REQUIRED_OPTIONS: dict[str, tuple[str, ...]] = {"dirichlet": ("alpha",)}


def partition(
    labels: Sequence[str], scheme: str, num_clients: int, seed: int, **options: Any
) -> list[list[int]]:
    """Split the pool with the scheme named `scheme`, passing it `options`.

    Options: dirichlet takes `alpha` (required) and `min_partition_size`;
    quantity_skew takes `kind`. An option that belongs to another scheme is
    ignored (so a config can always pass e.g. `alpha`); an option no scheme
    knows is a ConfigError.
    """
    if scheme not in _SCHEME_FUNCTIONS:
        raise ConfigError(f"partition scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    known = {name for names in _SCHEME_OPTIONS.values() for name in names}
    for name in options:
        if name not in known:
            allowed = ", ".join(_SCHEME_OPTIONS[scheme]) or "none"
            raise ConfigError(
                f"unknown partition option {name!r} for scheme {scheme!r}; its options: {allowed}"
            )
    for name in _REQUIRED_OPTIONS.get(scheme, ()):
        if name not in options:
            raise ConfigError(f"partition scheme {scheme!r} needs option {name!r}")
    used = {name: value for name, value in options.items() if name in _SCHEME_OPTIONS[scheme]}
    return _SCHEME_FUNCTIONS[scheme](labels, num_clients=num_clients, seed=seed, **used)


# --------------------------------------------------------------------------- reporting


def partition_counts(partitions: Sequence[Sequence[int]], labels: Sequence[str]) -> dict[int, dict[str, int]]:
    """Examples per family for each client: {client: {family: count}}.

    Every client lists every family of the pool (sorted), zeros included, so
    the result reads as a table.
    """
    labels = _check_labels(labels)
    families = sorted(set(labels))
    counts: dict[int, dict[str, int]] = {}
    for client, indices in enumerate(partitions):
        row = dict.fromkeys(families, 0)
        for index in indices:
            if not 0 <= index < len(labels):
                raise DataError(
                    f"client {client} holds index {index}, outside the pool's 0..{len(labels) - 1}"
                )
            row[labels[index]] += 1
        counts[client] = row
    return counts


def _rows(partitions: Sequence[Sequence[int]], labels: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Header and body rows (clients, then "all") shared by the table formats."""
    counts = partition_counts(partitions, labels)
    families = sorted(set(labels))
    header = ["client", *families, "total"]
    body = [[str(c), *(str(row[f]) for f in families), str(sum(row.values()))] for c, row in counts.items()]
    totals = [sum(row[f] for row in counts.values()) for f in families]
    body.append(["all", *(str(t) for t in totals), str(sum(totals))])
    return header, body


def partition_table(
    partitions: Sequence[Sequence[int]], labels: Sequence[str], title: str | None = "Partition"
) -> Table:
    """A rich Table: one row per client (plus an "all" row), one column per family, and total."""
    from rich.table import Table

    header, body = _rows(partitions, labels)
    table = Table(title=title)
    table.add_column(header[0], justify="right", style="bold")
    for name in header[1:]:
        table.add_column(name, justify="right")
    for i, row in enumerate(body):
        table.add_row(*row, end_section=i == len(body) - 2)
    return table


def format_partition(partitions: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    """The same table as plain, right-aligned text, for logs and tests."""
    header, body = _rows(partitions, labels)
    widths = [max(len(row[c]) for row in [header, *body]) for c in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *body])
