"""Tests for fgrpo.data.partition: validity, determinism, the skew each scheme promises, errors, tables."""

from __future__ import annotations

import io
import re
import statistics
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from fgrpo.errors import ConfigError, DataError
from fgrpo.data.partition import (
    by_family,
    dirichlet,
    format_partition,
    iid,
    partition,
    partition_counts,
    partition_table,
    quantity_skew,
)

# 4 families of unequal sizes, interleaved so that pool order is not family order.
SIZES = {"arith": 60, "copy": 45, "count": 30, "logic": 25}
LABELS = [f for i in range(max(SIZES.values())) for f in SIZES if i < SIZES[f]]
FAMILIES = sorted(SIZES)

CASES = [
    ("iid", 4, {}),
    ("by_family", 4, {}),
    ("by_family", 3, {}),
    ("by_family", 7, {}),
    ("dirichlet", 4, {"alpha": 0.5}),
    ("dirichlet", 6, {"alpha": 5.0, "min_partition_size": 10}),
    ("quantity_skew", 4, {}),
    ("quantity_skew", 4, {"kind": "square"}),
    ("quantity_skew", 4, {"kind": "exponential"}),
]
CASE_IDS = [f"{s}-{n}-{'-'.join(map(str, o.values()))}" for s, n, o in CASES]


def assert_valid(parts: list[list[int]], num_clients: int, n: int) -> None:
    assert len(parts) == num_clients
    flat = [i for part in parts for i in part]
    assert all(type(i) is int for i in flat)
    assert all(0 <= i < n for i in flat)
    assert len(flat) == len(set(flat)), "an index is used twice"


def client_families(parts: list[list[int]], labels: list[str]) -> list[set[str]]:
    return [{labels[i] for i in part} for part in parts]


def mean_max_share(parts: list[list[int]], labels: list[str]) -> float:
    """Mean over clients of the share of a client's examples in its largest family."""
    rows = partition_counts(parts, labels).values()
    return statistics.mean(max(row.values()) / sum(row.values()) for row in rows)


# --------------------------------------------------------------------------- every scheme


@pytest.mark.parametrize(("scheme", "num_clients", "options"), CASES, ids=CASE_IDS)
def test_partition_is_valid_and_covers_the_pool(scheme, num_clients, options):
    parts = partition(LABELS, scheme, num_clients, seed=0, **options)
    assert_valid(parts, num_clients, len(LABELS))
    assert sorted(i for part in parts for i in part) == list(range(len(LABELS)))
    assert all(parts), "a client got no examples"


@pytest.mark.parametrize(("scheme", "num_clients", "options"), CASES, ids=CASE_IDS)
def test_partition_is_deterministic_given_the_seed(scheme, num_clients, options):
    first = partition(LABELS, scheme, num_clients, seed=3, **options)
    assert partition(LABELS, scheme, num_clients, seed=3, **options) == first
    assert partition(LABELS, scheme, num_clients, seed=4, **options) != first


def test_partition_dispatches_to_the_scheme_functions():
    assert partition(LABELS, "iid", 3, 1) == iid(LABELS, 3, 1)
    assert partition(LABELS, "by_family", 5, 1) == by_family(LABELS, 5, 1)
    assert partition(LABELS, "dirichlet", 3, 1, alpha=0.3) == dirichlet(LABELS, 3, 0.3, 1)
    assert partition(LABELS, "quantity_skew", 3, 1, kind="square") == quantity_skew(LABELS, 3, 1, "square")


def test_options_of_another_scheme_are_ignored():
    assert partition(LABELS, "iid", 4, 0, alpha=0.5, kind="square") == iid(LABELS, 4, 0)


def test_single_client_gets_everything():
    for scheme, options in [("iid", {}), ("by_family", {}), ("dirichlet", {"alpha": 1.0}), ("quantity_skew", {})]:
        (only,) = partition(LABELS, scheme, 1, seed=0, **options)
        assert sorted(only) == list(range(len(LABELS)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    labels=st.lists(st.sampled_from("abcde"), min_size=1, max_size=40),
    data=st.data(),
)
def test_schemes_give_disjoint_valid_indices_on_random_pools(labels, data):
    num_clients = data.draw(st.integers(1, len(labels)), label="num_clients")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    # Always feasible: iid and dirichlet that accepts empty clients.
    assert_valid(iid(labels, num_clients, seed), num_clients, len(labels))
    assert_valid(dirichlet(labels, num_clients, 0.5, seed, min_partition_size=0), num_clients, len(labels))
    # by_family may refuse (a family too small for its holders), but only with ConfigError.
    try:
        parts = by_family(labels, num_clients, seed)
    except ConfigError as exc:
        assert "num_clients" in str(exc)
    else:
        assert_valid(parts, num_clients, len(labels))
        assert sorted(i for part in parts for i in part) == list(range(len(labels)))


# --------------------------------------------------------------------------- iid


def test_iid_sizes_are_balanced_and_label_mix_is_broad():
    parts = iid(LABELS, 4, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(fams == set(FAMILIES) for fams in client_families(parts, LABELS))


# --------------------------------------------------------------------------- by_family


def test_by_family_one_family_per_client_when_counts_match():
    parts = by_family(LABELS, len(FAMILIES), seed=0)
    families = client_families(parts, LABELS)
    assert all(len(f) == 1 for f in families)
    # client k holds the k-th family by name, whole
    assert [f.pop() for f in families] == FAMILIES
    assert [len(p) for p in parts] == [SIZES[f] for f in FAMILIES]


def test_by_family_cycles_and_splits_a_family_among_its_holders():
    parts = by_family(LABELS, 6, seed=0)
    families = client_families(parts, LABELS)
    assert all(len(f) == 1 for f in families)
    holder_family = [f.pop() for f in families]
    assert holder_family == FAMILIES + FAMILIES[:2]  # client k holds family k % 4
    # arith (60) is split between clients 0 and 4, copy (45) between 1 and 5: evenly
    assert sorted([len(parts[0]), len(parts[4])]) == [30, 30]
    assert sorted([len(parts[1]), len(parts[5])]) == [22, 23]


def test_by_family_keeps_families_whole_with_fewer_clients():
    parts = by_family(LABELS, 2, seed=0)
    owners = {f: {k for k, p in enumerate(parts) for i in p if LABELS[i] == f} for f in FAMILIES}
    assert all(len(o) == 1 for o in owners.values())
    # largest-first balancing: arith+logic (85) vs copy+count (75)
    assert sorted(len(p) for p in parts) == [75, 85]


# --------------------------------------------------------------------------- dirichlet


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha():
    labels = [f"f{i % 6}" for i in range(300)]
    skewed = mean_max_share(dirichlet(labels, 5, alpha=0.1, seed=1), labels)
    mild = mean_max_share(dirichlet(labels, 5, alpha=1.0, seed=1), labels)
    near_iid = mean_max_share(dirichlet(labels, 5, alpha=100.0, seed=1), labels)
    assert skewed > mild > near_iid
    assert skewed > 0.5
    assert near_iid < 0.3  # 1/6 would be perfectly even


def test_dirichlet_respects_min_partition_size():
    parts = dirichlet(LABELS, 5, alpha=1.0, seed=0, min_partition_size=15)
    assert min(len(p) for p in parts) >= 15


# --------------------------------------------------------------------------- quantity_skew


@pytest.mark.parametrize(("kind", "least_ratio"), [("linear", 3.5), ("square", 12.0), ("exponential", 15.0)])
def test_quantity_skew_sizes_differ_and_grow_with_client_id(kind, least_ratio):
    parts = quantity_skew(LABELS, 4, seed=0, kind=kind)
    sizes = [len(p) for p in parts]
    assert sizes == sorted(sizes)
    assert max(sizes) / min(sizes) > least_ratio
    iid_sizes = [len(p) for p in iid(LABELS, 4, seed=0)]
    assert max(iid_sizes) / min(iid_sizes) < 1.1


def test_quantity_skew_keeps_the_label_mix_roughly_iid():
    parts = quantity_skew(LABELS, 3, seed=0, kind="linear")
    largest = Counter(LABELS[i] for i in parts[-1])
    for family, size in SIZES.items():
        assert abs(largest[family] / len(parts[-1]) - size / len(LABELS)) < 0.1


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (
            lambda: partition(LABELS, "shards", 4, 0),
            ConfigError,
            r"scheme must be one of iid, by_family, dirichlet, quantity_skew, got 'shards'",
        ),
        (lambda: partition(LABELS, "iid", 0, 0), ConfigError, r"num_clients must be an integer >= 1, got 0"),
        (lambda: partition(LABELS, "iid", 2.5, 0), ConfigError, r"num_clients"),
        (lambda: partition(LABELS, "iid", True, 0), ConfigError, r"num_clients"),
        (lambda: partition(LABELS, "iid", 161, 0), ConfigError, r"federation.num_clients = 161 .*160 examples.*allowed: 1\.\.160"),
        (lambda: partition(LABELS, "iid", 4, -1), ConfigError, r"seed"),
        (lambda: partition(LABELS, "iid", 4, 0, alhpa=0.5), ConfigError, r"'alhpa'.*'iid'"),
        (lambda: partition(LABELS, "dirichlet", 4, 0, alhpa=0.5), ConfigError, r"'alhpa'.*alpha, min_partition_size"),
        (lambda: partition(LABELS, "dirichlet", 4, 0), ConfigError, r"needs option 'alpha'"),
        (lambda: partition(LABELS, "dirichlet", 4, 0, alpha=0), ConfigError, r"alpha must be .*> 0, got 0"),
        (lambda: partition(LABELS, "dirichlet", 4, 0, alpha=-1.0), ConfigError, r"alpha"),
        (lambda: partition(LABELS, "dirichlet", 4, 0, alpha=float("inf")), ConfigError, r"alpha"),
        (
            lambda: partition(LABELS, "dirichlet", 4, 0, alpha=1, min_partition_size=41),
            ConfigError,
            r"min_partition_size.*0\.\.40",
        ),
        (lambda: dirichlet(LABELS, 60, 0.05, 0), ConfigError, r"alpha=0\.05.*raise federation\.partition\.alpha, lower federation\.num_clients"),
        (
            lambda: partition(LABELS, "quantity_skew", 4, 0, kind="cubic"),
            ConfigError,
            r"kind must be one of linear, square, exponential, got 'cubic'",
        ),
        (lambda: quantity_skew(LABELS, 8, 0, kind="exponential"), ConfigError, r"kind='exponential'.*num_clients=8"),
        (
            lambda: by_family(["a", "b", "b"], 3, 0),
            ConfigError,
            r"num_clients=3 .*'a' \(1 examples\) among 2 .*allowed: 1\.\.2",
        ),
        (lambda: partition([], "iid", 1, 0), DataError, r"labels is empty"),
        (lambda: partition(["a", 3], "iid", 1, 0), DataError, r"labels\[1\]"),
        (lambda: partition_counts([[0, 5]], ["a", "b"]), DataError, r"client 0 holds index 5"),
    ],
)
def test_bad_input_raises_an_error_naming_it(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


# --------------------------------------------------------------------------- counts and tables

TINY_LABELS = ["a", "b", "a", "c", "a"]
TINY_PARTS = [[0, 1], [2, 4], [3]]


def test_partition_counts_by_hand():
    assert partition_counts(TINY_PARTS, TINY_LABELS) == {
        0: {"a": 1, "b": 1, "c": 0},
        1: {"a": 2, "b": 0, "c": 0},
        2: {"a": 0, "b": 0, "c": 1},
    }


def test_format_partition_by_hand():
    assert format_partition(TINY_PARTS, TINY_LABELS) == "\n".join(
        [
            "client  a  b  c  total",
            "     0  1  1  0      2",
            "     1  2  0  0      2",
            "     2  0  0  1      1",
            "   all  3  1  1      5",
        ]
    )


def test_partition_table_holds_the_counts():
    parts = by_family(LABELS, 4, seed=0)
    table = partition_table(parts, LABELS, title="by family")
    assert [c.header for c in table.columns] == ["client", *FAMILIES, "total"]
    assert table.row_count == 5  # 4 clients + "all"
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(table)
    text = console.file.getvalue()
    assert "by family" in text
    rows = [re.findall(r"\w+", line) for line in text.splitlines() if line.startswith("│")]
    expected = [
        [str(k), *(str(SIZES[f]) if f == FAMILIES[k] else "0" for f in FAMILIES), str(SIZES[FAMILIES[k]])]
        for k in range(4)
    ]
    expected.append(["all", *(str(SIZES[f]) for f in FAMILIES), str(len(LABELS))])
    assert rows == expected
