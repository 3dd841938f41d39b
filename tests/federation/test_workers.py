"""Tests for fgrpo.federation.workers: a process pool that maps calls at once and survives a worker that dies."""

from __future__ import annotations

import os

import pytest
from worker_apps import square_or_die, thread_report

from fgrpo.federation.workers import WORKER_DIED, WorkerPool


def test_results_come_back_in_order_from_several_processes():
    seen = []
    with WorkerPool(2, 1) as pool:
        results = pool.run(square_or_die, [1, 2, 3, 4], on_done=lambda i, r: seen.append(i))
    assert [value for value, _ in results] == [1, 4, 9, 16]
    assert os.getpid() not in {pid for _, pid in results}
    assert sorted(seen) == [0, 1, 2, 3]


def test_a_dying_worker_fails_only_its_own_call_and_the_pool_recovers():
    with WorkerPool(2, 1) as pool:
        results = pool.run(square_or_die, [3, -1])
        assert results[1] is WORKER_DIED
        assert results[0][0] == 9  # lost with the pool (or not), run again alone
        assert pool.restarts >= 1
        assert [value for value, _ in pool.run(square_or_die, [6, 7])] == [36, 49]  # the next batch runs


def test_a_worker_that_dies_between_batches_does_not_fail_the_next_one():
    import signal
    import time

    with WorkerPool(1, 1) as pool:
        (_, pid), = pool.run(square_or_die, [2])
        os.kill(pid, signal.SIGKILL)  # dies after its results were in: the executor learns it late
        time.sleep(1.0)
        assert [value for value, _ in pool.run(square_or_die, [3, 4])] == [9, 16]


def test_workers_keep_their_processes_between_batches():
    with WorkerPool(1, 1) as pool:
        (_, first), = pool.run(square_or_die, [2])
        (_, second), = pool.run(square_or_die, [3])
    assert first == second


def test_a_worker_runs_with_the_thread_budget_it_was_given(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the parent's own budget must not leak into the worker's
    with WorkerPool(1, 2) as pool:
        (report,) = pool.run(thread_report, [None])
    assert report == (2, "2")


def test_a_pool_needs_at_least_one_worker_and_thread():
    with pytest.raises(ValueError, match="workers >= 1"):
        WorkerPool(0, 1)
