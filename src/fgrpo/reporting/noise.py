"""What the terminal shows: fgrpo's own progress, not the libraries' chatter, unless the user asks for it.

transformers draws a "Loading weights" bar on every model load and a "Writing
model shards" bar on every save, warns `FutureWarning`s about its own
deprecations, and Flower logs each sampling step at INFO. None of it says
anything about the run. `quiet_libraries` turns it off through the switches
the libraries themselves offer (huggingface_hub's progress-bar switch, which
transformers' bars follow; their verbosity settings; the `warnings` filters),
and through environment variables too, so the processes a run starts (Flower's
SuperNodes and ClientApps) are quiet as well. `FGRPO_VERBOSE=1` (`fgrpo
--verbose`) leaves everything on.

Nothing here imports a library: those already imported are switched off in
place, the others read the environment when they load.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "FGRPO_VERBOSE"
# Read by the libraries when they are imported (here and in every child process).
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub; transformers' and datasets' bars follow it
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",  # child processes' warning filters
}
QUIET_CATEGORIES = (FutureWarning, DeprecationWarning)


def verbose() -> bool:
    """The user asked for the libraries' own output (`fgrpo --verbose` or FGRPO_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "") == "1"


def set_verbose(enabled: bool) -> None:
    """Record the choice in the environment, so processes this one starts make the same one."""
    if enabled:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


def quiet_libraries() -> None:
    """Hide progress bars, deprecation warnings and INFO logs of transformers, datasets, huggingface_hub and Flower."""
    if verbose():
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for category in QUIET_CATEGORIES:
        warnings.filterwarnings("ignore", category=category)
    if "transformers" in sys.modules:  # already imported: its switches, not its environment
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    quiet_flower_logs()


def quiet_flower_logs() -> None:
    """Flower logs every sampling step at INFO; the progress bar and metrics.jsonl say it better."""
    if verbose():
        return
    import flwr.serverapp  # noqa: F401  (Flower sets its logger to DEBUG on import: import first, then quiet it)

    logging.getLogger("flwr").setLevel(logging.WARNING)
