"""Tests for fgrpo.data.partition_cache: the same indices as partitioning, read back without partitioning,
and a damaged or planted file never used."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fgrpo.data import partition as partition_module
from fgrpo.data.partition_cache import cached_partition, partition_key, valid_partition

LABELS = [f for i in range(40) for f in ("sort", "reverse", "max") if i < {"sort": 40, "reverse": 30, "max": 20}[f]]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FGRPO_CACHE", str(tmp_path))
    return tmp_path / "partitions"


def files(cache):
    return sorted(cache.glob("*.json"))


def test_the_cached_indices_are_the_partition_and_a_second_call_does_not_partition(cache, monkeypatch):
    expected = partition_module.partition(LABELS, "dirichlet", 4, 7, alpha=0.5)
    assert cached_partition(LABELS, "dirichlet", 4, 7, alpha=0.5) == expected
    assert len(files(cache)) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("partitioned again although the cache holds the indices")

    monkeypatch.setattr(partition_module, "partition", refuse)
    assert cached_partition(LABELS, "dirichlet", 4, 7, alpha=0.5) == expected


def test_every_input_of_the_indices_is_in_the_key():
    base = partition_key(LABELS, "dirichlet", 4, 7, {"alpha": 0.5})
    others = [
        partition_key(LABELS[:-1], "dirichlet", 4, 7, {"alpha": 0.5}),
        partition_key(LABELS[::-1], "dirichlet", 4, 7, {"alpha": 0.5}),
        partition_key(LABELS, "iid", 4, 7, {"alpha": 0.5}),
        partition_key(LABELS, "dirichlet", 3, 7, {"alpha": 0.5}),
        partition_key(LABELS, "dirichlet", 4, 8, {"alpha": 0.5}),
        partition_key(LABELS, "dirichlet", 4, 7, {"alpha": 0.3}),
    ]
    assert len({base, *others}) == 7
    assert partition_key(LABELS, "dirichlet", 4, 7, {"alpha": 0.5}) == base


@pytest.mark.parametrize(
    "planted",
    [
        "not json {",
        json.dumps([[0, 1], [2]]),  # too few clients
        json.dumps([[0, 1], [1], [2], [3]]),  # index 1 in two clients
        json.dumps([[0, 10_000], [1], [2], [3]]),  # out of the pool
        json.dumps([[0, -1], [1], [2], [3]]),
        json.dumps([[0, 1.5], [1], [2], [3]]),
        json.dumps([[0, True], [2], [3], [4]]),
        json.dumps({"__class__": "os.system"}),
    ],
)
def test_a_damaged_or_planted_file_is_ignored_and_rewritten(cache, planted):
    expected = partition_module.partition(LABELS, "by_family", 4, 0)
    cached_partition(LABELS, "by_family", 4, 0)
    (path,) = files(cache)
    path.write_text(planted)
    assert cached_partition(LABELS, "by_family", 4, 0) == expected
    assert json.loads(path.read_text()) == expected


def test_valid_partition_accepts_clients_that_hold_nothing():
    assert valid_partition([[0, 2], [], [1]], pool_size=3, num_clients=3)
    assert not valid_partition([[0, 2], [], [1]], pool_size=2, num_clients=3)


def test_an_unwritable_cache_still_partitions(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FGRPO_CACHE", str(blocker))  # a file where the folder should be
    assert cached_partition(LABELS, "iid", 3, 1) == partition_module.partition(LABELS, "iid", 3, 1)


def test_a_write_that_fails_midway_leaves_no_staging_file(cache, tmp_path, monkeypatch):
    import fgrpo.data.partition_cache as partition_cache

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(partition_cache.json, "dump", disk_full)
    assert cached_partition(LABELS, "iid", 3, 1) == partition_module.partition(LABELS, "iid", 3, 1)
    assert list((tmp_path / "partitions").iterdir()) == []  # neither a cache file nor a .partition-* leftover


def test_a_fresh_process_reading_the_cache_imports_neither_flwr_datasets_nor_datasets(cache, tmp_path):
    cached_partition(LABELS, "dirichlet", 4, 7, alpha=0.5)
    script = (
        "import sys, json\n"
        "from fgrpo.data.partition_cache import cached_partition\n"
        f"parts = cached_partition({LABELS!r}, 'dirichlet', 4, 7, alpha=0.5)\n"
        "print(json.dumps([parts, 'flwr_datasets' in sys.modules, 'datasets' in sys.modules]))\n"
    )
    env = {**os.environ, "FGRPO_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    parts, imported_flwr_datasets, imported_datasets = json.loads(out.stdout)
    assert parts == partition_module.partition(LABELS, "dirichlet", 4, 7, alpha=0.5)
    assert not imported_flwr_datasets and not imported_datasets
