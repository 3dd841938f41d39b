"""Benchmark: does compressing uploads cost accuracy? The quickstart scenario under each codec and seed.

    python benchmarks/compression_accuracy.py [--codecs none,int8,int8-noef] [--seeds 3] [--method fgrpo] [--out runs/compression]

Every cell is the shipped quickstart scenario (4 non-IID clients, 12 rounds ×
10 local steps) with only `federation.compression` changed; `int8-noef` is int8
without error feedback. Prints final global held-out accuracy (mean ± std over
seeds, and per seed), upload bytes per client per round, and a final line
comparing each codec's mean with the uncompressed one in units of its seed std.
Each run's metrics.jsonl is kept under --out for `fgrpo report`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from importlib import resources
from pathlib import Path

from fgrpo.config import load_config
from fgrpo.deploy.runtime import run_simulation


def codec_options(name: str) -> dict:
    codec, _, suffix = name.partition("-")
    return {"codec": codec, "error_feedback": suffix != "noef"}


def run_cell(method: str, codec: str, seed: int, out: Path) -> dict:
    scenario = resources.files("fgrpo") / "scenarios" / "quickstart.toml"
    config = load_config(
        str(scenario),
        {
            "federation": {"method": method, "compression": codec_options(codec)},
            "training": {"seed": seed},
            "output": {"dir": str(out), "save_adapter": False},
        },
    )
    summary = run_simulation(config, progress=False, overwrite=True)
    rounds = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "round" and r["round"] > 0]
    per_client_up = statistics.mean(r["comm/bytes_up"] / r["clients/sampled"] for r in rounds)
    return {"final": summary["final/acc_heldout"], "initial": summary["initial/acc_heldout"], "up": per_client_up}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codecs", default="none,int8,int8-noef")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--method", default="fgrpo")
    parser.add_argument("--out", default="runs/compression")
    args = parser.parse_args()
    codecs = args.codecs.split(",")
    cells = {
        codec: [run_cell(args.method, codec, seed, Path(args.out) / codec / f"seed{seed}") for seed in range(args.seeds)]
        for codec in codecs
    }
    print(f"quickstart, {args.method}, seeds 0..{args.seeds - 1}; start accuracy {100 * cells[codecs[0]][0]['initial']:.1f}%")
    print(f"{'codec':<11}{'final acc':>18}{'per seed':>24}{'upload/client/round':>22}")
    stats = {}
    for codec, runs in cells.items():
        finals = [100 * r["final"] for r in runs]
        mean, std = statistics.mean(finals), statistics.stdev(finals) if len(finals) > 1 else 0.0
        stats[codec] = (mean, std)
        seeds = " / ".join(f"{f:.1f}" for f in finals)
        print(f"{codec:<11}{mean:>10.1f}% ± {std:.1f}{seeds:>24}{runs[0]['up'] / 1024:>19.1f} KB")
    base_mean, base_std = stats[codecs[0]]
    parts = [
        f"{codec} {stats[codec][0] - base_mean:+.1f} pp ({(stats[codec][0] - base_mean) / max(base_std, 1e-9):+.1f} std)"
        for codec in codecs[1:]
    ]
    print(f"ratio: final accuracy vs {codecs[0]}: " + ", ".join(parts))


if __name__ == "__main__":
    main()
