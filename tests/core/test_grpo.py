"""GRPO math against TRL's own GRPOTrainer._compute_loss on identical tensors, and hand-derived cases."""

from __future__ import annotations

import itertools
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from fgrpo.core.grpo import (
    LOSS_TYPES,
    aggregate_token_loss,
    completion_mask_after_eos,
    group_advantages,
    normalize_then_sum_advantages,
    grpo_loss,
    high_entropy_mask,
    kl_k3,
    token_entropies,
    token_log_probs,
    truncated_completions,
)

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")


def trl_loss(
    log_probs, old_log_probs, advantages, mask, *, loss_type, beta, eps_low, eps_high, ref, max_len,
    importance_sampling_level="token", delta=None, entropies=None, top_entropy_quantile=1.0,
):
    """Call TRL's real loss code with a stand-in trainer whose model returns `log_probs` (and `entropies`)."""

    class Accelerator:
        num_processes = 1
        sync_gradients = True

        @staticmethod
        def gather(x):
            return x

        @staticmethod
        def pad_across_processes(x, dim=0, pad_index=0):
            return x

        gather_for_metrics = gather

        @staticmethod
        def reduce(x, reduction="sum"):
            return x

    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (
            log_probs, torch.zeros_like(log_probs) if entropies is None else entropies, None
        ),
        get_high_entropy_mask=lambda e, m, threshold: trl_grpo.GRPOTrainer.get_high_entropy_mask(fake, e, m, threshold),
        top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=None,
        importance_sampling_level=importance_sampling_level,
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=1),
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_len,
        accelerator=Accelerator(),
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
    )
    n, t = mask.shape
    inputs = {
        "prompt_ids": torch.zeros(n, 2, dtype=torch.long),
        "prompt_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_ids": torch.zeros(n, t, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "num_items_in_batch": mask.sum(),
    }
    if old_log_probs is not None:
        inputs["old_per_token_logps"] = old_log_probs
    if beta:
        inputs["ref_per_token_logps"] = ref
    return trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)


def random_case(seed: int, n: int = 6, t: int = 5):
    g = torch.Generator().manual_seed(seed)
    log_probs = (-torch.rand(n, t, generator=g) * 3).requires_grad_(True)
    old = log_probs.detach() + 0.4 * torch.randn(n, t, generator=g)  # ratios far outside [0.8, 1.2]: clipping active
    ref = log_probs.detach() + 0.3 * torch.randn(n, t, generator=g)
    advantages = torch.randn(n, generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    return log_probs, old, ref, advantages, mask


@pytest.mark.parametrize(
    "loss_type,beta,use_old", list(itertools.product(LOSS_TYPES, [0.0, 0.04], [False, True]))
)
def test_loss_and_gradient_match_trl(loss_type, beta, use_old):
    log_probs, old, ref, advantages, mask = random_case(7)
    ours = grpo_loss(
        log_probs,
        old if use_old else None,
        advantages,
        mask,
        epsilon_low=0.2,
        epsilon_high=0.28,
        beta=beta,
        ref_log_probs=ref,
        loss_type=loss_type,
        max_completion_length=5,
    ).loss
    (our_grad,) = torch.autograd.grad(ours, log_probs)
    theirs = trl_loss(
        log_probs, old if use_old else None, advantages, mask,
        loss_type=loss_type, beta=beta, eps_low=0.2, eps_high=0.28, ref=ref, max_len=5,
    )
    (their_grad,) = torch.autograd.grad(theirs, log_probs)
    assert torch.allclose(ours, theirs, atol=1e-6), (float(ours), float(theirs))
    assert torch.allclose(our_grad, their_grad, atol=1e-6)
    assert ours.abs() > 0  # a non-trivial case


@pytest.mark.parametrize(
    "loss_type,level,delta", list(itertools.product(LOSS_TYPES, ["token", "sequence"], [None, 1.05]))
)
def test_gspo_and_two_sided_clipping_match_trl(loss_type, level, delta):
    """TRL 1.16's importance_sampling_level = "sequence" (GSPO) and delta, on the same tensors (with KL on)."""
    log_probs, old, ref, advantages, mask = random_case(11)
    ours = grpo_loss(
        log_probs, old, advantages, mask, epsilon_low=0.2, epsilon_high=0.28, beta=0.04, ref_log_probs=ref,
        loss_type=loss_type, max_completion_length=5, importance_sampling_level=level, delta=delta,
    ).loss
    (our_grad,) = torch.autograd.grad(ours, log_probs)
    theirs = trl_loss(
        log_probs, old, advantages, mask, loss_type=loss_type, beta=0.04, eps_low=0.2, eps_high=0.28, ref=ref,
        max_len=5, importance_sampling_level=level, delta=delta,
    )
    (their_grad,) = torch.autograd.grad(theirs, log_probs)
    assert torch.allclose(ours, theirs, atol=1e-6), (float(ours), float(theirs))
    assert torch.allclose(our_grad, their_grad, atol=1e-6)
    plain = grpo_loss(log_probs, old, advantages, mask, epsilon_low=0.2, epsilon_high=0.28, beta=0.04,
                      ref_log_probs=ref, loss_type=loss_type, max_completion_length=5).loss
    if (level, delta) != ("token", None):
        assert not torch.isclose(ours, plain)  # the option changes the loss on this case


def random_entropies(seed: int, shape) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize(
    "loss_type,quantile,beta", list(itertools.product(LOSS_TYPES, [0.0, 0.2, 0.5], [0.0, 0.04]))
)
def test_top_entropy_quantile_matches_trl(loss_type, quantile, beta):
    """TRL 1.16's top_entropy_quantile: its get_high_entropy_mask and _compute_loss on the same tensors."""
    log_probs, old, ref, advantages, mask = random_case(13)
    entropies = random_entropies(13, mask.shape)
    ours_mask = high_entropy_mask(entropies, mask, quantile)
    their_mask = trl_grpo.GRPOTrainer.get_high_entropy_mask(
        SimpleNamespace(accelerator=SimpleNamespace(pad_across_processes=lambda x, **k: x, gather=lambda x: x)),
        entropies, mask, 1 - quantile,
    )
    assert torch.equal(ours_mask, their_mask)
    ours = grpo_loss(
        log_probs, old, advantages, mask, epsilon_low=0.2, epsilon_high=0.28, beta=beta, ref_log_probs=ref,
        loss_type=loss_type, max_completion_length=5, entropy_mask=ours_mask,
    ).loss
    (our_grad,) = torch.autograd.grad(ours, log_probs)
    theirs = trl_loss(
        log_probs, old, advantages, mask, loss_type=loss_type, beta=beta, eps_low=0.2, eps_high=0.28, ref=ref,
        max_len=5, entropies=entropies, top_entropy_quantile=quantile,
    )
    (their_grad,) = torch.autograd.grad(theirs, log_probs)
    assert torch.allclose(ours, theirs, atol=1e-6), (float(ours), float(theirs))
    assert torch.allclose(our_grad, their_grad, atol=1e-6)
    # Tokens outside the mask get no policy gradient (only the KL's, when β > 0).
    if beta == 0.0:
        assert torch.all(our_grad[~ours_mask] == 0) and our_grad[ours_mask].abs().sum() > 0


def test_high_entropy_mask_keeps_the_top_quantile_of_completion_tokens_only():
    entropies = torch.tensor([[0.1, 0.9, 5.0], [0.5, 0.7, 0.3]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # 5.0 is padding: never kept, never counted
    # masked entropies 0.1 0.9 0.5 0.7 0.3 -> the 0.6 quantile (ρ = 0.4) is 0.58: keeps 0.9 and 0.7
    assert high_entropy_mask(entropies, mask, 0.4).tolist() == [[False, True, False], [False, True, False]]
    assert high_entropy_mask(entropies, mask, 0.0).tolist() == [[False, True, False], [False, False, False]]
    assert torch.equal(high_entropy_mask(entropies, mask, 1.0), mask.bool())
    assert not high_entropy_mask(entropies, torch.zeros_like(mask), 0.2).any()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_entropies_match_trls_entropy_from_logits(temperature, monkeypatch):
    from trl.trainer.utils import entropy_from_logits

    logits = torch.randn(5, 3, 11, generator=torch.Generator().manual_seed(3)) * 4
    expected = entropy_from_logits(logits / temperature)
    assert torch.allclose(token_entropies(logits, temperature), expected, atol=1e-5)
    monkeypatch.setattr("fgrpo.core.grpo.LOG_PROB_CHUNK_ELEMENTS", 3 * 11 * 2)  # 2 rows per chunk: 3 chunks
    assert torch.allclose(token_entropies(logits, temperature), expected, atol=1e-5)


def test_truncated_completions_are_those_whose_last_kept_token_is_no_stop_token():
    eos, pad = 2, 0
    ids = torch.tensor([
        [5, 6, 2, 0],  # stopped at EOS
        [5, 6, 7, 8],  # cut off at max_completion_length
        [5, 6, 7, 2],  # EOS as the very last allowed token: finished
        [5, 0, 0, 0],  # its last kept token is pad (TRL counts pad as a stop)
        [0, 0, 0, 0],  # empty
    ])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    assert truncated_completions(ids, mask, [eos, pad]).tolist() == [False, True, False, False, False]
    # TRL's own test on the unpadded lists: ids[-1] not in eos_and_pad
    rows = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    assert [bool(r) and r[-1] not in (eos, pad) for r in rows] == truncated_completions(ids, mask, [eos, pad]).tolist()


@pytest.mark.parametrize("loss_type", ["bnpo", "dapo"])
def test_masking_truncated_completions_equals_dropping_them_from_token_mean_losses(loss_type):
    """With mask_truncated_completions, a cut-off row adds nothing to the loss, its gradient or its normaliser."""
    log_probs, old, ref, advantages, mask = random_case(17)
    truncated = torch.tensor([False, True, False, False, True, False])
    masked = mask * (~truncated).unsqueeze(1).long()
    options = dict(epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=5)
    loss = grpo_loss(log_probs, old, advantages, masked, **options).loss
    (grad,) = torch.autograd.grad(loss, log_probs)
    keep = ~truncated
    kept_log_probs = log_probs.detach()[keep].requires_grad_(True)
    dropped = grpo_loss(kept_log_probs, old[keep], advantages[keep], mask[keep], **options).loss
    (kept_grad,) = torch.autograd.grad(dropped, kept_log_probs)
    assert torch.allclose(loss, dropped, atol=1e-6)
    assert torch.all(grad[truncated] == 0) and torch.allclose(grad[keep], kept_grad, atol=1e-6)
    assert not torch.isclose(loss, grpo_loss(log_probs, old, advantages, mask, **options).loss)


def test_hand_computed_clipped_regions():
    # One token per sequence, four sequences; ratio ρ = exp(lp - old).
    old = torch.zeros(4, 1)
    log_probs = torch.log(torch.tensor([[1.5], [0.5], [1.1], [0.5]])).requires_grad_(True)
    advantages = torch.tensor([1.0, -1.0, 1.0, 1.0])
    mask = torch.ones(4, 1)
    out = grpo_loss(log_probs, old, advantages, mask, epsilon_low=0.2, epsilon_high=0.2, loss_type="bnpo")
    # per-token: -min(ρA, clip(ρ)A)
    #  ρ=1.5, A=+1 → -min(1.5, 1.2) = -1.2   (high clip, no gradient)
    #  ρ=0.5, A=-1 → -min(-0.5, -0.8) = 0.8  (low clip, no gradient)
    #  ρ=1.1, A=+1 → -1.1                    (inside, gradient -ρ = -1.1)
    #  ρ=0.5, A=+1 → -min(0.5, 0.8) = -0.5   (below the range but A>0: unclipped, gradient -0.5)
    assert out.loss.item() == pytest.approx((-1.2 + 0.8 - 1.1 - 0.5) / 4)
    (grad,) = torch.autograd.grad(out.loss, log_probs)
    assert grad.squeeze().tolist() == pytest.approx([0.0, 0.0, -1.1 / 4, -0.5 / 4])
    assert out.clip_fraction == pytest.approx(0.5)
    assert out.clip_high_fraction == pytest.approx(0.25) and out.clip_low_fraction == pytest.approx(0.25)


def test_hand_computed_loss_aggregations():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate_token_loss(per_token, mask, "grpo", 4).item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert aggregate_token_loss(per_token, mask, "bnpo", 4).item() == pytest.approx(10 / 4)
    assert aggregate_token_loss(per_token, mask, "dr_grpo", 4).item() == pytest.approx(10 / (2 * 4))
    assert aggregate_token_loss(per_token, mask, "dapo", 4).item() == pytest.approx(10 / 4)
    assert aggregate_token_loss(per_token, mask, "dapo", 4, num_items_in_batch=8).item() == pytest.approx(10 / 8)


def test_group_advantages_hand_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 10.0, 10.0, 0.0, 0.0])  # two groups of 4
    # group 1: mean .25, unbiased std .5; group 2: mean 5, std sqrt(100/3)
    adv_none = group_advantages(rewards, 4, "none")
    assert adv_none.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 5, 5, -5, -5])
    adv_group = group_advantages(rewards, 4, "group")
    assert adv_group[:4].tolist() == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001] + [-0.25 / 0.5001] * 2, rel=1e-5)
    std2 = (100 / 3) ** 0.5
    assert adv_group[4].item() == pytest.approx(5 / (std2 + 1e-4), rel=1e-5)
    batch_std = rewards.std().item()
    assert group_advantages(rewards, 4, "batch")[4].item() == pytest.approx(5 / (batch_std + 1e-4), rel=1e-5)


def test_group_scaling_is_invariant_to_reward_scale():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    assert torch.allclose(group_advantages(rewards, 4), group_advantages(10 * rewards - 3, 4), atol=1e-3)


def test_identical_rewards_give_zero_advantage():
    assert group_advantages(torch.full((8,), 3.0), 4).abs().max() == 0


def test_kl_k3_is_zero_at_equality_and_positive_otherwise():
    a = torch.tensor([[-1.0, -2.0]])
    assert kl_k3(a, a).abs().max() == 0
    assert (kl_k3(a, a + torch.tensor([[0.5, -0.5]])) > 0).all()
    # hand value: r = 0.5 → e^0.5 - 0.5 - 1
    assert kl_k3(torch.tensor([[0.0]]), torch.tensor([[0.5]])).item() == pytest.approx(2.718281828**0.5 - 1.5)


def test_completion_mask_keeps_tokens_through_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    assert completion_mask_after_eos(ids, eos_token_id=2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_token_log_probs_applies_temperature():
    logits = torch.tensor([[[2.0, 0.0]]])
    ids = torch.tensor([[0]])
    assert token_log_probs(logits, ids).item() == pytest.approx(torch.log_softmax(logits, -1)[0, 0, 0].item())
    assert token_log_probs(logits, ids, temperature=2.0).item() == pytest.approx(
        torch.log_softmax(logits / 2, -1)[0, 0, 0].item()
    )


def test_token_log_probs_in_chunks_equal_log_softmax_with_gradients(monkeypatch):
    import fgrpo.core.grpo as grpo

    torch.manual_seed(0)
    logits = torch.randn(5, 3, 11, requires_grad=True)
    ids = torch.randint(0, 11, (5, 3))
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    monkeypatch.setattr(grpo, "LOG_PROB_CHUNK_ELEMENTS", 2 * 3 * 11)  # 2 sequences per chunk: 3 chunks
    ours = token_log_probs(logits, ids, temperature=0.7)
    (grad,) = torch.autograd.grad(ours.sum(), logits)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(grad, expected_grad)


def trl_multi_objective_advantages(rewards_per_func, weights, num_generations, aggregation, scale_rewards="group"):
    """Run TRL 1.16's own aggregation block (`GRPOTrainer._generate_and_score_completions`, from
    `if self.multi_objective_aggregation == ...` to its ValueError) on the given tensors: TRL has no function for it."""
    import inspect
    import textwrap

    from trl.trainer.utils import nanstd as trl_nanstd

    lines = inspect.getsource(trl_grpo.GRPOTrainer._generate_and_score_completions).splitlines()
    start = next(i for i, line in enumerate(lines) if 'if self.multi_objective_aggregation == "sum_then_normalize"' in line)
    end = next(i for i in range(start, len(lines)) if "Invalid multi_objective_aggregation" in lines[i])
    end = next(i for i in range(end, len(lines)) if lines[i].strip() == ")")
    scope = {
        "self": SimpleNamespace(
            multi_objective_aggregation=aggregation, scale_rewards=scale_rewards, reward_weights=weights,
            reward_funcs=[None] * len(weights),
        ),
        "rewards_per_func": rewards_per_func,
        "num_generations": num_generations,
        "device": "cpu",
        "unscorable_mask": torch.isnan(rewards_per_func).all(dim=1),
        "torch": torch,
        "nanstd": trl_nanstd,
    }
    exec(textwrap.dedent("\n".join(lines[start : end + 1])), scope)  # noqa: S102 - TRL's installed source, pinned
    return scope["advantages"]


def multi_reward_case(seed: int, groups: int = 3, g: int = 4):
    """Three reward functions on different scales, one of them not applicable (NaN) to the second prompt."""
    gen = torch.Generator().manual_seed(seed)
    per_func = torch.stack(
        [torch.randint(0, 2, (groups * g,), generator=gen).float(), 10 * torch.rand(groups * g, generator=gen),
         torch.randn(groups * g, generator=gen)], dim=1,
    )  # (N, 3)
    per_func[g : 2 * g, 2] = float("nan")
    return per_func, torch.tensor([1.0, 0.5, -0.3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_normalize_then_sum_matches_trl(seed):
    per_func, weights = multi_reward_case(seed)
    ours = normalize_then_sum_advantages(per_func, weights, 4)
    assert torch.allclose(ours, trl_multi_objective_advantages(per_func, weights, 4, "normalize_then_sum"), atol=1e-6)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_sum_then_normalize_is_the_weighted_sum_through_group_advantages_as_in_trl(scale_rewards):
    per_func, weights = multi_reward_case(0)
    summed = (per_func * weights).nansum(dim=1)  # WeightedReward's score
    ours = group_advantages(summed, 4, scale_rewards)
    theirs = trl_multi_objective_advantages(per_func, weights, 4, "sum_then_normalize", scale_rewards)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_normalize_then_sum_hand_values_and_scale_invariance():
    # one group of 4, two functions: a {0,1} one and a [0, 100] one; equal weights
    per_func = torch.tensor([[1.0, 0.0], [0.0, 100.0], [1.0, 100.0], [0.0, 0.0]])
    adv = normalize_then_sum_advantages(per_func, torch.tensor([1.0, 1.0]), 4)
    z = (torch.tensor([1.0, 0.0, 1.0, 0.0]) - 0.5) / (torch.tensor([1.0, 0, 1, 0]).std() + 1e-4)  # each column's z
    summed = z + (torch.tensor([0.0, 100, 100, 0]) - 50) / (torch.tensor([0.0, 100, 100, 0]).std() + 1e-4)
    expected = (summed - summed.mean()) / (summed.std() + 1e-4)
    assert torch.allclose(adv, expected, atol=1e-5)
    # a function's scale no longer decides its share (sum_then_normalize: the [0, 100] one would drown the other)
    rescaled = per_func * torch.tensor([1.0, 0.01])
    assert torch.allclose(adv, normalize_then_sum_advantages(rescaled, torch.tensor([1.0, 1.0]), 4), atol=1e-3)
    assert not torch.allclose(group_advantages((per_func).sum(1), 4), group_advantages(rescaled.sum(1), 4), atol=1e-1)
