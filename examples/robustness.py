"""One lying data owner against FGRPO and FedAvg: the defaults versus the previous (undefended) defaults.

    python examples/robustness.py [--seeds 0,1,2] [--methods fgrpo,fedavg] [--out runs/robustness]
                                  [--settings defaults,previous] [--set federation.fraction_train=0.5] [--reuse DIR]

Runs the shipped quickstart scenario (`fgrpo quickstart`'s) for every method,
seed, setting and case, one run at a time, in OUT/<setting>/<case>/<method>/seed<k>/:
- settings: "defaults" changes no defence (norm_clip 1.5 × the round's
  lower-median norm, FGRPO's w_max = "auto" and its max_tilt); "previous" is what
  the defaults were before issue 16: no norm clipping, FGRPO's w_max = 0.7 as the
  old quickstart had and no max_tilt (FedAvg: no clipping);
- cases: "honest" (every owner tells the truth) and "attacked" (owner 0 lies:
  it reports reward-mean = 10^round, a fake, ever-growing gain, and sends
  θ_t + 20·(θ_k − θ_t); `federation.attack`).
A run whose summary.json exists with the same config.toml is read, not run
again, so the grid can be filled over several invocations (`--settings`,
`--cases`, `--seeds`); `--reuse DIR` also reads the finished runs of a
comparison directory (`fgrpo quickstart --seeds 5 -o DIR`: the honest runs
with the defaults) when their config is the same but for the output folder. Prints, per method and setting, the final global
held-out accuracy per seed, the paired difference attacked − honest with a 95%
bootstrap CI (`fgrpo.reporting.stats`), and the liar's largest aggregation
weight and smallest clip factor in any round, and the number of rounds it was
aggregated in (from each run's metrics.jsonl: from round 10 its report 10^10
exceeds the reply checks' ±1e9 bound on reward-mean, so it is refused there);
then the "cost when nobody lies": honest defaults − honest previous, paired.
`--json PATH` also writes every number.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from importlib import resources
from pathlib import Path

from fgrpo.config import Config, deep_merge, dump_config, load_config, parse_override
from fgrpo.deploy.runtime import run_simulation, with_method
from fgrpo.reporting.noise import quiet_libraries
from fgrpo.reporting.stats import paired_comparison

LIAR = 0
ATTACK = {"federation": {"attack": {"clients": [LIAR], "reward_growth": 10.0, "update_scale": 20.0}}}
SETTINGS = {
    "defaults": {},
    "previous": {"federation": {"defense": {"norm_clip": "off"}, "fgrpo": {"w_max": 0.7, "max_tilt": "off"}}},
}
CASES = {"honest": {}, "attacked": ATTACK}


def cell_config(overrides: dict, setting: str, case: str, method: str, seed: int, out: Path) -> Config:
    scenario = resources.files("fgrpo") / "scenarios" / "quickstart.toml"
    config = load_config(str(scenario), deep_merge(deep_merge(overrides, SETTINGS[setting]), CASES[case]))
    return with_method(config, method, seed, out / setting / case / method / f"seed{seed}")


def finished_as(config: Config, run_dir: Path) -> bool:
    """Whether `run_dir` holds a finished run of `config` (the same config but for its output directory)."""
    data = config.model_dump()
    data["output"]["dir"] = str(run_dir)
    config_file, done = run_dir / "config.toml", run_dir / "summary.json"
    return done.is_file() and config_file.is_file() and config_file.read_text() == dump_config(Config.model_validate(data))


def run_or_read(config: Config, reuse: Path | None = None) -> tuple[dict, Path]:
    """The run's summary and directory: read when an identical run already finished there (or, with `reuse`, in
    the comparison directory `reuse`/<method>/seed<k>, e.g. `fgrpo quickstart --seeds 5`'s), else run it."""
    run_dir = Path(config.output.dir)
    candidates = [run_dir]
    if reuse is not None:
        candidates.append(reuse / config.federation.method / f"seed{config.training.seed}")
    for candidate in candidates:
        if finished_as(config, candidate):
            return json.loads((candidate / "summary.json").read_text()), candidate
    return run_simulation(config, overwrite=True, progress=False), run_dir


def liar_influence(run_dir: Path, liar: int = LIAR) -> dict:
    """The liar's largest aggregation weight and smallest clip factor over all rounds (metrics.jsonl)."""
    weights, factors = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "client" and record.get("client") == liar and record.get("agg/weight") is not None:
            weights.append(record["agg/weight"])
            factors.append(record.get("defense/clip_factor", 1.0))
    return {
        "liar_max_weight": max(weights, default=math.nan),
        "liar_min_clip_factor": min(factors, default=math.nan),
        "liar_rounds": len(weights),
    }


def fmt(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def comparison_cell(values: dict[int, float], reference: dict[int, float]) -> tuple[str, dict]:
    if not values or not reference:
        return "n/a", {}
    c = paired_comparison(values, reference)
    text = f"{100 * c.mean:+.1f} [{100 * c.ci_low:+.1f}, {100 * c.ci_high:+.1f}]" if math.isfinite(c.ci_low) else f"{100 * c.mean:+.1f}"
    return text, {"seeds": list(c.seeds), "differences": list(c.differences), "mean": c.mean, "ci_low": c.ci_low,
                  "ci_high": c.ci_high, "p_value": c.p_value, "verdict": c.verdict}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds (default 0,1,2).")
    parser.add_argument("--methods", default="fgrpo,fedavg")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"Subset of {', '.join(SETTINGS)}.")
    parser.add_argument("--cases", default=",".join(CASES), help=f"Subset of {', '.join(CASES)}.")
    parser.add_argument("--set", dest="set_values", action="append", default=[], help="Override, e.g. federation.fraction_train=0.5.")
    parser.add_argument("--out", type=Path, default=Path("runs/robustness"))
    parser.add_argument("--json", type=Path, default=None, help="Also write every number here.")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="A comparison directory (fgrpo quickstart/compare -o DIR) whose finished runs with the same "
                             "config (but for the output directory) are read instead of run again.")
    args = parser.parse_args()
    quiet_libraries()  # fgrpo's own output only, as the CLI shows it (FGRPO_VERBOSE=1 shows the rest)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods, settings, cases = args.methods.split(","), args.settings.split(","), args.cases.split(",")
    for name, chosen, known in (("setting", settings, SETTINGS), ("case", cases, CASES)):
        unknown = [c for c in chosen if c not in known]
        if unknown:
            parser.error(f"unknown {name}(s) {unknown}; choose from {', '.join(known)}")
    overrides: dict = {}
    for text in args.set_values:
        overrides = deep_merge(overrides, parse_override(text))

    # accuracy[(setting, case, method)][seed]; influence[(setting, case, method)][seed]
    accuracy: dict[tuple[str, str, str], dict[int, float]] = {}
    influence: dict[tuple[str, str, str], dict[int, dict]] = {}
    for setting in settings:
        for case in cases:
            for method in methods:
                for seed in seeds:
                    config = cell_config(overrides, setting, case, method, seed, args.out)
                    summary, run_dir = run_or_read(config, args.reuse)
                    accuracy.setdefault((setting, case, method), {})[seed] = summary["final/acc_heldout"]
                    influence.setdefault((setting, case, method), {})[seed] = liar_influence(run_dir)

    rows, result = [], {"seeds": seeds, "overrides": overrides, "cells": {}, "comparisons": {}}
    for (setting, case, method), values in accuracy.items():
        result["cells"][f"{setting}/{case}/{method}"] = {"accuracy": values, "influence": influence[(setting, case, method)]}
    print(f"Final global held-out accuracy (%), seeds {seeds}; liar = owner {LIAR} (reward 10^round, update ×20).")
    print("| method | setting | honest (per seed) | honest mean | attacked (per seed) | attacked mean "
          "| attacked − honest [95% CI] | liar's max weight | liar's min clip factor | rounds the liar was aggregated |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method in methods:
        for setting in settings:
            honest = accuracy.get((setting, "honest", method), {})
            attacked = accuracy.get((setting, "attacked", method), {})
            diff, stats = comparison_cell(attacked, honest)
            result["comparisons"][f"{setting}/{method}/attacked-honest"] = stats
            liar = influence.get((setting, "attacked", method), {})
            max_weight = max((v["liar_max_weight"] for v in liar.values()), default=math.nan)
            min_factor = min((v["liar_min_clip_factor"] for v in liar.values()), default=math.nan)
            taken = sorted({v["liar_rounds"] for v in liar.values()})
            rows.append(
                f"| {method} | {setting} | {' / '.join(fmt(honest[s]) for s in sorted(honest)) or 'n/a'} "
                f"| {fmt(statistics.mean(honest.values())) if honest else 'n/a'} "
                f"| {' / '.join(fmt(attacked[s]) for s in sorted(attacked)) or 'n/a'} "
                f"| {fmt(statistics.mean(attacked.values())) if attacked else 'n/a'} | {diff} "
                f"| {max_weight:.3f} | {min_factor:.3f} | {'/'.join(map(str, taken)) or 'n/a'} |"
            )
    print("\n".join(rows))
    if {"defaults", "previous"} <= set(settings) and "honest" in cases:
        print("\nCost when nobody lies: honest defaults − honest previous defaults (points, paired, 95% CI)")
        for method in methods:
            diff, stats = comparison_cell(accuracy[("defaults", "honest", method)], accuracy[("previous", "honest", method)])
            result["comparisons"][f"{method}/honest-defaults-minus-previous"] = stats
            print(f"- {method}: {diff}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
