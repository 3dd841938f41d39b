"""Screen a round's replies before any strategy sees them: drop the broken ones, decode, bound the norms.

A reply is left out, with its reason, when it is missing, an error, breaks the
reply rules of `reply_checks` (records, metrics, ids bound to their nodes), carries
broken arrays, or (with norm clipping in "reject" mode) an update far larger
than the round's lower median. Everything here works on records and numpy arrays
only (no model).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from flwr.app import Message

from fgrpo.config import CompressionConfig
from fgrpo.federation import wire
from fgrpo.federation.compression import CompressionError, apply_delta, decode_delta
from fgrpo.federation.defense import norm_clip_factors, screen_update, update_norm
from fgrpo.federation.fedsa import upload_problem, with_global_b
from fgrpo.federation.hetlora import pad_to_full, rank_problem
from fgrpo.federation.reply_checks import screen_round
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
) -> tuple[list[Message], list[Failure]]:
    """Split a round's replies into usable ones and failures (no reply, error, broken records, metrics, ids or arrays).

    Records and metrics are screened first (`reply_checks.screen_round`: the
    node ↔ client-id bindings in `node_clients` grow on first sight). A reply
    that declares a LoRA rank (`lora-rank`) must hold exactly that rank's
    shapes and is padded back to θ_t's (`hetlora.pad_to_full`; lower ranks only
    when `mixed_ranks`); `ranks` gets client-id -> rank. With `personal` (fedsa) a reply must hold exactly
    θ_t's LoRA A matrices and is completed with θ_t's B (`fedsa.with_global_b`). With a compression codec, each usable reply is then decoded in place to θ_t + Δ̂,
    so what follows (clipping, every strategy) sees ordinary float32 weights.
    """
    ok: list[Message] = []
    failures: list[Failure] = []
    answered = {r.metadata.reply_to_message_id for r in replies}
    for message in messages:
        if message.metadata.message_id not in answered:
            node = message.metadata.dst_node_id
            failures.append(Failure(node, node_clients.get(node), "no reply within federation.round_timeout_s"))
    accepted, refused = screen_round(replies, train=True, num_clients=num_clients, bindings=node_clients, weight_key=weight_key)
    failures += [Failure(*refusal) for refusal in refused]
    for reply in accepted:
        node = reply.metadata.src_node_id
        content = reply.content
        client_id = int(content[wire.METRICS][wire.CLIENT_ID])
        arrays = _reply_arrays(reply)
        if personal:
            problem = upload_problem(arrays, current)
            if problem is not None:
                failures.append(Failure(node, client_id, problem))
                continue
            arrays = with_global_b(arrays, current)
            reply.content[next(iter(content.array_records))] = arrays_to_record(arrays)
        declared = content[wire.METRICS].get(wire.LORA_RANK)
        compressed = compression is not None and compression.codec != "none"
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
        if compression is not None and compression.codec != "none":
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
