"""What a client reply must hold before the server reads a single value of it.

A reply comes from a peer the server does not control: a bug, a crash or an
attacker can send any record names, any keys, NaN, 1e9 or another client's id.
Training and evaluation replies pass the same rules here, as small pure
functions that return the reason a reply is refused (None when it is fine):

- records: exactly one MetricRecord, and exactly one ArrayRecord (training) or
  none (evaluation), whatever their names, and nothing else;
- metrics: every value a finite int or float; the keys each side of the
  ClientApp sends (`federation/wire.py`), of the right type and in range;
- identity: `client-id` an integer in [0, num_clients), bound to the node that
  first reported it, so no node can take another's id or claim a second one,
  and never reported by two nodes in one round.

`canonical_content` renames the records of an accepted reply to `arrays` and
`metrics`, so what follows may read them by name. `screening` applies these
rules to a whole round.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from typing import NamedTuple

from flwr.app import Message, MetricRecord, RecordDict

from fgrpo.federation import wire

CLIENT_ID = wire.CLIENT_ID
NUM_EXAMPLES = wire.NUM_EXAMPLES
# Keys of a training reply and whether each holds a count (int) or a real number.
TRAIN_KEYS = {
    CLIENT_ID: int,
    NUM_EXAMPLES: int,
    wire.REWARD_MEAN: float,
    wire.REWARD_STD: float,
    wire.ACCURACY: float,
    wire.TRAIN_TIME: float,
}
# Sent only by some configurations (FGRPO's noise-aware gains); kept when every accepted reply has them.
OPTIONAL_TRAIN_KEYS = (wire.REWARD_MEAN_VAR, wire.GAIN_IN_ROUND, wire.GAIN_IN_ROUND_VAR, wire.LORA_RANK)
EVALUATE_KEYS = {CLIENT_ID: int, NUM_EXAMPLES: int}
HELDOUT = wire.ACC_HELDOUT
NON_NEGATIVE = (wire.REWARD_STD, wire.TRAIN_TIME)
# Bounds far beyond any honest report: a count of a client's prompts, a mean reward (reward scales are ≤ 1e6).
MAX_COUNT = 10**9
MAX_ABS_REWARD = 1e9
MAX_SECONDS = 1e7


def check_records(content: RecordDict, *, train: bool) -> str | None:
    """One MetricRecord, one ArrayRecord for training (none for evaluation), nothing else."""
    arrays, metrics, configs = len(content.array_records), len(content.metric_records), len(content.config_records)
    want = 1 if train else 0
    if arrays != want or metrics != 1 or configs:
        expected = "one ArrayRecord and one MetricRecord" if train else "one MetricRecord"
        return f"reply must carry {expected} and nothing else (got {arrays} ArrayRecord, {metrics} MetricRecord, {configs} ConfigRecord)"
    return None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(key: str, value) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_COUNT:
        return f"'{key}' must be an integer in [0, {MAX_COUNT}]"
    return None


def _fraction(key: str, value) -> str | None:
    if not _number(value) or not 0.0 <= value <= 1.0:
        return f"'{key}' must be a finite number in [0, 1]"
    return None


def check_client_id(value, num_clients: int) -> str | None:
    """`client-id` is an integer in [0, num_clients) (an int, not a float that happens to be whole)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < num_clients:
        return f"'{CLIENT_ID}' must be an integer in [0, {num_clients - 1}] (federation.num_clients = {num_clients})"
    return None


def _common(metrics: Mapping, required: Mapping[str, type], num_clients: int) -> str | None:
    missing = [key for key in required if key not in metrics]
    if missing:
        return f"missing metrics {missing}"
    not_finite = sorted(key for key, value in metrics.items() if not _number(value))
    if not_finite:
        return f"metrics {not_finite[:5]} must be finite numbers"
    problem = check_client_id(metrics[CLIENT_ID], num_clients)
    if problem:
        return problem
    for key, kind in required.items():
        if kind is int and key != CLIENT_ID and (problem := _count(key, metrics[key])):
            return problem
    return None


def check_train_metrics(metrics: Mapping, num_clients: int, weight_key: str = NUM_EXAMPLES) -> str | None:
    """The reason a training reply's metrics are refused, or None."""
    required = dict(TRAIN_KEYS)
    required.setdefault(weight_key, float)
    if problem := _common(metrics, required, num_clients):
        return problem
    if metrics[NUM_EXAMPLES] == 0:
        return f"reported {NUM_EXAMPLES} = 0 (nothing trained)"
    if not metrics[weight_key] >= 0:
        return f"'{weight_key}' must be >= 0"
    if abs(metrics[wire.REWARD_MEAN]) > MAX_ABS_REWARD:
        return f"'{wire.REWARD_MEAN}' must be within ±{MAX_ABS_REWARD:g}"
    for key in NON_NEGATIVE:
        if not 0 <= metrics[key] <= (MAX_SECONDS if key == wire.TRAIN_TIME else MAX_ABS_REWARD):
            return f"'{key}' must be >= 0 and bounded"
    for key in (wire.REWARD_MEAN_VAR, wire.GAIN_IN_ROUND_VAR):
        if key in metrics and not 0 <= metrics[key] <= MAX_ABS_REWARD**2:
            return f"'{key}' must be >= 0 and bounded"
    if wire.LORA_RANK in metrics and (problem := _count(wire.LORA_RANK, metrics[wire.LORA_RANK])):
        return problem  # its range against the server's rank, and the arrays' shapes: hetlora.rank_problem
    if wire.GAIN_IN_ROUND in metrics and abs(metrics[wire.GAIN_IN_ROUND]) > 2 * MAX_ABS_REWARD:
        return f"'{wire.GAIN_IN_ROUND}' must be within ±{2 * MAX_ABS_REWARD:g}"
    return _fraction(wire.ACCURACY, metrics[wire.ACCURACY])


def check_evaluate_metrics(metrics: Mapping, num_clients: int) -> str | None:
    """The reason an evaluation reply's metrics are refused, or None.

    With num-examples > 0: `acc_heldout` in [0, 1], and per family `acc/<f>` in
    [0, 1] with a count `n/<f>`; the counts sum to num-examples.
    """
    if problem := _common(metrics, EVALUATE_KEYS, num_clients):
        return problem
    n = metrics[NUM_EXAMPLES]
    if n > 0 and HELDOUT not in metrics:
        return f"missing metric '{HELDOUT}' (num-examples = {n})"
    if HELDOUT in metrics and (problem := _fraction(HELDOUT, metrics[HELDOUT])):
        return problem
    if wire.ACC_GLOBAL_SET in metrics and (problem := _fraction(wire.ACC_GLOBAL_SET, metrics[wire.ACC_GLOBAL_SET])):
        return problem
    families = {key[len(wire.FAMILY_ACC):] for key in metrics if key.startswith(wire.FAMILY_ACC)}
    counted = {key[len(wire.FAMILY_N):] for key in metrics if key.startswith(wire.FAMILY_N)}
    if families != counted:
        return f"each 'acc/<family>' needs its 'n/<family>' and back (unmatched: {sorted(families ^ counted)[:5]})"
    for family in sorted(families):
        acc, count = f"{wire.FAMILY_ACC}{family}", f"{wire.FAMILY_N}{family}"
        if problem := _fraction(acc, metrics[acc]) or _count(count, metrics[count]):
            return problem
    if families and sum(metrics[f"{wire.FAMILY_N}{f}"] for f in families) != n:
        return f"the 'n/<family>' counts do not add up to {NUM_EXAMPLES} = {n}"
    return None


def bind_client(node_id: int, client_id: int, bindings: dict[int, int]) -> str | None:
    """Bind `client_id` to `node_id` on first sight (in place); the reason a later mismatch is refused.

    `bindings` maps node id -> client id and lives as long as the run (it is checkpointed).
    """
    bound = bindings.get(node_id)
    if bound is not None and bound != client_id:
        return f"node reported client-id {client_id}, but it is client {bound}"
    owners = [node for node, cid in bindings.items() if cid == client_id and node != node_id]
    if owners:
        return f"client-id {client_id} belongs to node {owners[0]}"
    bindings[node_id] = client_id
    return None


def duplicated_ids(claims: list[tuple[int, int]]) -> set[int]:
    """Client ids that more than one node claims in one round ((node, client-id) pairs)."""
    counts = Counter(cid for _, cid in set(claims))
    return {cid for cid, count in counts.items() if count > 1}


def canonical_content(content: RecordDict, keep: tuple[str, ...] | None = None) -> RecordDict:
    """The same records under the names the server reads: `arrays` (if any) and `metrics`.

    With `keep`, the MetricRecord holds only those keys: Flower's strategies
    refuse a round whose MetricRecords differ in keys, so a client's extra key
    must not reach them.
    """
    records = {}
    if content.array_records:
        records[wire.ARRAYS] = next(iter(content.array_records.values()))
    metrics = next(iter(content.metric_records.values()))
    records[wire.METRICS] = metrics if keep is None else MetricRecord({key: metrics[key] for key in keep if key in metrics})
    return RecordDict(records)


class Refusal(NamedTuple):
    """A reply the server will not read: its node, the client that node is bound to (if any), and why."""

    node_id: int
    client_id: int | None
    reason: str


_FLOWER_REASON = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>", re.DOTALL)


def error_reason(reason: str) -> str:
    """A ClientApp exception as Flower reports it ("<class 'pkg.Error'>:<'text'>") made readable: "Error: text"."""
    match = _FLOWER_REASON.fullmatch(reason.strip())
    return f"{match.group(1)}: {match.group(2)}" if match else reason


def screen_round(
    replies: list[Message], *, train: bool, num_clients: int, bindings: dict[int, int], weight_key: str = NUM_EXAMPLES
) -> tuple[list[Message], list[Refusal]]:
    """Split one round's replies into accepted ones (records renamed, see `canonical_content`) and refusals.

    Error replies, broken records or metrics, duplicate ids and ids that are
    not the node's own are refused. `bindings` (node id -> client id) gains
    the first sight of each node.
    """
    refused: list[Refusal] = []
    passed: list[tuple[Message, int]] = []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            refused.append(Refusal(node, bindings.get(node), f"client error: {error_reason(reply.error.reason)}"[:400]))
            continue
        problem = check_records(reply.content, train=train)
        if problem is None:
            metrics = next(iter(reply.content.metric_records.values()))
            if train:
                problem = check_train_metrics(metrics, num_clients, weight_key)
            else:
                problem = check_evaluate_metrics(metrics, num_clients)
        if problem is not None:
            refused.append(Refusal(node, bindings.get(node), problem))
            continue
        passed.append((reply, metrics[CLIENT_ID]))
    # An id nobody holds yet, claimed by two nodes at once: neither gets it (first come would let a fast liar win).
    bound = set(bindings.values())
    duplicates = duplicated_ids([(r.metadata.src_node_id, cid) for r, cid in passed if cid not in bound])
    optional = [key for key in OPTIONAL_TRAIN_KEYS if passed and all(key in next(iter(r.content.metric_records.values())) for r, _ in passed)]
    keep = tuple(dict.fromkeys([*TRAIN_KEYS, weight_key, *optional])) if train else None
    accepted = []
    for reply, client_id in passed:
        node = reply.metadata.src_node_id
        if client_id in duplicates:
            problem = f"client-id {client_id} was reported by several nodes in this round"
        else:
            problem = bind_client(node, client_id, bindings)
        if problem is not None:
            refused.append(Refusal(node, bindings.get(node), problem))
            continue
        reply.content = canonical_content(reply.content, keep)
        accepted.append(reply)
    return accepted, refused
