"""Tests for fgrpo.federation.workers: a process pool that maps calls at once and survives a worker that dies."""

from __future__ import annotations

import os

import pytest
from worker_apps import square_or_die, square_or_sleep, thread_report

from fgrpo.federation.workers import TIMED_OUT, WORKER_DIED, WorkerPool


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


def test_a_stuck_call_is_stopped_at_its_time_limit_and_the_others_come_back():
    import time

    with WorkerPool(2, 1) as pool:
        started = time.monotonic()
        results = pool.run(square_or_sleep, [2, -1, 3, 4], timeout_s=2.0)
        assert time.monotonic() - started < 60  # not the hour the stuck call would sleep
        assert results[1] is TIMED_OUT and pool.timeouts == 1
        assert [results[i][0] for i in (0, 2, 3)] == [4, 9, 16]  # those cut short by the kill ran again
        assert [value for value, _ in pool.run(square_or_sleep, [5], timeout_s=2.0)] == [25]  # the pool works on


def test_a_time_limit_counts_from_when_a_worker_starts_the_call():
    import time

    with WorkerPool(1, 1, initializer=time.sleep, initargs=(2.0,)) as pool:  # a worker's start-up is not a call's time
        results = pool.run(square_or_sleep, [1, 2, 3], timeout_s=1.0)
        assert [value for value, _ in results] == [1, 4, 9] and pool.timeouts == 0


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


OWNER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from worker_apps import square_or_die
from fgrpo.federation.workers import WorkerPool

pool = WorkerPool(2, 1).__enter__()
pids = {pid for _, pid in pool.run(square_or_die, [1, 2, 3, 4])}
print(" ".join(map(str, sorted(pids))), flush=True)
time.sleep(600)  # killed by the test long before
"""


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc")
def test_workers_exit_when_the_owner_is_killed_without_shutting_the_pool_down(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(Path(__file__).parent)], stdout=subprocess.PIPE, text=True
    )
    try:
        workers = [int(pid) for pid in owner.stdout.readline().split()]
        assert workers and all(alive(pid) for pid in workers)
    finally:
        owner.send_signal(signal.SIGKILL)  # as `kill -9 PID`: only the owner gets it
        owner.wait()
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers), "orphaned workers kept running"


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
