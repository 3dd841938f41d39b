"""From a config's method to the Flower strategy that runs it: robust aggregation and central DP where asked."""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy

from fgrpo.config import Config
from fgrpo.errors import ConfigError
from fgrpo.federation import wire
from fgrpo.federation.strategies import make_strategy
from fgrpo.registry import BY_NAME

# Flower's robust FedAvg variants, used when a FedAvg run asks for robust aggregation.
ROBUST_FEDAVG = {"median": "fedmedian", "trimmed_mean": "fedtrimmedavg"}
# Methods whose aggregation Flower's DP accountant can account for (uniform FedAvg averaging).
DP_METHODS = ("fedavg", "fedprox")


def clients_per_round(config: Config) -> int:
    fed = config.federation
    return min(fed.num_clients, max(fed.min_train_clients, int(fed.num_clients * fed.fraction_train)))


def build_strategy(config: Config, num_nodes: int) -> Strategy:
    """The Flower strategy for the configured method, with robust aggregation and DP where asked."""
    fed = config.federation
    name = BY_NAME[fed.method].strategy
    sampled = 1 if fed.method == "centralized" else clients_per_round(config)
    # Flower's strategies wait until `min_available_nodes` are connected before
    # sampling: asking for fewer than all nodes lets a round go on after a
    # SuperNode drops (deployment), while `fraction_train` still samples `sampled`
    # of `num_nodes` (the epsilon guards int() against 29/100*100 = 28.999...).
    floor = min(sampled, fed.min_train_clients)
    common = dict(
        fraction_train=min(1.0, (sampled + 1e-6) / num_nodes),
        min_train_nodes=floor,
        min_available_nodes=floor,
        fraction_evaluate=1.0,
        min_evaluate_nodes=floor,
    )
    options: dict = {}
    robust = fed.defense.robust
    if name == "fgrpo":
        options = fed.fgrpo.model_dump()
    elif name == "fedprox":
        options = {"proximal_mu": fed.proximal_mu}
    elif name in ("fedadam", "fedyogi", "fedadagrad"):
        options = fed.server_opt.model_dump()
    if robust != "none":
        if name in ("fgrpo", "reward_weighted"):
            options.update(aggregator=robust, trim_fraction=fed.defense.trim_fraction)
        elif name == "fedavg":
            name = ROBUST_FEDAVG[robust]
            if robust == "trimmed_mean":
                options["beta"] = fed.defense.trim_fraction
        else:
            raise ConfigError(
                f"federation.defense.robust = '{robust}' works with methods fgrpo, reward_weighted and fedavg, "
                f"not '{fed.method}'"
            )
    if fed.dp.enabled:
        if fed.method not in DP_METHODS or robust != "none":
            raise ConfigError(
                f"federation.dp: method '{fed.method}'{' with robust aggregation' if robust != 'none' else ''} is not "
                f"supported. Flower's accountant covers the uniform average of {', '.join(DP_METHODS)} only; "
                "FGRPO's data-dependent weights change every client's share when one client joins, so the noise "
                "Flower adds would not bound its sensitivity"
            )
        common["weighted_by_key"] = wire.UNIT_WEIGHT
    strategy = make_strategy(name, **common, **options)
    if fed.dp.enabled:
        strategy = _with_dp(strategy, config, sampled, num_nodes)
    return strategy


def _with_dp(strategy, config: Config, sampled: int, num_nodes: int):
    """Flower's central-DP wrapper (clients clip, the server adds noise σ·C/m) with its RDP accountant."""
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping
    from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    dp = config.federation.dp
    if dp.noise_multiplier <= 0:
        raise ConfigError("federation.dp.noise_multiplier must be > 0 when DP is enabled (σ = 0 gives no privacy)")
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=dp.delta,
            population_size=num_nodes,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    return DifferentialPrivacyClientSideFixedClipping(
        strategy, dp.noise_multiplier, dp.clip_norm, sampled, accountant=accountant
    )


def local_steps_per_round(config: Config) -> int:
    """GRPO steps per round. Centralized does the rollouts of all sampled clients in one place (equal rollouts):
    as many steps as a client with their pooled prompts, or (`centralized_batch = "sequential"`) their steps
    one after another."""
    fed = config.federation
    if fed.method == "centralized" and fed.centralized_batch == "sequential":
        return fed.local_steps * clients_per_round(config)
    return fed.local_steps


def prompts_per_step(config: Config) -> int:
    """Prompts per GRPO step: a client's `training.prompts_per_step`, × the sampled clients for pooled centralized."""
    fed = config.federation
    if fed.method == "centralized" and fed.centralized_batch == "pooled":
        return config.training.prompts_per_step * clients_per_round(config)
    return config.training.prompts_per_step


def weight_key(config: Config) -> str:
    """The reply metric Flower's FedAvg family weighs clients by: n_k, or 1 each under DP."""
    return wire.UNIT_WEIGHT if config.federation.dp.enabled else wire.NUM_EXAMPLES
