"""One lying client against FGRPO and FedAvg, with and without defences.

    python examples/robustness.py [--seeds 1] [--out runs/robustness]

Runs the shipped quickstart scenario three ways for each method:
- honest: every client tells the truth;
- attacked: client 0 reports a fake, ever-growing reward (10^round, so FGRPO
  sees a huge relative gain) and sends θ_t + 20·(θ_k − θ_t);
- defended: the same attack, with update-norm clipping at 3× the round's
  median, coordinate-wise median aggregation (FGRPO: weighted by its own
  weights with the cap w_max = 0.45 < ½; FedAvg: Flower's FedMedian).
Prints final global held-out accuracy (mean ± std over seeds) per cell.
"""

from __future__ import annotations

import argparse
import statistics
from importlib import resources
from pathlib import Path

from fgrpo.config import load_config
from fgrpo.deploy.runtime import quiet_flower_logs, run_comparison

ATTACK = {"attack": {"clients": [0], "reward_growth": 10.0, "update_scale": 20.0}}
VARIANTS = {
    "honest": {},
    "attacked": ATTACK,
    "defended": {
        **ATTACK,
        "defense": {"norm_clip": 3.0, "robust": "median"},
        "fgrpo": {"w_max": 0.45},
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--methods", default="fgrpo,fedavg")
    parser.add_argument("--out", type=Path, default=Path("runs/robustness"))
    args = parser.parse_args()
    quiet_flower_logs()
    scenario = resources.files("fgrpo") / "scenarios" / "quickstart.toml"
    methods = args.methods.split(",")
    table: dict[tuple[str, str], list[float]] = {}
    for variant, federation in VARIANTS.items():
        config = load_config(str(scenario), {"federation": federation})
        summaries = run_comparison(config, methods, list(range(args.seeds)), args.out / variant, overwrite=True)
        for summary in summaries:
            table.setdefault((variant, summary["method"]), []).append(summary["final/acc_heldout"])
    print("| method | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for method in methods:
        cells = []
        for variant in VARIANTS:
            values = table[(variant, method)]
            spread = f" ± {statistics.stdev(values):.1%}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.1%}{spread}")
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
