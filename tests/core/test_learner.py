"""GRPOLearner.step hands every loss option of the config to the loss."""

from __future__ import annotations

import torch

from fgrpo.config import config_from_dict


def test_step_passes_gspo_and_delta_to_the_loss(tmp_path, monkeypatch):
    from conftest import small_config_dict

    from fgrpo.core import learner as learner_module
    from fgrpo.core.pipeline import build_learner, build_task_pool

    config = config_from_dict(small_config_dict(tmp_path, grpo={"importance_sampling_level": "sequence", "delta": 1.5}))
    seen = {}
    real = learner_module.grpo_loss

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(learner_module, "grpo_loss", spy)
    learner = build_learner(config, 0)
    train, _ = build_task_pool(config.tasks)
    learner.step(train[:2])
    assert seen["importance_sampling_level"] == "sequence" and seen["delta"] == 1.5


def spied_step(tmp_path, monkeypatch, tasks: dict | None = None, **grpo):
    """One step on the tiny model; what grpo_loss received, the rollouts it was built from, the metrics."""
    from conftest import small_config_dict

    from fgrpo.core import learner as learner_module
    from fgrpo.core.pipeline import build_learner, build_task_pool

    config = config_from_dict(small_config_dict(tmp_path, grpo=grpo, tasks=tasks or {}))
    seen = {}
    real = learner_module.grpo_loss

    def spy(*args, **kwargs):
        seen["mask"], seen["advantages"] = args[3], args[2]
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(learner_module, "grpo_loss", spy)
    learner = build_learner(config, 0)
    generate = learner.generate_fn

    def keep(*args, **kwargs):
        seen["rollouts"] = generate(*args, **kwargs)
        return seen["rollouts"]

    learner.generate_fn = keep
    train, _ = build_task_pool(config.tasks)
    seen["examples"] = train[:4]
    metrics = learner.step(train[:4])
    return seen, metrics, learner


def test_mask_truncated_completions_takes_cut_off_rows_out_of_the_loss_mask(tmp_path, monkeypatch):
    from fgrpo.core.grpo import truncated_completions

    # 2 new tokens: the tiny model cuts off most, not all, completions.
    seen, metrics, learner = spied_step(tmp_path, monkeypatch, mask_truncated_completions=True, max_completion_length=2)
    rollouts = seen["rollouts"]
    truncated = truncated_completions(rollouts.completion_ids, rollouts.completion_mask, learner._stop_token_ids())
    assert metrics["train/truncated_frac"] == truncated.float().mean().item()
    assert truncated.any()  # the case exercises the option
    assert seen["mask"][truncated].sum() == 0
    assert (seen["mask"][~truncated] == rollouts.completion_mask[~truncated]).all()


def test_top_entropy_quantile_hands_the_loss_a_mask_of_the_high_entropy_tokens(tmp_path, monkeypatch):
    seen, _, _ = spied_step(tmp_path, monkeypatch, top_entropy_quantile=0.2)
    mask, chosen = seen["mask"].bool(), seen["entropy_mask"]
    assert chosen.dtype == torch.bool and not (chosen & ~mask).any()
    assert 0 < chosen.sum() < mask.sum()  # a strict subset: about a fifth of the completion tokens
    seen_all, _, _ = spied_step(tmp_path / "all", monkeypatch)
    assert seen_all["entropy_mask"] is None  # ρ = 1: every token, no mask built


def test_normalize_then_sum_gives_each_reward_function_its_own_group_normalisation(tmp_path, monkeypatch):
    from fgrpo.core.grpo import group_advantages, normalize_then_sum_advantages

    rewards = {"rewards": [{"name": "exact_match", "weight": 1.0}, {"name": "partial_credit", "weight": 0.5}]}
    seen, _, learner = spied_step(tmp_path, monkeypatch, tasks=rewards, multi_objective_aggregation="normalize_then_sum")
    _, scored = learner._score(seen["examples"], seen["rollouts"])  # the same completions, scored again
    assert scored.term_rewards.shape == (16, 2) and scored.term_weights.tolist() == [1.0, 0.5]
    per_func = torch.as_tensor(scored.term_rewards, dtype=torch.float32)
    expected = normalize_then_sum_advantages(per_func, torch.as_tensor(scored.term_weights), 4)
    assert torch.allclose(seen["advantages"], expected)
    summed = group_advantages(torch.as_tensor(scored.rewards, dtype=torch.float32), 4)
    assert not torch.allclose(seen["advantages"], summed, atol=1e-3)  # not the default's advantages


def _first_step_gradient(tmp_path, micro_batch_size: int, **grpo) -> dict[str, torch.Tensor]:
    """The clipped gradient of one step from a fixed seed, captured instead of the optimizer's update."""
    from conftest import small_config_dict

    from fgrpo.core.pipeline import build_learner, build_task_pool

    rewards = [{"name": "exact_match"}, {"name": "partial_credit"}]  # dense: every group has a spread
    config = config_from_dict(
        small_config_dict(
            tmp_path,
            grpo={"micro_batch_size": micro_batch_size, "num_generations": 4, "max_completion_length": 6, **grpo},
            tasks={"rewards": rewards},
        )
    )
    learner = build_learner(config, 0)
    grads = {}

    def capture():
        grads.update({n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None})

    learner.optimizer.step = capture
    train, _ = build_task_pool(config.tasks)
    torch.manual_seed(7)
    learner.step(train[::7][:6])  # both families
    return grads


import pytest  # noqa: E402


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("extra", [{}, {"beta": 0.1, "importance_sampling_level": "sequence"}])
def test_micro_batches_give_the_one_batch_gradient(tmp_path, loss_type, extra):
    """grpo.micro_batch_size bounds memory only: 24 completions in micro-batches of 8 (2 groups of 4) or of 1
    group give the gradient of one batch, for every loss type, with KL and sequence-level ratios."""
    whole = _first_step_gradient(tmp_path / "whole", 0, loss_type=loss_type, **extra)
    assert whole and any(g.abs().sum() > 0 for g in whole.values())
    for size in (8, 3):  # 3 < G rounds up to one group per micro-batch
        parts = _first_step_gradient(tmp_path / f"mb{size}", size, loss_type=loss_type, **extra)
        assert parts.keys() == whole.keys()
        for name in whole:
            torch.testing.assert_close(parts[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)
