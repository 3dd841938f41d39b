"""Tests for fgrpo.core.threads: the thread budget every fgrpo process takes (workers × threads ≤ cores)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fgrpo.core.threads import (
    apply_threads,
    auto_threads,
    available_cores,
    busy_cores,
    env_thread_budget,
    resolve_workers,
    thread_env,
    threads_per_worker,
)


@given(workers=st.integers(1, 64), cores=st.integers(1, 256), budget=st.none() | st.integers(1, 64))
def test_auto_never_oversubscribes_and_uses_at_least_one_thread(workers, cores, budget):
    threads = threads_per_worker(workers, cores, "auto", budget)
    assert threads >= 1
    assert workers * threads <= max(cores, workers)  # more workers than cores: one thread each is the floor
    if budget is not None:
        assert threads <= budget


def test_auto_splits_the_cores_between_workers():
    assert threads_per_worker(1, 2) == 2
    assert threads_per_worker(2, 2) == 1  # the quickstart on a 2-core laptop: 2 workers × 1 thread
    assert threads_per_worker(4, 16) == 4
    assert threads_per_worker(3, 16) == 5
    assert threads_per_worker(4, 16, env_budget=2) == 2  # a budget the launcher set is honoured
    assert threads_per_worker(4, 16, env_budget=8) == 4  # but never past the fair share


def test_auto_leaves_out_the_cores_other_processes_keep_busy():
    assert threads_per_worker(1, 2, busy=1.0) == 1  # beside a busy loop on a 2-core laptop
    assert threads_per_worker(1, 2, busy=2.0) == 1  # never below one
    assert threads_per_worker(1, 2, busy=0.3) == 2  # noise rounds away
    assert threads_per_worker(2, 16, busy=4.0) == 6
    assert threads_per_worker(1, 16, busy=4.0, env_budget=16) == 12
    assert threads_per_worker(1, 2, 2, busy=1.0) == 2  # an explicit count still wins


def test_auto_threads_counts_busy_cores_only_without_a_launchers_budget(monkeypatch):
    monkeypatch.setattr("fgrpo.core.threads.busy_cores", lambda interval_s=0.05: 1.0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert auto_threads(1, cores=2) == 1
    assert auto_threads(1, cores=2, env={"OMP_NUM_THREADS": "2"}) == 2  # a worker's siblings are its launcher's plan
    assert auto_threads(1, 2, cores=2) == 2


@pytest.mark.machine_load
def test_busy_cores_sees_a_busy_loop_in_another_process():
    import subprocess
    import sys

    assert 0.0 <= busy_cores() <= available_cores()
    loop = "import sys, time\nprint('ready', flush=True)\nend = time.time() + 20\nwhile time.time() < end:\n    pass\n"
    process = subprocess.Popen([sys.executable, "-c", loop], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        assert busy_cores(0.5) >= 0.5  # one process spinning: about one core (more if the machine is busy anyway)
    finally:
        process.kill()
        process.wait()


def test_an_explicit_thread_count_wins():
    assert threads_per_worker(4, 2, 3) == 3
    assert threads_per_worker(1, 64, 1, env_budget=8) == 1


def test_workers_auto_is_min_of_cores_and_clients():
    assert resolve_workers("auto", clients_per_round=4, cores=2) == 2
    assert resolve_workers("auto", clients_per_round=1, cores=16) == 1
    assert resolve_workers("auto", clients_per_round=8, cores=16) == 8
    assert resolve_workers(3, clients_per_round=8, cores=2) == 3


def test_env_budget_reads_only_positive_integers():
    assert env_thread_budget({"OMP_NUM_THREADS": "3"}) == 3
    assert env_thread_budget({"OMP_NUM_THREADS": " 2 "}) == 2
    for bad in ("0", "", "two", "-1", "1.5"):
        assert env_thread_budget({"OMP_NUM_THREADS": bad}) is None
    assert env_thread_budget({}) is None


def test_available_cores_is_this_processs_affinity():
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert available_cores() == expected >= 1


def test_thread_env_covers_the_common_runtimes():
    assert thread_env(3) == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "3"}


def test_apply_threads_sets_torch():
    import torch

    before = torch.get_num_threads()
    try:
        assert apply_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
