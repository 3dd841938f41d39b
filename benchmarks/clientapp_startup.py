"""What a fresh Flower ClientApp process pays before its first GRPO step, at a real model's shapes.

    python benchmarks/clientapp_startup.py [--model qwen2.5-0.5b] [--repeats 3]

On Flower's deployment runtime every message (each round's train and evaluate)
starts a new `flwr-clientapp` process, which imports the app and loads the
model before it can work. This script runs that path in fresh processes, as a
SuperNode would, and times each phase: the imports (torch; transformers and
peft; flwr; the rest of fgrpo's ClientApp module), the base model and tokenizer
from a local folder (random weights with Qwen2.5's published shapes, bf16
safetensors, `real_shapes.py`), LoRA, the node's data, and putting the
message's adapter into the model. It prints, for the real shapes and for the
built-in tiny model, a node's first process (its partition cache empty,
`fgrpo.data.partition_cache`) and the median of the next `--repeats` (what
every later message pays), and ends in a `ratio:` line: per-message start-up at
real shapes over the tiny model's, and a later message over the first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from real_shapes import QWEN25, save_random_checkpoint

# Runs in a fresh interpreter: the same work a flwr-clientapp process does for one train message, phase by phase.
CHILD = r"""
import json, sys, time
marks = [("start", time.perf_counter())]
def mark(name): marks.append((name, time.perf_counter()))
import torch; mark("import torch")
import transformers, peft; mark("import transformers + peft")
import flwr.clientapp, flwr.app; mark("import flwr")
from fgrpo.federation import clientapp; mark("import fgrpo ClientApp")
from flwr.app import Context, RecordDict
from fgrpo.core.model import get_trainable_arrays, set_trainable_arrays
from fgrpo.federation.wire import CONFIG_KEY
context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                  run_config={CONFIG_KEY: sys.argv[1]})
learner = clientapp.shared_learner(context); mark("model + tokenizer + LoRA")
data = clientapp.node_data(context); mark("node data")
arrays = get_trainable_arrays(learner.model)
set_trainable_arrays(learner.model, arrays); mark("adapter into the model")
print(json.dumps({b[0]: b[1] - a[1] for a, b in zip(marks, marks[1:])}))
"""


def job_config(source: str, warm_start: bool) -> str:
    from fgrpo.config import config_from_dict, dump_config

    model = {"source": source, "lora": {"rank": 8, "alpha": 16}}
    if warm_start:
        model["warm_start"] = {"steps": 30, "batch_size": 32}
    return dump_config(config_from_dict({
        "model": model,
        "tasks": {"families": [{"name": "sort", "difficulty": 1}, {"name": "add", "difficulty": 1}],
                  "train_per_family": 40, "test_per_family": 4},
        "grpo": {"num_generations": 2, "max_completion_length": 4},
        "training": {"prompts_per_step": 1},
        "federation": {"num_clients": 2, "rounds": 1, "local_steps": 1},
        "runtime": {"threads": 1},
    }))


def phases(config_text: str, repeats: int, env: dict) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per phase of the first fresh process (this node's cache empty but for the tiny warm start) and the
    median over the next `repeats` (the cache filled by the first: what every later message pays)."""
    shutil.rmtree(Path(env["FGRPO_CACHE"]) / "partitions", ignore_errors=True)  # the node's first message
    runs = []
    for _ in range(repeats + 1):
        out = subprocess.run([sys.executable, "-c", CHILD, config_text], capture_output=True, text=True, check=True, env=env)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs[0], {name: statistics.median(run[name] for run in runs[1:]) for name in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(QWEN25), default="qwen2.5-0.5b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, help="keep the random checkpoint here (default: a temporary folder)")
    args = parser.parse_args()
    from fgrpo.core.pipeline import resolve_model_source
    from fgrpo.federation.wire import config_from_text

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "FGRPO_CACHE": str(Path(tmp) / "cache"), "OMP_NUM_THREADS": "1"}
        os.environ["FGRPO_CACHE"] = env["FGRPO_CACHE"]  # the tiny warm start, built here once, outside every timing
        folder = save_random_checkpoint(args.model, args.folder or Path(tmp) / args.model)
        tiny, real = job_config("tiny", warm_start=True), job_config(str(folder), warm_start=False)
        resolve_model_source(config_from_text(tiny).model, config_from_text(tiny).tasks)
        results = {"tiny": phases(tiny, args.repeats, env), args.model: phases(real, args.repeats, env)}
    header = ["tiny, 1st", "tiny", f"{args.model}, 1st", args.model]
    print(f"{'phase (s)':<28}" + "".join(f"{h:>22}" for h in header))
    for name in results["tiny"][0]:
        cells = [results[key][i][name] for key in results for i in (0, 1)]
        print(f"{name:<28}" + "".join(f"{c:>22.2f}" for c in cells))
    totals = {key: [sum(run.values()) for run in value] for key, value in results.items()}
    print(f"{'total':<28}" + "".join(f"{t:>22.2f}" for key in totals for t in totals[key]))
    print("(1st: the node's first process, its partition cache empty; the other columns: the median of the next "
          f"{args.repeats} fresh processes, as every later message runs)")
    print(f"ratio: {args.model} / tiny per-message start-up = {totals[args.model][1] / totals['tiny'][1]:.2f}x "
          f"({totals[args.model][1]:.1f} s vs {totals['tiny'][1]:.1f} s); a later message / the node's first at "
          f"{args.model} = {totals[args.model][1] / totals[args.model][0]:.2f}x")

if __name__ == "__main__":
    main()
