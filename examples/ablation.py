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

from fgrpo.config import load_config
from fgrpo.deploy.runtime import quiet_flower_logs, run_comparison
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    args = parser.parse_args()
    quiet_flower_logs()
    seeds = list(range(args.seeds))
    variants = [v.strip() for v in args.variants.split(",")]
    print(f"| scenario | method | final accuracy ({args.split}) | paired Δ vs FedAvg [95% CI] | verdict |")
    print("|---|---|---|---|---|")
    for name in args.scenarios.split(","):
        path = resources.files("fgrpo") / "scenarios" / f"{name}.toml"
        evaluation = {"evaluation": {"split": args.split}}
        base = load_config(str(path), evaluation)
        out = args.out / args.split / name
        reference = finals(run_comparison(base, ["fedavg"], seeds, out / "fedavg", overwrite=True, progress=False))
        rows = [("FedAvg", reference, None)]
        for variant in variants:
            config = load_config(str(path), {**evaluation, "federation": {"fgrpo": VARIANTS[variant]}})
            values = finals(run_comparison(config, ["fgrpo"], seeds, out / variant.replace(" ", ""), overwrite=True, progress=False))
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
