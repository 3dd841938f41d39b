"""`fgrpo tune`: every method's learning rates chosen the same way, on validation prompts only.

Fair comparisons need each method tuned with the same budget. For every
method this runs `trials` configurations (Optuna's TPE sampler, seeded the
same for every method; the first trial is the scenario's own values, so tuning
can only keep or improve them) × `seeds` training seeds, scores each by its
final accuracy on the **validation** split carved from the training prompts
(`evaluation.split = "validation"`), and keeps the best. The held-out test set
is never evaluated while tuning. The chosen values and the budget go into the
scenario file's `[tuned.<method>]` tables, which every later run of that
method applies, and which the report quotes.

Search spaces (log-uniform):
- every method: the client learning rate `grpo.learning_rate`;
- FedAvg family (fedavg, fedprox, reward_weighted, fedavgm): the server learning rate;
- FedOpt (fedadam, fedyogi, fedadagrad): `federation.server_opt.eta`;
- FGRPO: its τ `federation.fgrpo.temperature` and server learning rate;
- FedProx: also μ `federation.proximal_mu`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from fgrpo.config import Config, TunedMethod, apply_tuned, config_from_dict, load_config, tuned_value, with_values
from fgrpo.errors import ConfigError

BLOCK_START = "# >>> tuned by `fgrpo tune` on validation prompts (re-run `fgrpo tune --write` to change this block)"
BLOCK_END = "# <<< tuned by `fgrpo tune`"


@dataclass(frozen=True)
class Param:
    """One tuned hyperparameter: a dotted config key and its search range."""

    key: str
    low: float
    high: float
    log: bool = True


CLIENT_LR = Param("grpo.learning_rate", 1e-4, 5e-3)
SERVER_LR = Param("federation.server_lr", 0.3, 3.0)
SEARCH_SPACES: dict[str, tuple[Param, ...]] = {
    "fgrpo": (CLIENT_LR, Param("federation.fgrpo.temperature", 0.1, 10.0), Param("federation.fgrpo.server_lr", 0.3, 3.0)),
    "fedavg": (CLIENT_LR, SERVER_LR),
    "fedprox": (CLIENT_LR, SERVER_LR, Param("federation.proximal_mu", 1e-3, 1.0)),
    "reward_weighted": (CLIENT_LR, SERVER_LR),
    "fedsa": (CLIENT_LR, SERVER_LR),
    "fedavgm": (CLIENT_LR, SERVER_LR),
    "fedadam": (CLIENT_LR, Param("federation.server_opt.eta", 1e-3, 0.3)),
    "fedyogi": (CLIENT_LR, Param("federation.server_opt.eta", 1e-3, 0.3)),
    "fedadagrad": (CLIENT_LR, Param("federation.server_opt.eta", 1e-3, 0.3)),
    "centralized": (CLIENT_LR,),
    "local": (CLIENT_LR,),
}


def trial_config(config: Config, method: str, seed: int, values: dict[str, float], out_dir: Path) -> Config:
    """One tuning run: the method, the seed, the trial's values, scored on validation prompts only."""
    data = config.model_dump()
    data["federation"]["method"] = method
    data["training"]["seed"] = seed
    data["evaluation"]["split"] = "validation"
    data["output"] = {**data["output"], "dir": str(out_dir), "save_adapter": False}
    data["tuned"] = {}
    trial = config_from_dict(data, f"tuning {method}")
    return with_values(trial, values, f"tuning {method}")


def tune_method(
    config: Config, method: str, trials: int, seeds: list[int], out_dir: Path, *, progress: bool = False
) -> TunedMethod:
    """Best values for `method` by final validation accuracy (mean over `seeds`) in `trials` runs."""
    import optuna

    from fgrpo.deploy.runtime import run_simulation, shared_pools

    if method not in SEARCH_SPACES:
        raise ConfigError(f"fgrpo tune: unknown method '{method}'; choose from {', '.join(SEARCH_SPACES)}")
    if config.tasks.validation_per_family == 0 and config.tasks.families:
        raise ConfigError("fgrpo tune needs validation prompts: set tasks.validation_per_family > 0")
    space = SEARCH_SPACES[method]
    base = apply_tuned(config, method)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    # Trial 0 is the scenario's current values (clamped into the range): tuning never does worse than not tuning.
    study.enqueue_trial({p.key: min(max(tuned_value(base, p.key), p.low), p.high) for p in space})

    def objective(trial: "optuna.Trial") -> float:
        values = {p.key: trial.suggest_float(p.key, p.low, p.high, log=p.log) for p in space}
        scores = []
        for seed in seeds:
            cell = trial_config(base, method, seed, values, out_dir / method / f"trial{trial.number}" / f"seed{seed}")
            summary = run_simulation(cell, progress=progress, pool=pool_for(cell))
            scores.append(summary["final/acc_heldout"])
        finite = [s for s in scores if s is not None and math.isfinite(s)]
        return sum(finite) / len(finite) if len(finite) == len(scores) else -math.inf

    with shared_pools() as pool_for:  # the workers start once for all trials
        study.optimize(objective, n_trials=trials)
    best = study.best_trial
    return TunedMethod(
        values={key: float(value) for key, value in best.params.items()},
        trials=trials,
        seeds=list(seeds),
        rounds=config.federation.rounds,
        best_value=float(best.value),
    )


def tuned_block(tuned: dict[str, TunedMethod]) -> str:
    import tomli_w

    body = tomli_w.dumps({"tuned": {m: t.model_dump(exclude_none=True) for m, t in sorted(tuned.items())}})
    return f"{BLOCK_START}\n{body.rstrip()}\n{BLOCK_END}\n"


def write_tuned(path: Path, tuned: dict[str, TunedMethod]) -> None:
    """Put the tuned tables into the scenario file, replacing an earlier block; the rest stays as written.

    Methods tuned earlier and not re-tuned now keep their tables. The file is
    replaced atomically and only if it still loads.
    """
    path = Path(path)
    original = path.read_text(encoding="utf-8")
    merged = {**load_config(path).tuned, **tuned}
    if BLOCK_START in original and BLOCK_END in original:
        head, rest = original.split(BLOCK_START, 1)
        tail = rest.split(BLOCK_END, 1)[1].lstrip("\n")
        text = head.rstrip("\n") + "\n\n" + tuned_block(merged) + (("\n" + tail) if tail else "")
    else:
        if "[tuned" in original:
            raise ConfigError(f"{path} has its own [tuned...] tables; remove them so `fgrpo tune --write` can own them")
        text = original.rstrip("\n") + "\n\n" + tuned_block(merged)
    tmp = path.with_name(path.name + ".tuning.tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        load_config(tmp)
    except ConfigError:
        tmp.unlink()
        raise
    os.replace(tmp, path)
