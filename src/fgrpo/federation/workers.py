"""A pool of worker processes that runs a batch of calls at once and survives a worker that dies.

Why processes: on a CPU, several single-thread torch processes do more work
than one process using every core (`fgrpo.core.threads`), and a round's
clients are independent. Why `concurrent.futures.ProcessPoolExecutor`: the
standard library already schedules tasks on a fixed set of processes; the
pool is started once per run and each worker keeps what it loaded (a model)
between calls. Processes are spawned, never forked: a fork of a process whose
torch thread pools already run can hang.

A worker that dies (killed, out of memory, `os._exit`) breaks the whole
`ProcessPoolExecutor`: every call still in flight fails with it, and nothing
says which worker died. So the pool is started afresh and each lost call runs
again alone (even a lone one: an idle worker may have been the one killed): exactly the call whose worker
dies on its own is reported as `WORKER_DIED`, and the others get the result
they would have had (the calls must therefore be repeatable, as seeded client
rounds are). The next batch runs on the fresh pool.

A worker also ends when the process that owns the pool dies without shutting
it down (killed by a signal that reaches only that process, e.g. `kill PID` or a
scheduler's SIGKILL): otherwise its workers would keep computing, orphaned, and
steal the cores of whatever runs next (`exit_with_parent`).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any


class _WorkerDied:
    """The result of a call whose worker process died while running it alone."""

    def __repr__(self) -> str:
        return "WORKER_DIED"


WORKER_DIED = _WorkerDied()


def exit_with_parent(parent_pid: int, interval_s: float = 0.5) -> threading.Thread:
    """Watch, on a daemon thread, for the owner's death (this process re-parented) and then exit at once.

    Polling `os.getppid()` works on every POSIX system (Linux's PR_SET_PDEATHSIG would not on macOS) and costs
    one system call every `interval_s` seconds.
    """

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent_pid:
                os._exit(1)

    watcher = threading.Thread(target=watch, name="fgrpo-exit-with-parent", daemon=True)
    watcher.start()
    return watcher


def start_worker(threads: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    """Runs first in every worker: its thread budget, then the caller's initializer.

    The budget goes into the environment before torch is imported (torch sizes its
    thread pool from OMP_NUM_THREADS), so a worker does not pay for importing torch
    before its first call needs it. (Imported here: the process that owns the pool
    may be a model-free server, which never imports fgrpo.core.)
    """
    from fgrpo.core.threads import apply_threads, thread_env

    exit_with_parent(os.getppid())
    os.environ.update(thread_env(threads))
    if "torch" in sys.modules:
        apply_threads(threads)
    if initializer is not None:
        initializer(*initargs)


class WorkerPool:
    """`workers` spawned processes, each with `threads` torch threads; `run` maps a function over a batch."""

    def __init__(
        self, workers: int, threads: int, initializer: Callable[..., None] | None = None, initargs: tuple = ()
    ) -> None:
        if workers < 1 or threads < 1:
            raise ValueError(f"a worker pool needs workers >= 1 and threads >= 1, got {workers} and {threads}")
        self.workers, self.threads = workers, threads
        self._initargs = (threads, initializer, initargs)
        self._executor: ProcessPoolExecutor | None = None
        self.restarts = 0  # pools started again after a worker died

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=start_worker, initargs=self._initargs
            )
        return self._executor

    def _restart(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._executor = None
        self.restarts += 1

    def run(self, fn: Callable[[Any], Any], items: Sequence[Any], on_done: Callable[[int, Any], None] | None = None) -> list:
        """[fn(item) for item in items], computed in the workers; WORKER_DIED where a worker died running that item.

        `fn` must be a module-level function (it is sent by reference). `on_done(index, result)`
        is called in this process as each result arrives. Exceptions `fn` raises propagate.
        """
        results: list[Any] = [None] * len(items)
        def submit_all() -> dict:
            return {self._pool().submit(fn, item): index for index, item in enumerate(items)}

        try:
            futures = submit_all()
        except BrokenProcessPool:
            # A worker of the previous call died after its results were in (the executor notices late,
            # under load): this call starts on a fresh pool instead of failing.
            self._restart()
            futures = submit_all()
        lost = []
        for future in as_completed(futures):
            index = futures[future]
            try:
                results[index] = future.result()
            except BrokenProcessPool:
                lost.append(index)
                continue
            if on_done is not None:
                on_done(index, results[index])
        if lost:
            self._restart()
        for index in sorted(lost):  # alone this time, so a death is this call's own
            try:
                results[index] = self._pool().submit(fn, items[index]).result()
            except BrokenProcessPool:
                results[index] = WORKER_DIED
                self._restart()
            if on_done is not None:
                on_done(index, results[index])
        return results

    def close(self) -> None:
        """Stop the workers (waits for calls in flight)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
