"""The lean decode loop against transformers' `generate`: same tokens (greedy and seeded sampling), same
log-probs, left padding, EOS and padding of finished rows, peft, real architectures, and its fallbacks."""

from __future__ import annotations

import pytest
import torch

from fgrpo.config import config_from_dict
from fgrpo.core.learner import GRPOLearner
from fgrpo.core.model import add_lora, build_tiny_model, load_model_and_tokenizer
from fgrpo.core.rollout import encode_prompts, generate, hf_generate
from fgrpo.core.sampler import sample, sampler_unsupported
from fgrpo.data.rewards import WeightedReward
from fgrpo.errors import ConfigError
from tiny_models import save_tiny_checkpoint

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PROMPTS = ["1+1=", "123+456=", "reverse abcdef:", "7*8="]  # different lengths: left padding


def with_random_lora(model):
    """LoRA with non-zero B, so the adapter changes every projection the cache and logits see."""
    model = add_lora(model, 4, 8, 0.0, "auto")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def tiny_peft():
    model, tokenizer = build_tiny_model(seed=0)
    return with_random_lora(model).eval(), tokenizer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampler-checkpoints")
    loaded = {}
    for arch in ("llama", "qwen2"):
        model, tokenizer = load_model_and_tokenizer(str(save_tiny_checkpoint(arch, root / arch)), dtype="float32", device="cpu")
        loaded[arch] = (model.eval(), tokenizer)
    return loaded


def policies(request):
    return request.getfixturevalue("tiny_peft") if request.param == "tiny" else request.getfixturevalue("checkpoints")[request.param]


@pytest.fixture(params=["tiny", "llama", "qwen2"])
def policy(request):
    return policies(request)


def frequent_token(model, tokenizer, device, group, max_new_tokens, seed=0, **sampling) -> int:
    """A token `generate` emits mid-completion in some rows (same seed and options): used as EOS, so rows finish at
    different steps (tokens before a row's first EOS, and the random numbers drawn, do not depend on which id is EOS)."""
    ids, mask = encode_prompts(tokenizer, PROMPTS, device)
    with torch.inference_mode():
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids.repeat_interleave(group, 0), attention_mask=mask.repeat_interleave(group, 0),
                             max_new_tokens=max_new_tokens, do_sample=bool(sampling), pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **sampling)
    middle = out[:, ids.size(1) + 1 : -1].flatten()
    middle = middle[(middle != tokenizer.pad_token_id) & (middle != tokenizer.eos_token_id)]
    return int(torch.bincount(middle).argmax())


def both_samplers(model, tokenizer, device, group, max_new_tokens, eos, seed, share, **sampling):
    """(generate's completion ids and logits, the lean loop's ids and log-probs) on the same prompts and seed."""
    ids, mask = encode_prompts(tokenizer, PROMPTS, device)
    do_sample = bool(sampling)
    options = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": tokenizer.pad_token_id,
               "eos_token_id": eos, "use_cache": True, **sampling}
    assert sampler_unsupported(model, options) is None  # the lean loop really is what "auto" runs here
    with torch.inference_mode():
        torch.manual_seed(seed)
        theirs = model.generate(input_ids=ids.repeat_interleave(group, 0), attention_mask=mask.repeat_interleave(group, 0),
                                return_dict_in_generate=True, output_logits=True, **options)
        torch.manual_seed(seed)
        ours = sample(model, ids, mask, group, max_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                      do_sample=do_sample, share_prompts=share, return_log_probs=True, **sampling)
    return theirs.sequences[:, ids.size(1):], torch.stack(theirs.logits, 1), ours


def assert_rows_finish_at_different_steps(token_ids, eos, max_new_tokens):
    finished = (token_ids == eos).any(1)
    lengths = torch.where(finished, (token_ids == eos).int().argmax(1) + 1, max_new_tokens)
    assert finished.any() and lengths.unique().numel() > 1  # EOS handling and padding are really exercised


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("share", [True, False])
def test_greedy_gives_generates_tokens(policy, device, share):
    model, tokenizer = policy
    model.to(device)
    eos = frequent_token(model, tokenizer, device, 1, 10)
    theirs, _, ours = both_samplers(model, tokenizer, device, 1, 10, eos, seed=0, share=share)
    assert_rows_finish_at_different_steps(theirs, eos, 10)
    assert torch.equal(ours.token_ids, theirs)  # incl. the pad tokens after each EOS, and the trimmed length
    model.to("cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "sampling", [{"temperature": 1.0, "top_p": 1.0, "top_k": 0}, {"temperature": 0.7, "top_p": 0.9, "top_k": 20}],
)
def test_seeded_sampling_gives_generates_tokens_and_log_probs(policy, device, sampling):
    model, tokenizer = policy
    model.to(device)
    for seed, share in ((0, True), (1, False)):
        eos = frequent_token(model, tokenizer, device, 4, 8, seed, **sampling)
        theirs, logits, ours = both_samplers(model, tokenizer, device, 4, 8, eos, seed, share, **sampling)
        assert torch.equal(ours.token_ids, theirs)
        mask = torch.ones_like(theirs, dtype=torch.bool)
        mask[:, 1:] = (theirs[:, :-1] != eos).cumprod(1).bool()  # up to and including the first EOS
        reference = torch.log_softmax(logits / sampling["temperature"], -1).gather(2, theirs[..., None]).squeeze(2)
        torch.testing.assert_close(ours.log_probs[mask], reference[mask], atol=1e-5, rtol=1e-5)
        assert (ours.log_probs[~mask] == 0).all()
        assert_rows_finish_at_different_steps(theirs, eos, 8)
    model.to("cpu")


def test_several_eos_ids_or_none(tiny_peft):
    model, tokenizer = tiny_peft
    first = frequent_token(model, tokenizer, "cpu", 1, 10)
    for eos in ([first, tokenizer.eos_token_id], None):  # a list (Llama-3 ships two), or no EOS: run to the limit
        theirs, _, ours = both_samplers(model, tokenizer, "cpu", 1, 10, eos, seed=0, share=True)
        assert torch.equal(ours.token_ids, theirs)
    assert ours.token_ids.size(1) == 10


@pytest.mark.parametrize("device", DEVICES)
def test_a_rows_draw_does_not_depend_on_the_other_rows_probabilities(device):
    # What lets the loop give finished rows a placeholder and still draw generate's tokens for the others.
    probs = torch.rand(64, 300, device=device).softmax(-1)
    torch.manual_seed(5)
    draws = torch.multinomial(probs, 1)
    changed = probs.clone()
    changed[::3] = 1.0  # the placeholder rows
    torch.manual_seed(5)
    redraws = torch.multinomial(changed, 1)
    keep = torch.ones(64, dtype=torch.bool)
    keep[::3] = False
    assert torch.equal(draws[keep], redraws[keep])


@pytest.mark.parametrize("greedy", [True, False])
def test_rollouts_are_the_same_with_either_sampler(tiny_peft, greedy):
    model, tokenizer = tiny_peft
    out = {}
    for sampler in ("hf", "auto"):
        torch.manual_seed(3)
        out[sampler] = generate(model, tokenizer, PROMPTS, 4, 8, temperature=0.8, greedy=greedy, sampler=sampler)
    assert torch.equal(out["hf"].completion_ids, out["auto"].completion_ids)
    assert torch.equal(out["hf"].completion_mask, out["auto"].completion_mask)
    assert out["hf"].completions == out["auto"].completions
    assert not out["auto"].completion_ids.is_inference()  # usable in the training forward


def test_generation_options_it_does_not_implement_fall_back_to_generate(tiny_peft):
    model, tokenizer = tiny_peft
    options = {"max_new_tokens": 8, "do_sample": True, "temperature": 0.8, "top_p": 1.0, "top_k": 0}
    assert sampler_unsupported(model, options) is None
    assert "repetition_penalty" in sampler_unsupported(model, {**options, "repetition_penalty": 1.05})
    assert "num_beams" in sampler_unsupported(model, {**options, "num_beams": 2})
    base = model.get_base_model()
    base.generation_config.repetition_penalty = 1.05  # as some checkpoints' generation_config.json ship
    try:
        assert "repetition_penalty" in sampler_unsupported(model, options)
        outs = []
        for sampler in ("hf", "auto"):  # "auto" falls back, so the penalty still applies
            torch.manual_seed(4)
            outs.append(generate(model, tokenizer, PROMPTS, 2, 8, sampler=sampler).completion_ids)
        assert torch.equal(outs[0], outs[1])
    finally:
        base.generation_config.repetition_penalty = None


def test_the_learner_decodes_with_the_sampler_the_config_names(tiny_peft, monkeypatch):
    model, tokenizer = tiny_peft

    def refuse(*args, **kwargs):
        raise AssertionError("lean loop called")

    monkeypatch.setattr("fgrpo.core.rollout.lean_sample", refuse)
    reward = WeightedReward([("exact_match", 1.0)])
    for sampler in ("hf", "auto"):
        config = config_from_dict({"grpo": {"num_generations": 2, "max_completion_length": 3, "sampler": sampler}})
        learner = GRPOLearner(model, tokenizer, config.grpo, reward)
        if sampler == "hf":
            assert learner.sample(["1+1="], 2, 3).completion_ids.shape[0] == 2
        else:
            with pytest.raises(AssertionError, match="lean loop called"):
                learner.sample(["1+1="], 2, 3)


def test_an_unknown_sampler_is_a_config_error():
    with pytest.raises(ConfigError, match=r"grpo\.sampler"):
        config_from_dict({"grpo": {"sampler": "fast"}})
