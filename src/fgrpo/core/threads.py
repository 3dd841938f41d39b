"""How many torch threads a process may use: workers × threads ≤ cores, on every process fgrpo runs in.

Why: on a small model one torch thread does the work of two, and several torch
processes that each start one thread per core (torch's default) stall one
another: a quickstart round was measured 4.5× slower beside other runs. Every
process fgrpo starts or runs in (the in-process runtime, its worker
processes, Flower ClientApp processes, the SuperNodes of `fgrpo flower
launch`, Ray actors) takes its thread count from `threads_per_worker`, given
how many such processes share the machine.

`OMP_NUM_THREADS` set by the user or by the launcher of this process (the
SuperNode that started a ClientApp, the runtime that started a worker) is a
budget "auto" honours; an explicit integer (`runtime.threads`, `--threads`)
wins over everything.

Without such a budget, "auto" also leaves out the cores that other processes
keep busy when fgrpo starts (`busy_cores`, sampled from /proc/stat for 50 ms):
a run started beside another run, or beside a busy loop, takes 1 thread
instead of 2 on 2 cores. One thread degrades to its fair share of a loaded
core; two threads that wait on each other at every operation collapse
(benchmarks/loaded_machine.py measures both).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal, Union

Threads = Union[int, Literal["auto"]]

# The variables OpenMP / MKL / OpenBLAS read at start-up: a child process gets them, so its
# libraries start with the budget before torch is even imported.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which a container or `taskset` narrows), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no affinity call
        return max(1, os.cpu_count() or 1)


def env_thread_budget(env: Mapping[str, str] | None = None) -> int | None:
    """The positive integer in OMP_NUM_THREADS, or None when it is unset or not a positive integer."""
    value = (os.environ if env is None else env).get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def threads_per_worker(
    workers: int, cores: int, requested: Threads = "auto", env_budget: int | None = None, busy: float = 0.0
) -> int:
    """Torch threads for each of `workers` processes on `cores` cores, `busy` of them kept busy by others.

    "auto": the idle cores // workers (at least 1), capped by `env_budget` (OMP_NUM_THREADS) when one is set;
    an int: exactly that (the user's choice, even past the cores).
    """
    if requested != "auto":
        return int(requested)
    idle = max(1, cores - round(busy))
    fair_share = max(1, idle // max(1, workers))
    return fair_share if env_budget is None else max(1, min(env_budget, fair_share))


def busy_cores(interval_s: float = 0.05) -> float:
    """Cores that other processes kept busy over the next `interval_s` seconds (0.0 where /proc/stat is missing).

    Machine-wide busy time from /proc/stat, less this process's own CPU time over the same interval.
    """
    import time

    def sample() -> tuple[float, float, float]:  # (busy jiffies, all jiffies, own CPU seconds)
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [float(x) for x in stat.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        return sum(fields) - idle, sum(fields), time.process_time()

    try:
        busy0, total0, own0 = sample()
        time.sleep(interval_s)
        busy1, total1, own1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    if total1 <= total0:
        return 0.0
    cores_seen = available_cores()
    busy = (busy1 - busy0) / (total1 - total0) * (os.cpu_count() or cores_seen)
    return max(0.0, min(float(cores_seen), busy - (own1 - own0) / interval_s))


def auto_threads(
    workers: int, requested: Threads = "auto", cores: int | None = None, env: Mapping[str, str] | None = None
) -> int:
    """`threads_per_worker` for this machine now: its cores, OMP_NUM_THREADS (in `env`, default this process's),
    and, only for "auto" without such a budget (a worker that got its budget from its launcher must not count
    its siblings), the cores other processes keep busy."""
    cores = available_cores() if cores is None else cores
    budget = env_thread_budget(env)
    busy = busy_cores() if requested == "auto" and budget is None else 0.0
    return threads_per_worker(workers, cores, requested, budget, busy)


def resolve_workers(requested: int | Literal["auto"], clients_per_round: int, cores: int) -> int:
    """Worker processes for the in-process runtime: "auto" = min(cores, clients in a round), at least 1."""
    if requested != "auto":
        return int(requested)
    return max(1, min(cores, clients_per_round))


def thread_env(threads: int) -> dict[str, str]:
    """Environment variables that give a child process (and its children) a budget of `threads`."""
    return {name: str(threads) for name in THREAD_ENV_VARS}


def apply_threads(threads: int) -> int:
    """Set this process's torch intra-op threads; returns `threads`.

    The environment is left alone: a process fgrpo starts gets its budget through
    `thread_env` at start-up (before its first torch import), not by inheriting a
    variable this call would leave behind in the user's own process.
    """
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
