"""Server-side aggregation: FGRPO's gain-weighted average as Flower strategies.

The weight math lives in `fgrpo.federation.aggregation` as small pure numpy
functions (gains → weights → update; re-exported here); `FGRPO` and
`RewardWeighted` wrap it in `flwr.serverapp.strategy.FedAvg`
subclasses that keep FedAvg's sampling and configure_* behaviour and only
replace `aggregate_train`. Clients send their updated adapter θ_k (not Δ_k),
so Flower's own FedAvg / FedProx / FedAdam / ... run on the same replies;
`make_strategy` builds any of them by name.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Strategy,
)

from fgrpo.config import DEFAULT_MAX_TILT
from fgrpo.errors import ConfigError, FederationError
from fgrpo.federation.defense import ROBUST_AGGREGATORS, robust_update
from fgrpo.federation import wire
from fgrpo.federation.wire import arrays_to_record, record_to_arrays

from fgrpo.federation.aggregation import (  # noqa: F401  (the math is re-exported here)
    GAINS,
    MAX_GAIN,
    RunningStats,
    aggregation_weights,
    auto_weight_cap,
    relative_gain,
    reward_weighted_weights,
    update_baseline,
    weighted_update,
    zscore_gain,
)
from fgrpo.federation.gains import in_round_gain, shrink_by_evidence, standard_error_gain, update_baseline_var


# --------------------------------------------------------------------------- strategies


@dataclass
class ClientState:
    """What the server remembers about one client (keyed by its stable client-id)."""

    baseline: float | None = None
    baseline_var: float | None = None  # variance of the EMA baseline (standard_error gain, shrinkage)
    history: RunningStats = field(default_factory=RunningStats)
    rounds_seen: int = 0
    last_round: int = 0


@dataclass(frozen=True)
class AggregationRecord:
    """The last round's per-client aggregation, in client-id order, for logging."""

    server_round: int
    client_ids: list[int]
    gains: list[float]
    weights: list[float]
    reward_means: list[float]
    num_examples: list[float]


@dataclass(frozen=True)
class _Reply:
    node_id: int
    client_id: int
    num_examples: float
    reward_mean: float
    arrays: dict[str, np.ndarray]
    reward_var: float = math.nan  # squared standard error of reward_mean ("reward-mean-var")
    inround: float = math.nan  # in-round improvement θ_k − θ_t on fresh prompts ("gain-inround")
    inround_var: float = math.nan  # its squared standard error ("gain-inround-var")


class WeightedAverage(FedAvg):
    """FedAvg with `aggregate_train` replaced by θ_t + η Σ w_k (θ_k − θ_t).

    Subclasses choose the weights (`_weigh`) and may keep per-client state
    (`_after_round`). θ_t is the ArrayRecord passed to `configure_train`.
    """

    client_id_key = wire.CLIENT_ID
    reward_key = wire.REWARD_MEAN

    def __init__(
        self, *, server_lr: float = 1.0, aggregator: str = "none", trim_fraction: float = 0.2, **fedavg_kwargs: Any
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if not (math.isfinite(server_lr) and server_lr >= 0):
            raise ConfigError(f"{type(self).__name__}: server_lr must be finite and >= 0, got {server_lr}")
        if aggregator not in ROBUST_AGGREGATORS:
            raise ConfigError(f"{type(self).__name__}: aggregator must be one of {', '.join(ROBUST_AGGREGATORS)}, got {aggregator!r}")
        self.server_lr = float(server_lr)
        self.aggregator = aggregator
        self.trim_fraction = float(trim_fraction)
        self.current_arrays: dict[str, np.ndarray] | None = None
        self.last_aggregation: AggregationRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current_arrays = record_to_arrays(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def _weigh(self, server_round: int, replies: list[_Reply]) -> tuple[np.ndarray, np.ndarray]:
        """(gains (K,), weights (K,)) for the replies, before any state update."""
        raise NotImplementedError

    def _after_round(self, server_round: int, replies: list[_Reply]) -> None:
        """Update per-client state once the round is aggregated."""

    def _parse(self, message: Message) -> _Reply:
        content = message.content
        node = message.metadata.src_node_id
        metrics = next(iter(content.metric_records.values()))
        for key in (self.client_id_key, self.reward_key, self.weighted_by_key):
            if key not in metrics:
                raise FederationError(
                    f"train reply from node {node} has no metric '{key}' "
                    f"(got {sorted(metrics)}); the ClientApp must report "
                    f"'{self.client_id_key}', '{self.reward_key}' and '{self.weighted_by_key}'"
                )
        client_id = metrics[self.client_id_key]
        if isinstance(client_id, list) or not (math.isfinite(client_id) and float(client_id) == int(client_id)):
            raise FederationError(f"train reply from node {node}: '{self.client_id_key}' must be an int, got {client_id!r}")
        record = next(iter(content.array_records.values()))

        def optional(key: str) -> float:
            value = metrics.get(key)
            return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan

        return _Reply(
            node_id=node,
            client_id=int(client_id),
            num_examples=float(metrics[self.weighted_by_key]),
            reward_mean=float(metrics[self.reward_key]),
            arrays=record_to_arrays(record),
            reward_var=optional(wire.REWARD_MEAN_VAR),
            inround=optional(wire.GAIN_IN_ROUND),
            inround_var=optional(wire.GAIN_IN_ROUND_VAR),
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            self.last_aggregation = None
            return None, None
        if self.current_arrays is None:
            raise FederationError(f"{type(self).__name__}.aggregate_train called before configure_train (no θ_t)")
        parsed = sorted((self._parse(msg) for msg in valid), key=lambda r: r.client_id)
        ids = [r.client_id for r in parsed]
        if len(set(ids)) != len(ids):
            raise FederationError(f"round {server_round}: two nodes reported the same client-id ({ids})")

        gains, weights = self._weigh(server_round, parsed)
        client_arrays = [r.arrays for r in parsed]
        if self.aggregator == "none":
            new_arrays = weighted_update(self.current_arrays, client_arrays, weights, self.server_lr)
        else:
            new_arrays = robust_update(
                self.current_arrays,
                client_arrays,
                weights,
                aggregator=self.aggregator,
                trim_fraction=self.trim_fraction,
                server_lr=self.server_lr,
            )
        self._after_round(server_round, parsed)

        try:
            metrics = self.train_metrics_aggr_fn([msg.content for msg in valid], self.weighted_by_key)
        except ZeroDivisionError:  # every client reported 0 examples: Flower's weighted mean is undefined
            metrics = MetricRecord()
        if self.client_id_key in metrics:
            del metrics[self.client_id_key]  # an average of ids means nothing
        metrics["agg-client-ids"] = ids
        metrics["agg-weights"] = [float(w) for w in weights]
        metrics["agg-gains"] = [float(g) for g in gains]
        self.last_aggregation = AggregationRecord(
            server_round=server_round,
            client_ids=ids,
            gains=[float(g) for g in gains],
            weights=[float(w) for w in weights],
            reward_means=[r.reward_mean for r in parsed],
            num_examples=[r.num_examples for r in parsed],
        )
        return arrays_to_record(new_arrays), metrics


class FGRPO(WeightedAverage):
    """FGRPO: weights ∝ p_k · exp(g_k / τ) from each client's gain over its own history.

    Parameters (besides FedAvg's keyword arguments)
    ----------
    gain : "relative" (g = (R − B)/max(|B|, δ), B an EMA of past R; the paper's form),
        "zscore" (g = (R − μ)/(σ + δ) over past R), "standard_error"
        (g = (R − B)/SE(R − B) from the clients' reported Var(R)) or "in_round"
        (the client's measured improvement of θ_k over θ_t on fresh prompts, in
        standard errors); see `fgrpo.federation.gains`. First participation: g = 0
        (except in_round, which needs no history).
    shrink : multiply each gain by t²/(1 + t²), t the client's improvement in
        standard errors, so that gains within noise fall back to FedAvg's weights.
    temperature : τ > 0; inf recovers FedAvg.
    baseline_decay : β in [0, 1) of B ← βB + (1 − β)R.
    delta : δ > 0, floor of the gain's denominator.
    w_min, w_max : bounds on every client's weight. w_max = "auto" (the default)
        is max(1/K, min(½, 1.5/K)) for the K clients of each round
        (`aggregation.auto_weight_cap`): a client reporting a huge fake gain
        gets at most half the round, and at most 1.5× an equal share. With
        K = 2 both weights are ½: FGRPO reduces to equal weights (not n_k-sized
        ones), the price of a cap below a majority. A number overrides it.
    size_prior : p_k = n_k/Σn (True) or uniform (False).
    max_tilt : c ≥ 1 bounds each client's tilt exp(g_k/τ) to [1/c, c] (None or "off": unbounded, the
        paper's), so a reported gain alone cannot lift a small owner to the cap. The default, 1.25,
        keeps a liar's weight within the range of its honest weights (docs/robustness.md).
    server_lr : η of θ ← θ + η Σ w_k Δ_k.

    Gains are computed against the state *before* this round; then baselines and
    histories are updated for the clients that took part (a non-finite R is not
    folded into the state).
    """

    def __init__(
        self,
        *,
        gain: str = "relative",
        temperature: float = 1.0,
        baseline_decay: float = 0.5,
        delta: float = 1e-3,
        w_min: float = 0.0,
        w_max: float | str = "auto",
        size_prior: bool = True,
        server_lr: float = 1.0,
        shrink: bool = False,
        max_tilt: float | str | None = DEFAULT_MAX_TILT,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(server_lr=server_lr, **fedavg_kwargs)
        self.shrink = bool(shrink)
        if gain not in GAINS:
            raise ConfigError(f"FGRPO: gain must be one of {', '.join(GAINS)}, got {gain!r}")
        if not float(temperature) > 0:
            raise ConfigError(f"FGRPO: temperature must be > 0 (inf for FedAvg), got {temperature}")
        if not 0 <= baseline_decay < 1:
            raise ConfigError(f"FGRPO: baseline_decay must be in [0, 1), got {baseline_decay}")
        if not (math.isfinite(delta) and delta > 0):
            raise ConfigError(f"FGRPO: delta must be finite and > 0, got {delta}")
        if w_max == "auto":
            if not 0 <= w_min <= 1:
                raise ConfigError(f"FGRPO: need 0 <= w_min <= 1, got w_min={w_min}")
        elif isinstance(w_max, str) or not (0 <= w_min <= w_max and 0 < w_max <= 1):
            raise ConfigError(
                f"FGRPO: need 0 <= w_min <= w_max <= 1 and w_max > 0 (or w_max = 'auto'), got w_min={w_min}, w_max={w_max!r}"
            )
        if max_tilt == "off":
            max_tilt = None
        if max_tilt is not None and not (isinstance(max_tilt, (int, float)) and math.isfinite(max_tilt) and max_tilt >= 1):
            raise ConfigError(f"FGRPO: max_tilt must be a number >= 1 or 'off', got {max_tilt!r}")
        self.max_tilt = None if max_tilt is None else float(max_tilt)
        self.gain = gain
        self.temperature = float(temperature)
        self.baseline_decay = float(baseline_decay)
        self.delta = float(delta)
        self.w_min = float(w_min)
        self.w_max: float | str = w_max if w_max == "auto" else float(w_max)
        self.size_prior = bool(size_prior)
        self.clients: dict[int, ClientState] = {}

    def summary(self) -> None:
        log(INFO, "\t├──> FGRPO: gain %s | τ %s | β %s | δ %s", self.gain, self.temperature, self.baseline_decay, self.delta)
        log(INFO, "\t│\t└── w in [%s, %s] | size prior %s | server lr %s", self.w_min, self.w_max, self.size_prior, self.server_lr)
        super().summary()

    def client_gain(self, client_id: int, reward_mean: float, reward_var: float = math.nan) -> float:
        """g_k of a client from its reward against its state so far (0.0 for a new client)."""
        state = self.clients.get(client_id)
        if self.gain == "relative":
            return relative_gain(reward_mean, state.baseline if state else None, self.delta)
        if self.gain == "standard_error":
            baseline_var = state.baseline_var if state and state.baseline_var is not None else 0.0
            return standard_error_gain(reward_mean, reward_var, state.baseline if state else None, baseline_var, self.delta)
        return zscore_gain(reward_mean, state.history if state else None, self.delta)

    def reply_gain(self, reply: _Reply) -> float:
        """g_k of one reply under the configured gain, shrunk by its evidence when `shrink`."""
        if self.gain == "in_round":
            gain = in_round_gain(reply.inround, reply.inround_var, self.delta)
            evidence = gain
        else:
            gain = self.client_gain(reply.client_id, reply.reward_mean, reply.reward_var)
            evidence = gain if self.gain == "standard_error" else self.client_gain_t(reply)
        return shrink_by_evidence(gain, evidence) if self.shrink else gain

    def client_gain_t(self, reply: _Reply) -> float:
        """The client's improvement over its baseline in standard errors (inf when unknown: no shrinkage)."""
        state = self.clients.get(reply.client_id)
        if not math.isfinite(reply.reward_var) or state is None or state.baseline is None:
            return math.inf if state is not None else 0.0
        baseline_var = state.baseline_var if state.baseline_var is not None else 0.0
        return standard_error_gain(reply.reward_mean, reply.reward_var, state.baseline, baseline_var, self.delta)

    def _weigh(self, server_round: int, replies: list[_Reply]) -> tuple[np.ndarray, np.ndarray]:
        gains = np.array([self.reply_gain(r) for r in replies])
        weights = aggregation_weights(
            gains,
            [r.num_examples for r in replies],
            temperature=self.temperature,
            w_min=self.w_min,
            w_max=self.w_max,
            size_prior=self.size_prior,
            max_tilt=self.max_tilt,
        )
        return gains, weights

    def _after_round(self, server_round: int, replies: list[_Reply]) -> None:
        for reply in replies:
            state = self.clients.setdefault(reply.client_id, ClientState())
            state.rounds_seen += 1
            state.last_round = server_round
            if math.isfinite(reply.reward_mean):
                state.baseline = update_baseline(state.baseline, reply.reward_mean, self.baseline_decay)
                state.history.update(reply.reward_mean)
                if math.isfinite(reply.reward_var) and reply.reward_var >= 0:
                    state.baseline_var = update_baseline_var(state.baseline_var, reply.reward_var, self.baseline_decay)

    def state_dict(self) -> dict:
        """JSON-serialisable per-client state (θ_t is not included: the runtime checkpoints the arrays)."""
        return {
            "version": 2,
            "clients": {
                str(cid): {
                    "baseline": s.baseline,
                    "baseline_var": s.baseline_var,
                    "count": s.history.count,
                    "mean": s.history.mean,
                    "m2": s.history.m2,
                    "rounds_seen": s.rounds_seen,
                    "last_round": s.last_round,
                }
                for cid, s in sorted(self.clients.items())
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (after a JSON round trip too)."""
        if state.get("version") not in (1, 2) or not isinstance(state.get("clients"), dict):
            raise ConfigError(f"FGRPO.load_state_dict: expected {{'version': 2, 'clients': {{...}}}}, got keys {sorted(state)}")
        clients = {}
        for cid, s in state["clients"].items():
            baseline, baseline_var = s["baseline"], s.get("baseline_var")
            clients[int(cid)] = ClientState(
                baseline=None if baseline is None else float(baseline),
                baseline_var=None if baseline_var is None else float(baseline_var),
                history=RunningStats(int(s["count"]), float(s["mean"]), float(s["m2"])),
                rounds_seen=int(s["rounds_seen"]),
                last_round=int(s["last_round"]),
            )
        self.clients = clients


class RewardWeighted(WeightedAverage):
    """The naive baseline: w_k ∝ max(R_k, 0) of the raw mean rewards, server_lr 1.

    Breaks when clients' rewards live on different scales. Its "agg-gains"
    report R_k itself, the signal its weights come from.
    """

    def __init__(self, **options: Any) -> None:
        options.pop("server_lr", None)
        super().__init__(server_lr=1.0, **options)

    def _weigh(self, server_round: int, replies: list[_Reply]) -> tuple[np.ndarray, np.ndarray]:
        rewards = np.array([r.reward_mean for r in replies])
        return rewards, reward_weighted_weights(rewards)

    def state_dict(self) -> dict:
        return {"version": 1}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise ConfigError(f"RewardWeighted.load_state_dict: unknown state {state!r}")


# --------------------------------------------------------------------------- factory

STRATEGIES: dict[str, type[Strategy]] = {
    "fgrpo": FGRPO,
    "reward_weighted": RewardWeighted,
    "fedavg": FedAvg,
    "fedprox": FedProx,  # option: proximal_mu (sent to clients as config "proximal-mu")
    "fedadam": FedAdam,  # options: eta, eta_l, beta_1, beta_2, tau
    "fedyogi": FedYogi,  # options: eta, eta_l, beta_1, beta_2, tau
    "fedadagrad": FedAdagrad,  # options: eta, eta_l, tau (beta_1 / beta_2 are ignored)
    "fedavgm": FedAvgM,  # options: server_learning_rate, server_momentum
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,  # option: beta (trimmed share per side)
}


def make_strategy(name: str, **options: Any) -> Strategy:
    """Build a strategy by name with FedAvg's keyword arguments plus its own options.

    Options set to None are dropped (Flower's default applies). The FedOpt
    family and FedAvgM take θ_t from `configure_train` in flwr 1.42, so no
    initial arrays are needed here.
    """
    key = name.strip().lower().replace("-", "_")
    if key not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    options = {k: v for k, v in options.items() if v is not None}
    if key == "fedadagrad":
        # Flower's FedAdagrad fixes beta_1 = beta_2 = 0; a shared server-opt config may still carry them.
        options.pop("beta_1", None)
        options.pop("beta_2", None)
    try:
        return STRATEGIES[key](**options)
    except TypeError as error:
        raise ConfigError(f"strategy {name!r}: bad options {sorted(options)}: {error}") from error
    except ValueError as error:
        raise ConfigError(f"strategy {name!r}: {error}") from error
