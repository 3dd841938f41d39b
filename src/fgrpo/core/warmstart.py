"""The built-in tiny model's supervised warm start, built reproducibly and cached.

GRPO only learns from groups whose rewards differ, so a policy that gets
nothing right (a random init) or everything right gives no signal. A short SFT
on synthetic examples puts the tiny model in between. The SFT data is drawn
with its own seed, disjoint in intent from the task pool's seed (think of it
as public pre-training data, not any client's private prompts).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from fgrpo.cache import cache_root
from fgrpo.config import FamilyConfig, WarmStartConfig
from fgrpo.core.model import build_tiny_model
from fgrpo.data.tasks import generate_examples

# Bump when the recipe changes, so stale cached checkpoints are not reused.
RECIPE_VERSION = 1
# Seed offset so warm-start data never reuses the task pool's seeds.
WARM_START_SEED_OFFSET = 10_007


def warm_start_key(warm_start: WarmStartConfig, families: list[FamilyConfig]) -> str:
    spec = {
        "recipe": RECIPE_VERSION,
        "warm_start": warm_start.model_dump(),
        "families": sorted((f.name, f.difficulty) for f in families),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def sft_batch(tokenizer, prompts: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded prompt+answer+EOS sequences; labels only on the answer and EOS."""
    rows, labels = [], []
    for prompt, answer in zip(prompts, answers):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt_ids + answer_ids)
        labels.append([-100] * len(prompt_ids) + answer_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    label_ids = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
    attention_mask = (torch.arange(width)[None, :] < torch.tensor([len(r) for r in rows])[:, None]).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}


def train_warm_start(warm_start: WarmStartConfig, families: list[FamilyConfig]):
    """SFT a fresh tiny model; returns (model, tokenizer, seconds)."""
    if not families and warm_start.steps > 0:  # nothing to warm-start on (an empty pool, then a ZeroDivisionError)
        from fgrpo.errors import ConfigError

        raise ConfigError(
            "tasks.families = [] but model.source = 'tiny' warm-starts on the built-in families: add at least "
            "one family (e.g. name = 'add'), set model.warm_start.steps = 0, or use a real model"
        )
    start = time.perf_counter()
    model, tokenizer = build_tiny_model(seed=warm_start.seed)
    per_family = max(1, warm_start.steps * warm_start.batch_size // max(1, len(families)))
    pool = []
    for i, family in enumerate(families):
        pool += generate_examples(
            family.name, per_family, seed=warm_start.seed + WARM_START_SEED_OFFSET + i, difficulty=family.difficulty
        )
    generator = torch.Generator().manual_seed(warm_start.seed)
    order = torch.randperm(len(pool), generator=generator).tolist()
    optimizer = torch.optim.AdamW(model.parameters(), lr=warm_start.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * max(0.0, 1 - step / max(1, warm_start.steps))
    )
    model.train()
    torch.manual_seed(warm_start.seed)
    for step in range(warm_start.steps):
        idx = order[(step * warm_start.batch_size) % len(pool) :][: warm_start.batch_size]
        batch = sft_batch(tokenizer, [pool[i].prompt for i in idx], [pool[i].answer for i in idx])
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    return model, tokenizer, time.perf_counter() - start


def warm_started_tiny_model_dir(warm_start: WarmStartConfig, families: list[FamilyConfig]) -> Path:
    """Folder of the warm-started tiny model, building it on first use (atomic rename)."""
    target = cache_root() / f"tiny-{warm_start_key(warm_start, families)}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    torch_threads = torch.get_num_threads()
    model, tokenizer, seconds = train_warm_start(warm_start, families)
    torch.set_num_threads(torch_threads)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "warm_start.json").write_text(
        json.dumps(
            {
                "warm_start": warm_start.model_dump(),
                "families": [f.model_dump() for f in families],
                "seconds": round(seconds, 1),
                "recipe": RECIPE_VERSION,
            },
            indent=2,
        )
    )
    try:
        staging.rename(target)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    return target
