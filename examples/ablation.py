"""FGRPO's gain variants against FedAvg, on three scenarios that differ in the kind of heterogeneity.

    python examples/ablation.py --seeds 5 --split validation   # choose the default (never on test)
    python examples/ablation.py --seeds 5 --split test         # report it

Scenarios (src/fgrpo/scenarios/): quickstart (skewed Dirichlet mixtures of shared
families), label_skew (one family per owner), quantity_skew (same mix, owners of
different sizes). Every scenario keeps the same hyperparameters for every method
(or the [tuned.*] values `fgrpo tune` wrote into it). Variants of FGRPO:
relative (the paper's form), zscore, standard_error, in_round, and
standard_error / relative with shrinkage toward FedAvg. For each variant the
table gives the final global accuracy (mean ± std over seeds) and the per-seed
paired difference against FedAvg with its 95% bootstrap CI and verdict.
"""

from __future__ import annotations

import argparse
import statistics
from importlib import resources
from pathlib import Path

from fgrpo.config import deep_merge, load_config, parse_override
from fgrpo.deploy.runtime import run_comparison
from fgrpo.reporting.noise import quiet_libraries
from fgrpo.reporting.stats import paired_comparison

SCENARIOS = ("quickstart", "label_skew", "quantity_skew")
VARIANTS = {
    "relative (paper)": {"gain": "relative"},
    "zscore": {"gain": "zscore"},
    "standard_error": {"gain": "standard_error"},
    "in_round": {"gain": "in_round"},
    "standard_error + shrink": {"gain": "standard_error", "shrink": True},
    "relative + shrink": {"gain": "relative", "shrink": True},
}


def finals(summaries: list[dict]) -> dict[int, float]:
    return {s["seed"]: s["final/acc_heldout"] for s in summaries}


def arm(config, method: str, seeds: list[int], out: Path) -> dict[int, float]:
    """Final accuracy per seed of one arm; an arm whose every seed finished before (same config) is read, not re-run."""
    import json

    from fgrpo.config import dump_config
    from fgrpo.deploy.runtime import with_method

    cells = [out / method / f"seed{seed}" for seed in seeds]
    expected = [dump_config(with_method(config, method, seed, cell)) for seed, cell in zip(seeds, cells)]
    done = all((c / "summary.json").is_file() and (c / "config.toml").is_file() for c in cells)
    if done and all((c / "config.toml").read_text() == text for c, text in zip(cells, expected)):
        return finals([json.loads((c / "summary.json").read_text()) for c in cells])
    return finals(run_comparison(config, [method], seeds, out, overwrite=True, progress=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value in every scenario and arm (e.g. a shorter budget: federation.rounds=4)",
    )
    args = parser.parse_args()
    quiet_libraries()  # fgrpo's own output only, as the CLI shows it (FGRPO_VERBOSE=1 shows the rest)
    seeds = list(range(args.seeds))
    variants = [v.strip() for v in args.variants.split(",")]
    print(f"| scenario | method | final accuracy ({args.split}) | paired Δ vs FedAvg [95% CI] | verdict |")
    print("|---|---|---|---|---|")
    for name in args.scenarios.split(","):
        path = resources.files("fgrpo") / "scenarios" / f"{name}.toml"
        evaluation = {"evaluation": {"split": args.split}}
        for text in args.set:
            evaluation = deep_merge(evaluation, parse_override(text))
        base = load_config(str(path), evaluation)
        out = args.out / args.split / name
        reference = arm(base, "fedavg", seeds, out / "fedavg")
        rows = [("FedAvg", reference, None)]
        for variant in variants:
            config = load_config(str(path), deep_merge(evaluation, {"federation": {"fgrpo": VARIANTS[variant]}}))
            values = arm(config, "fgrpo", seeds, out / variant.replace(" ", ""))
            rows.append((f"FGRPO {variant}", values, paired_comparison(values, reference)))
        for label, values, comparison in rows:
            accs = list(values.values())
            spread = f" ± {100 * statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
            cell = f"{100 * statistics.mean(accs):.1f}{spread}"
            if comparison is None:
                print(f"| {name} | {label} | {cell} | — | reference |")
            else:
                ci = f"{100 * comparison.mean:+.1f} [{100 * comparison.ci_low:+.1f}, {100 * comparison.ci_high:+.1f}]"
                print(f"| {name} | {label} | {cell} | {ci} | {comparison.verdict} |")


if __name__ == "__main__":
    main()
