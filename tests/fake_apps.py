"""A ClientApp without a model, for tests of the server path: fixed, predictable updates and metrics."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fgrpo.federation import wire
from fgrpo.federation.export import layout_to_text


def fake_client_app(
    theta0: dict[str, np.ndarray] | None = None,
    layout: dict | None = None,
    *,
    reward: Callable[[int, int], float] = lambda cid, server_round: 0.5,
    broken: frozenset[int] | set[int] = frozenset(),
    liar: int | None = None,
    examples: Callable[[int, int], int] = lambda cid, server_round: 10 * (cid + 1),
    evaluation: Callable[[int], tuple[int, float]] = lambda cid: (4, 0.25 * (cid + 1)),
) -> ClientApp:
    """Client k adds k + 1 to θ, reports `examples(k, round)` examples (10·(k + 1)), `reward(k, round)` and
    `evaluation(k)` = (held-out count, accuracy), by default (4, 0.25·(k + 1)).

    With `theta0` and `layout` it also answers the server's init query (θ₀ and the checkpoint layout).
    Clients in `broken` send NaN; the `liar` reports reward-mean 10^round (a huge, ever-growing fake
    gain) and sends 20× its step.
    """
    app = ClientApp()

    if theta0 is not None:

        @app.query()
        def init(msg, context):
            config = ConfigRecord({wire.CHECKPOINT_LAYOUT: layout_to_text(layout or {})})
            return Message(RecordDict({wire.ARRAYS: wire.arrays_to_record(theta0), wire.CONFIG: config}), reply_to=msg)

    @app.train()
    def train(msg, context):
        cid = int(context.node_config["partition-id"])
        server_round = int(msg.content[wire.CONFIG].get("server-round", 1))
        theta = wire.record_to_arrays(msg.content[wire.ARRAYS])
        step = (20 if cid == liar else 1) * (np.nan if cid in broken else cid + 1)
        trained = {k: v + step for k, v in theta.items()}
        reward_mean = 10.0 ** server_round if cid == liar else reward(cid, server_round)
        metrics = {wire.CLIENT_ID: cid, wire.NUM_EXAMPLES: examples(cid, server_round), wire.REWARD_MEAN: reward_mean,
                   wire.REWARD_STD: 0.1, wire.ACCURACY: 0.5, wire.TRAIN_TIME: 0.0, wire.UNIT_WEIGHT: 1}
        return Message(RecordDict({wire.ARRAYS: wire.arrays_to_record(trained), wire.METRICS: MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg, context):
        cid = int(context.node_config["partition-id"])
        count, accuracy = evaluation(cid)
        metrics = {wire.CLIENT_ID: cid, wire.NUM_EXAMPLES: count, wire.ACC_HELDOUT: accuracy}
        return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app
