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

A batch may be given a time limit per call (`timeout_s`: the run's `federation.round_timeout_s`). A call's
clock starts when a worker starts it (the worker says so on a queue), not when it is submitted: a call that
waits for a free worker, or for a fresh worker's start-up, is not late. A call past its limit is stuck in
user code (a reward that sleeps or loops), which nothing short of ending its process stops: the pool's
workers are killed, the call is `TIMED_OUT`, and the other calls the kill cut short run again on a fresh pool.

A worker also ends when the process that owns the pool dies without shutting
it down (killed by a signal that reaches only that process, e.g. `kill PID` or a
scheduler's SIGKILL): otherwise its workers would keep computing, orphaned, and
steal the cores of whatever runs next (`exit_with_parent`).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any


class _WorkerDied:
    """The result of a call whose worker process died while running it alone."""

    def __repr__(self) -> str:
        return "WORKER_DIED"


WORKER_DIED = _WorkerDied()


class _TimedOut:
    """The result of a call that ran longer than its time limit (its worker was killed to stop it)."""

    def __repr__(self) -> str:
        return "TIMED_OUT"


TIMED_OUT = _TimedOut()

# How often a batch with a time limit looks for calls that started, and for late ones (seconds).
POLL_S = 0.1

_STARTS: Any = None  # in a worker: the pool's queue on which a timed call says that it starts


def _timed_call(fn: Callable[[Any], Any], item: Any, token: int | None) -> Any:
    """fn(item) in a worker; a timed call (`token` given) first says on the pool's queue that it starts now."""
    if token is not None:
        _STARTS.put(token)
    return fn(item)


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


def start_worker(threads: int, initializer: Callable[..., None] | None, initargs: tuple, starts: Any = None) -> None:
    """Runs first in every worker: its thread budget, then the caller's initializer.

    The budget goes into the environment before torch is imported (torch sizes its
    thread pool from OMP_NUM_THREADS), so a worker does not pay for importing torch
    before its first call needs it. (Imported here: the process that owns the pool
    may be a model-free server, which never imports fgrpo.core.)
    """
    from fgrpo.core.threads import apply_threads, thread_env

    global _STARTS
    _STARTS = starts
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
        self._starts: Any = None  # the current executor's queue of started calls
        self._tokens = itertools.count()
        self.restarts = 0  # pools started again after a worker died or was killed
        self.timeouts = 0  # calls stopped at their time limit

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            context = multiprocessing.get_context("spawn")
            self._starts = context.Queue()
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=context, initializer=start_worker, initargs=(*self._initargs, self._starts)
            )
        return self._executor

    def _restart(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._starts.close()
        self._executor = None
        self.restarts += 1

    def _kill_workers(self) -> None:
        """End every worker process of the current executor at once (one of them is stuck in a call)."""
        executor = self._executor
        if hasattr(executor, "kill_workers"):  # Python >= 3.14 offers it
            executor.kill_workers()
            return
        # Before 3.14 the executor keeps its processes in this dict (the one `kill_workers` walks).
        for process in list((executor._processes or {}).values()):
            process.kill()

    def _submit(self, fn: Callable[[Any], Any], item: Any, token: int | None) -> Future:
        try:
            return self._pool().submit(_timed_call, fn, item, token)
        except BrokenProcessPool:
            # A worker of the previous call died after its results were in (the executor notices late,
            # under load): this call starts on a fresh pool instead of failing.
            self._restart()
            return self._pool().submit(_timed_call, fn, item, token)

    def _drain_starts(self, started: dict[int, float]) -> None:
        """Note when each timed call that a worker has since started was seen starting."""
        while True:
            try:
                started.setdefault(self._starts.get_nowait(), time.monotonic())
            except queue.Empty:
                return

    def run(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        on_done: Callable[[int, Any], None] | None = None,
        timeout_s: float | None = None,
    ) -> list:
        """[fn(item) for item in items], computed in the workers; WORKER_DIED where a worker died running that
        item, TIMED_OUT where it ran longer than `timeout_s` seconds (counted from when a worker started it).

        `fn` must be a module-level function (it is sent by reference). `on_done(index, result)`
        is called in this process as each result arrives. Exceptions `fn` raises propagate.
        """
        results: list[Any] = [None] * len(items)

        def finish(index: int, result: Any) -> None:
            results[index] = result
            if on_done is not None:
                on_done(index, result)

        batch = list(range(len(items)))
        while batch:
            died, cut_short = self._run_batch(fn, items, batch, finish, timeout_s)
            for index in died:  # alone this time, so a death is this call's own
                if self._run_batch(fn, items, [index], finish, timeout_s)[0]:
                    finish(index, WORKER_DIED)
            batch = cut_short  # every pass that cuts calls short ends one (the late one) for good
        return results

    def _run_batch(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        indices: list[int],
        finish: Callable[[int, Any], None],
        timeout_s: float | None,
    ) -> tuple[list[int], list[int]]:
        """Run items[indices] at once, finishing each result as it comes: returns (the indices lost because a
        worker died, those cut short because a late call's workers were killed). The pool is healthy again after."""
        futures: dict[Future, tuple[int, int]] = {}
        for index in indices:
            token = next(self._tokens)
            futures[self._submit(fn, items[index], token if timeout_s is not None else None)] = (index, token)
        started: dict[int, float] = {}  # token -> when this process saw the call start
        pending, died, cut_short = set(futures), [], []
        while pending:
            done, pending = wait(pending, timeout=None if timeout_s is None else POLL_S, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    finish(futures[future][0], future.result())
                except BrokenProcessPool:
                    died.append(futures[future][0])
            if timeout_s is None or not pending:
                continue
            self._drain_starts(started)
            now = time.monotonic()
            late = {f for f in pending if now - started.get(futures[f][1], now) > timeout_s}
            if late:
                self._kill_workers()
                self._restart()  # waits until the executor has settled every future
                for future in sorted(pending, key=lambda f: futures[f][0]):
                    index = futures[future][0]
                    if future in late:
                        self.timeouts += 1
                        finish(index, TIMED_OUT)
                    elif not future.cancelled() and future.exception() is None:  # it finished just before the kill
                        finish(index, future.result())
                    else:
                        cut_short.append(index)
                # A call lost before the kill (the pool was breaking) runs again with those the kill cut short.
                pending, cut_short, died = set(), sorted(cut_short + died), []
        if died:
            self._restart()
        return sorted(died), cut_short

    def close(self) -> None:
        """Stop the workers (waits for calls in flight)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._starts.close()
            self._executor = None

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
