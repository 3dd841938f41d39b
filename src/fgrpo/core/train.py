"""`fgrpo train`: centralized GRPO on the pooled task set (the upper-bound baseline)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from fgrpo.config import Config
from fgrpo.core.evaluate import evaluate
from fgrpo.core.pipeline import build_learner, build_task_splits
from fgrpo.core.threads import apply_threads, auto_threads
from fgrpo.reporting.progress import progress_bar
from fgrpo.reporting.results import MetricsWriter, RunDirectory, run_directory, write_config, write_summary
from fgrpo.reporting.tracking import check_report_to, open_trackers
from fgrpo.data.tasks import Example


class PromptSampler:
    """Draws prompts without replacement, reshuffling each epoch (seeded)."""

    def __init__(self, examples: list[Example], seed: int):
        if not examples:
            from fgrpo.errors import DataError

            raise DataError("the training set is empty: add task families or files to [tasks]")
        self.examples = examples
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def sample(self, count: int) -> list[Example]:
        batch = []
        while len(batch) < count:
            if not self.order:
                self.order = list(range(len(self.examples)))
                self.rng.shuffle(self.order)
            batch.append(self.examples[self.order.pop()])
        return batch

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "order": list(self.order)}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order = list(state["order"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    import numpy as np

    np.random.seed(seed % 2**32)


def run_training(config: Config, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Train with GRPO on all training prompts; evaluate on the held-out set.

    A previous run replaced with --overwrite goes only once the first evaluation is done.
    """
    with run_directory(config.output.dir, overwrite=overwrite) as directory:
        return _train(config, directory, progress)


def _train(config: Config, directory: RunDirectory, progress: bool) -> dict:
    run_dir = directory.path
    write_config(run_dir, config)
    check_report_to(config)
    # One process does all the work: runtime.threads ('auto' = the idle cores) is its torch budget. Without
    # this, torch's default (every core) in each of several runs side by side oversubscribes the machine.
    apply_threads(auto_threads(1, config.runtime.threads))
    seed = config.training.seed
    seed_everything(seed)
    splits = build_task_splits(config.tasks)
    train_set, test_set = splits.train, splits.heldout(config.evaluation.split)
    learner = build_learner(config, seed)
    model, tokenizer = learner.model, learner.tokenizer
    sampler = PromptSampler(train_set, seed)
    g = config.grpo

    def run_eval(step: int) -> dict:
        metrics = evaluate(
            model,
            tokenizer,
            test_set,
            g.max_completion_length,
            pass_k=config.training.eval_pass_k,
            temperature=g.temperature,
            sample=learner.sample,
        )
        writer.write("eval", step=step, **metrics)
        return metrics

    started = time.perf_counter()
    trackers = open_trackers(run_dir, config, name=f"centralized-seed{seed}")
    with MetricsWriter(run_dir, "centralized", seed, trackers) as writer, progress_bar(progress) as bar:
        first = run_eval(0)
        directory.commit()
        task = bar.add_task("GRPO", total=config.training.steps, info=f"acc {first['eval/acc_heldout']:.1%}")
        step = 0
        for step in range(1, config.training.steps + 1):
            metrics = learner.step(sampler.sample(config.training.prompts_per_step))
            writer.write("step", step=step, **metrics)
            info = f"reward {metrics['train/reward_mean']:.2f}"
            if config.training.eval_every and step % config.training.eval_every == 0 and step < config.training.steps:
                info += f" · acc {run_eval(step)['eval/acc_heldout']:.1%}"
            bar.update(task, advance=1, info=info)
            if config.training.time_limit_s and time.perf_counter() - started > config.training.time_limit_s:
                break
        last = run_eval(step)
    wall = time.perf_counter() - started
    if config.output.save_adapter:
        save_trainable(model, run_dir / "adapter")
    summary = {
        "method": "centralized",
        "seed": seed,
        "steps": step,
        "initial/acc_heldout": first["eval/acc_heldout"],
        "final/acc_heldout": last["eval/acc_heldout"],
        "eval_split": config.evaluation.split,
        "wall_s": wall,
    }
    write_summary(run_dir, summary)
    return summary


def save_trainable(model, path: Path) -> None:
    """peft adapters via save_pretrained; full fine-tuning saves the whole model."""
    model.save_pretrained(path)
