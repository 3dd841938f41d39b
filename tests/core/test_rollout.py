"""Rollouts: sampling layout, and scoring each prompt once for its G completions."""

from __future__ import annotations

import pytest
import torch

from fgrpo.core.model import add_lora, build_tiny_model
from fgrpo.core.rollout import completion_log_probs, generate


@pytest.fixture(scope="module")
def policy():
    model, tokenizer = build_tiny_model(seed=0)
    model = add_lora(model, 4, 8, 0.0, "auto")
    with torch.no_grad():  # non-zero LoRA B, so the adapter changes the keys/values the cache holds
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model, tokenizer


def test_generate_keeps_each_prompts_completions_contiguous(policy):
    model, tokenizer = policy
    torch.manual_seed(0)
    rollouts = generate(model, tokenizer, ["12+3=", "7*8=", "sort 312:"], num_generations=4, max_completion_length=6)
    assert rollouts.num_generations == 4 and rollouts.completion_ids.shape[0] == 12
    for k in range(3):  # rows k·G … k·G+G−1 hold prompt k (left-padded)
        assert (rollouts.prompt_ids[4 * k : 4 * k + 4] == rollouts.prompt_ids[4 * k]).all()
    assert not rollouts.completion_ids.requires_grad and not rollouts.completion_ids.is_inference()


@pytest.mark.parametrize("training", [True, False])
def test_scoring_prompts_once_gives_the_full_passs_log_probs_and_gradients(policy, training):
    model, tokenizer = policy
    torch.manual_seed(1)
    # Prompts of different lengths (left padding) and completions that stop at different EOS positions.
    rollouts = generate(model, tokenizer, ["1+1=", "123+456=", "reverse abcdef:"], num_generations=3, max_completion_length=8)
    model.train(training)
    grads = {}
    values = {}
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        log_probs = completion_log_probs(model, rollouts, temperature=0.7, share_prompts=share)  # (N, T)
        mask = rollouts.completion_mask.float()
        (log_probs * mask).sum().backward()
        values[share] = log_probs.detach()
        grads[share] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    mask = rollouts.completion_mask.bool()
    assert values[True].shape == values[False].shape
    torch.testing.assert_close(values[True][mask], values[False][mask], atol=1e-5, rtol=1e-5)
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-5, rtol=1e-4)
    assert any(g.abs().max() > 1e-4 for g in grads[False].values())  # the gradients compared are not all zero


@pytest.mark.parametrize("greedy", [True, False])
def test_prefilling_each_prompt_once_samples_what_a_full_prefill_samples(policy, greedy):
    model, tokenizer = policy
    prompts = ["1+1=", "123+456=", "reverse abcdef:"]
    outputs = []
    for share in (False, True):
        torch.manual_seed(3)
        outputs.append(generate(model, tokenizer, prompts, 4, 8, greedy=greedy, share_prompts=share))
    # Same RNG stream and logits equal up to float rounding: the same tokens (this seed; rounding could flip a tie).
    assert torch.equal(outputs[0].completion_ids, outputs[1].completion_ids)
    assert outputs[0].completions == outputs[1].completions
