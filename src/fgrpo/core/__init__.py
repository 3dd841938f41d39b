"""The GRPO core: model loading, rollouts, the loss, one learner step, evaluation, centralized training.

Knows nothing about federation: it never imports Flower.
"""
