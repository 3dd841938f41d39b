"""GRPOLearner.step hands every loss option of the config to the loss."""

from __future__ import annotations

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
