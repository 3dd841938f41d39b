"""Screen a round's replies before any strategy sees them: drop the broken ones, decode, bound norms and sizes.

A reply is left out, with its reason, when it is missing, an error, breaks the
reply rules of `reply_checks` (records, metrics, ids bound to their nodes), carries
broken arrays (arrays that do not decode, are not floating point, or do not fit
θ_t), or (with norm clipping in "reject" mode) an update far larger than the
round's lower median. Everything here works on records and numpy arrays only
(no model).

Sizes are a peer's word too: `capped_sizes` holds each client's claimed
`num-examples` to the share of the round FGRPO's weight cap allows, before
FedAvg, its variants or FGRPO's size prior weigh by it (`cap_sizes`); pooled
evaluation counts pass the same rule (`server.global_accuracy`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from flwr.app import Message

from fgrpo.config import CompressionConfig
from fgrpo.federation import wire
from fgrpo.federation.aggregation import aggregation_weights
from fgrpo.federation.compression import CompressionError, apply_delta, decode_delta
from fgrpo.federation.defense import norm_clip_factors, screen_update, update_norm
from fgrpo.federation.fedsa import upload_problem, with_global_b
from fgrpo.federation.hetlora import pad_to_full, rank_problem
from fgrpo.federation.reply_checks import decode_arrays, dtype_problem, screen_round
from fgrpo.federation.wire import arrays_to_record, record_to_arrays


class Failure(NamedTuple):
    """A sampled client left out of a round's aggregation, and why."""

    node_id: int
    client_id: int | None
    reason: str


def _reply_arrays(reply: Message) -> dict[str, np.ndarray]:
    return record_to_arrays(next(iter(reply.content.array_records.values())))


def screen_replies(
    messages: list[Message],
    replies: list[Message],
    current: dict[str, np.ndarray],
    node_clients: dict[int, int],
    compression: CompressionConfig | None = None,
    *,
    num_clients: int,
    weight_key: str = wire.NUM_EXAMPLES,
    ranks: dict[int, int] | None = None,
    mixed_ranks: bool = False,
    personal: bool = False,
    sizes: dict[int, int] | None = None,
) -> tuple[list[Message], list[Failure]]:
    """Split a round's replies into usable ones and failures (no reply, error, broken records, metrics, ids or arrays).

    Records and metrics are screened first (`reply_checks.screen_round`: the
    node ↔ client-id bindings in `node_clients` grow on first sight). A reply
    that declares a LoRA rank (`lora-rank`) must hold exactly that rank's
    shapes and is padded back to θ_t's (`hetlora.pad_to_full`; lower ranks only
    when `mixed_ranks`); `ranks` gets client-id -> rank. With `personal` (fedsa) a reply must hold exactly
    θ_t's LoRA A matrices and is completed with θ_t's B (`fedsa.with_global_b`). With a compression codec, each usable reply is then decoded in place to θ_t + Δ̂,
    so what follows (clipping, every strategy) sees ordinary float32 weights.
    Without one, every array must be floating point (`reply_checks.dtype_problem`).
    `sizes` (client-id -> the num-examples it first declared) bounds later claims (`reply_checks.bind_size`).
    """
    ok: list[Message] = []
    failures: list[Failure] = []
    answered = {r.metadata.reply_to_message_id for r in replies}
    for message in messages:
        if message.metadata.message_id not in answered:
            node = message.metadata.dst_node_id
            failures.append(Failure(node, node_clients.get(node), "no reply within federation.round_timeout_s"))
    accepted, refused = screen_round(
        replies, train=True, num_clients=num_clients, bindings=node_clients, weight_key=weight_key, sizes=sizes
    )
    failures += [Failure(*refusal) for refusal in refused]
    compressed = compression is not None and compression.codec != "none"
    for reply in accepted:
        node = reply.metadata.src_node_id
        content = reply.content
        client_id = int(content[wire.METRICS][wire.CLIENT_ID])
        arrays, problem = decode_arrays(next(iter(content.array_records.values())))
        if problem is None and not compressed:  # a codec's wire dtypes are checked by its decoder
            problem = dtype_problem(arrays)
        if problem is not None:
            failures.append(Failure(node, client_id, problem))
            continue
        if personal:
            problem = upload_problem(arrays, current)
            if problem is not None:
                failures.append(Failure(node, client_id, problem))
                continue
            arrays = with_global_b(arrays, current)
            reply.content[next(iter(content.array_records))] = arrays_to_record(arrays)
        declared = content[wire.METRICS].get(wire.LORA_RANK)
        if declared is not None:
            # An encoded upload has the codec's shapes: only the full rank is accepted with compression.
            problem = rank_problem(int(declared), None if compressed else arrays, current, mixed_ranks and not compressed)
            if problem is not None:
                failures.append(Failure(node, client_id, problem))
                continue
            if not compressed:
                arrays = pad_to_full(arrays, current)
                reply.content[next(iter(content.array_records))] = arrays_to_record(arrays)
            if ranks is not None:
                ranks[client_id] = int(declared)
        if compressed:
            try:
                arrays = apply_delta(current, decode_delta(arrays, current, compression.codec, compression.block_size))
            except CompressionError as error:
                failures.append(Failure(node, client_id, str(error)[:400]))
                continue
            reply.content[next(iter(content.array_records))] = arrays_to_record(arrays)
        problem = screen_update(current, arrays)
        if problem is not None:
            failures.append(Failure(node, client_id, problem))
            continue
        ok.append(reply)
    return ok, failures


def clip_replies(
    ok: list[Message], current: dict[str, np.ndarray], multiple: float | None, mode: str
) -> tuple[list[Message], dict[int, tuple[float, float]], list[Failure]]:
    """Bound every update's norm by `multiple` × the round's lower median (scale it, or reject it; None: no bound).

    Returns (kept replies, client-id -> (norm, factor), rejections). Scaled
    replies are rewritten in place, so every strategy aggregates the bounded update.
    """
    norms = [update_norm(current, _reply_arrays(r)) for r in ok]
    ids = [int(r.content[wire.METRICS][wire.CLIENT_ID]) for r in ok]
    factors = norm_clip_factors(norms, multiple) if multiple is not None else np.ones(len(ok))
    kept, rejected = [], []
    for reply, norm, factor, cid in zip(ok, norms, factors, ids):
        if factor < 1.0 and mode == "reject":
            rejected.append(Failure(reply.metadata.src_node_id, cid, f"update norm {norm:.3g} > {multiple}× the round's lower-median norm"))
            continue
        if factor < 1.0:
            key = next(iter(reply.content.array_records))
            reply.content[key] = arrays_to_record(wire.scale_update(current, _reply_arrays(reply), float(factor)))
        kept.append(reply)
    return kept, {cid: (norm, float(f)) for cid, norm, f in zip(ids, norms, factors)}, rejected


def capped_sizes(sizes: Sequence[float]) -> np.ndarray:
    """The sizes a round counts: the claims, with no client above `auto_weight_cap(K)` of their sum.

    sizes (K,) -> counted (K,), each <= its claim. Why: FedAvg, its variants
    and FGRPO's size prior weigh a client by the size it claims, so a claim of
    1e9 would buy the whole round. The rule: among the K clients with a size
    > 0, none counts for more than max(1/K, min(½, 1.5/K)) of the round's
    total (the share FGRPO's weight cap allows: never a majority, at most 1.5×
    an equal share); clients within it keep their claims exactly, so honest
    rounds inside the cap aggregate as before. Zeros stay zero.
    """
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1)  # (K,)
    counted = sizes.copy()
    positive = sizes > 0
    if positive.sum() < 2:
        return counted
    claimed = sizes[positive]
    shares = aggregation_weights(np.zeros(len(claimed)), claimed, temperature=math.inf, w_max="auto")
    # The free clients share one n_k / share_k; a capped client's is larger (its share was cut): keep the free ones'.
    scale = float(np.min(claimed / shares))
    counted[positive] = np.minimum(claimed, shares * scale)
    return counted


def cap_sizes(ok: list[Message], key: str) -> dict[int, tuple[float, float]]:
    """Rewrite each reply's weight metric `key` to its counted size (`capped_sizes`), in place.

    Returns client-id -> (claimed, counted). Every strategy reads the rewritten
    value, so what it weighs by and what `metrics.jsonl` logs are the same.
    """
    claims = [float(r.content[wire.METRICS][key]) for r in ok]
    ids = [int(r.content[wire.METRICS][wire.CLIENT_ID]) for r in ok]
    counted = capped_sizes(claims)
    for reply, claim, size in zip(ok, claims, counted):
        if size < claim:
            reply.content[wire.METRICS][key] = float(size)
    return {cid: (claim, float(size)) for cid, claim, size in zip(ids, claims, counted)}
