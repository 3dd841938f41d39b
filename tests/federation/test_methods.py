"""The rollout budget of each method: centralized does the sampled clients' rollouts, pooled or one after another."""

from __future__ import annotations

import pytest

from fgrpo.config import config_from_dict
from fgrpo.federation.methods import clients_per_round, local_steps_per_round, prompts_per_step


def budget(tmp_path, method: str, **federation):
    from conftest import small_config_dict

    data = small_config_dict(tmp_path, federation={"method": method, "num_clients": 4, "local_steps": 3, **federation},
                             training={"prompts_per_step": 5})
    config = config_from_dict(data)
    return clients_per_round(config), local_steps_per_round(config), prompts_per_step(config)


def test_a_client_takes_local_steps_of_prompts_per_step(tmp_path):
    assert budget(tmp_path, "fedavg", min_train_clients=2)[1:] == (3, 5)


@pytest.mark.parametrize("fraction, sampled", [(1.0, 4), (0.5, 2)])
def test_pooled_centralized_takes_a_clients_steps_with_every_sampled_clients_prompts(tmp_path, fraction, sampled):
    clients, steps, prompts = budget(tmp_path, "centralized", fraction_train=fraction, min_train_clients=1)
    assert clients == sampled and (steps, prompts) == (3, 5 * sampled)


def test_sequential_centralized_takes_every_sampled_clients_steps_one_after_another(tmp_path):
    clients, steps, prompts = budget(tmp_path, "centralized", centralized_batch="sequential", min_train_clients=1)
    assert (steps, prompts) == (3 * clients, 5)


@pytest.mark.parametrize("batch", ["pooled", "sequential"])
def test_centralized_rolls_out_as_many_prompts_a_round_as_the_federated_clients(tmp_path, batch):
    clients, steps, prompts = budget(tmp_path, "fedavg", min_train_clients=1)
    _, central_steps, central_prompts = budget(tmp_path, "centralized", centralized_batch=batch, min_train_clients=1)
    assert central_steps * central_prompts == clients * steps * prompts
