"""Real architectures end to end: tiny random Llama, Qwen2 and GPT-2 checkpoints in local folders,
loaded as a user's downloaded model would be, with chat templates, LoRA presets and reasoning data."""

import importlib.util
import json

import pytest
import torch

from fgrpo.core.chat import prompt_format
from fgrpo.config import config_from_dict
from fgrpo.errors import ConfigError, ModelError
from fgrpo.core.model import LORA_PRESETS, add_lora, load_model_and_tokenizer, lora_target_modules, merge_adapter
from fgrpo.core.pipeline import build_learner
from fgrpo.deploy.runtime import run_simulation
from fgrpo.data.sources import SAMPLE_MATH
from fgrpo.data.tasks import SAMPLE_GSM8K
from tiny_models import ARCHITECTURES, save_tiny_checkpoint

SYSTEM = "Think inside <think></think>, then answer inside <answer></answer>."


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: save_tiny_checkpoint(arch, root / arch) for arch in ARCHITECTURES}


def federated_config(tmp_path, folder, **model):
    return {
        "model": {"source": str(folder), "lora": {"rank": 4, "alpha": 8}, "system_prompt": SYSTEM, **model},
        "tasks": {
            "families": [],
            "sources": [{"name": "gsm8k", "path": str(SAMPLE_GSM8K)}],
            "rewards": [{"name": "math_verify"}, {"name": "think_answer_format", "weight": 0.5}],
        },
        "grpo": {"num_generations": 2, "max_completion_length": 6},
        "training": {"prompts_per_step": 2, "eval_pass_k": 2},
        "federation": {"num_clients": 2, "rounds": 2, "local_steps": 1, "min_train_clients": 2, "partition": {"scheme": "iid"}},
        "output": {"dir": str(tmp_path / "run")},
    }


def test_chat_template_renders_per_architecture_with_one_bos(checkpoints, tmp_path):
    config = config_from_dict(federated_config(tmp_path, checkpoints["llama"]))
    learner = build_learner(config, seed=0)
    assert not learner.prompt_format.add_special_tokens
    rendered = learner.prompt_format.render(learner.tokenizer, ["2+2?"])[0]
    assert rendered.startswith("<|begin_of_text|><|start_header_id|>system")
    assert rendered.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") and SYSTEM in rendered
    rollouts = learner.sample(["2+2?"], 1, 2, greedy=True)
    bos = learner.tokenizer.bos_token_id
    assert (rollouts.prompt_ids[0] == bos).sum() == 1  # the template's BOS, not a second one from the tokenizer
    for arch, start in (("qwen2", "<|im_start|>system\n"), ("gpt2", "system: ")):
        _, tokenizer = load_model_and_tokenizer(str(checkpoints[arch]), device="cpu")
        assert prompt_format(tokenizer, "auto", SYSTEM).render(tokenizer, ["2+2?"])[0].startswith(start)


def test_chat_template_none_and_file(checkpoints, tmp_path):
    _, tokenizer = load_model_and_tokenizer(str(checkpoints["qwen2"]), device="cpu")
    assert prompt_format(tokenizer, "none").render(tokenizer, ["2+2?"]) == ["2+2?"]
    assert prompt_format(tokenizer, "none", "Be brief.").render(tokenizer, ["2+2?"]) == ["Be brief.\n\n2+2?"]
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert prompt_format(tokenizer, str(template)).render(tokenizer, ["2+2?"]) == ["[2+2?]"]
    with pytest.raises(ConfigError, match="not 'auto', 'none' or an existing Jinja template file"):
        prompt_format(tokenizer, str(tmp_path / "missing.jinja"))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_lora_auto_preset_targets_the_architecture_modules(checkpoints, arch):
    model, _ = load_model_and_tokenizer(str(checkpoints[arch]), device="cpu")
    assert lora_target_modules("auto", model) == LORA_PRESETS[arch]
    peft_model = add_lora(model, 4, 8.0, 0.0, "auto")
    # names look like ...attn.c_attn.lora_A.default.weight
    adapted = {name.split(".")[-4] for name, _ in peft_model.named_parameters() if "lora_A" in name}
    assert adapted == set(LORA_PRESETS[arch])


def test_lora_presets_by_name_all_linear_and_a_wrong_preset(checkpoints):
    assert lora_target_modules("mistral") == lora_target_modules("qwen2") == LORA_PRESETS["llama"]
    assert lora_target_modules("phi") == ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
    assert lora_target_modules(["q_proj"]) == ["q_proj"] and lora_target_modules("all-linear") == "all-linear"
    model, _ = load_model_and_tokenizer(str(checkpoints["gpt2"]), device="cpu")
    assert sum(p.numel() for n, p in add_lora(model, 4, 8.0, 0.0, "all-linear").named_parameters() if "lora_" in n) > 0
    model, _ = load_model_and_tokenizer(str(checkpoints["gpt2"]), device="cpu")
    with pytest.raises(ModelError, match=r"do not fit GPT2LMHeadModel.*c_attn"):
        add_lora(model, 4, 8.0, 0.0, "llama")


def test_dtype_selection_and_gradient_checkpointing_step(checkpoints, tmp_path):
    model, _ = load_model_and_tokenizer(str(checkpoints["qwen2"]), "bfloat16", "cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    config = config_from_dict(federated_config(tmp_path, checkpoints["qwen2"], gradient_checkpointing=True))
    learner = build_learner(config, seed=0)
    assert learner.model.base_model.model.is_gradient_checkpointing
    from fgrpo.core.pipeline import build_task_pool

    train, _ = build_task_pool(config.tasks)
    metrics = learner.step(train[:2])
    assert metrics["train/grad_norm"] >= 0 and "train/reward/gsm8k" in metrics


def test_quantization_and_vllm_fail_clearly_when_unavailable(checkpoints, tmp_path):
    config = config_from_dict(federated_config(tmp_path, checkpoints["qwen2"], quantization="4bit", device="cpu"))
    expected = "needs bitsandbytes, which is not installed" if importlib.util.find_spec("bitsandbytes") is None else "needs a CUDA device"
    with pytest.raises(ModelError, match=expected):
        build_learner(config, seed=0)
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed: its backend is exercised on GPU machines only")
    config = config_from_dict(federated_config(tmp_path, checkpoints["qwen2"], generation_backend="vllm"))
    with pytest.raises(ConfigError, match="vLLM is not installed"):
        build_learner(config, seed=0)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.slow
def test_two_federated_rounds_on_each_real_architecture(checkpoints, tmp_path, arch):
    data = federated_config(tmp_path, checkpoints[arch])
    if arch == "llama":  # MATH subjects as non-IID owners: two whole subjects each
        data["tasks"]["sources"] = [{"name": "math", "path": str(SAMPLE_MATH)}]
        data["tasks"]["partition_by"] = "subject"
        data["federation"]["partition"] = {"scheme": "by_family"}
    if arch == "gpt2":  # one owner per source: GSM8K and MATH
        data["tasks"]["sources"].append({"name": "math", "path": str(SAMPLE_MATH)})
        data["tasks"]["partition_by"] = "source"
        data["federation"]["partition"] = {"scheme": "by_family"}
    summary = run_simulation(config_from_dict(data), progress=False)
    recs = records(tmp_path / "run")
    assert [r["round"] for r in recs if r["kind"] == "round"] == [0, 1, 2]
    trained = [r for r in recs if r["kind"] == "client" and "agg/weight" in r]
    for server_round in (1, 2):
        assert sum(r["agg/weight"] for r in trained if r["round"] == server_round) == pytest.approx(1.0)
    assert 0.0 <= summary["final/acc_heldout"] <= 1.0
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(LORA_PRESETS[arch])
    assert adapter["base_model_name_or_path"] == str(checkpoints[arch])


@pytest.mark.slow
def test_exported_adapter_merges_into_the_base_model(checkpoints, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = checkpoints["qwen2"]
    model, _ = load_model_and_tokenizer(str(folder), device="cpu")
    peft_model = add_lora(model, 4, 8.0, 0.0, "auto")
    with torch.no_grad():  # a non-zero adapter, so merging changes the weights
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged_dir = merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    base, _ = load_model_and_tokenizer(str(folder), device="cpu")
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    ids = torch.tensor([[5, 9, 14, 30, 41]])
    with torch.no_grad():
        expected = reloaded(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(folder)(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4) and not torch.allclose(got, plain, atol=1e-3)
    with pytest.raises(ModelError, match="has no adapter_config.json"):
        merge_adapter(tmp_path, tmp_path / "x")


@pytest.mark.slow
def test_merge_writes_only_into_a_new_or_its_own_folder(checkpoints, tmp_path):
    folder = checkpoints["qwen2"]
    model, _ = load_model_and_tokenizer(str(folder), device="cpu")
    add_lora(model, 4, 8.0, 0.0, "auto").save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("my own config")
    with pytest.raises(ConfigError, match="not empty.*--overwrite"):
        merge_adapter(tmp_path / "adapter", out)
    with pytest.raises(ConfigError, match="refusing to overwrite config.json"):
        merge_adapter(tmp_path / "adapter", out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "my own config"

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="'.*a-file' is a file, not a folder"):
        merge_adapter(tmp_path / "adapter", tmp_path / "a-file")
    fresh = merge_adapter(tmp_path / "adapter", tmp_path / "fresh")
    assert (fresh / "config.json").is_file()
    merge_adapter(tmp_path / "adapter", fresh, overwrite=True)  # its own earlier merge: replaced
