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


def threads_per_worker(workers: int, cores: int, requested: Threads = "auto", env_budget: int | None = None) -> int:
    """Torch threads for each of `workers` processes on `cores` cores.

    "auto": cores // workers (at least 1), capped by `env_budget` (OMP_NUM_THREADS) when one is set;
    an int: exactly that (the user's choice, even past the cores).
    """
    if requested != "auto":
        return int(requested)
    fair_share = max(1, cores // max(1, workers))
    return fair_share if env_budget is None else max(1, min(env_budget, fair_share))


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
