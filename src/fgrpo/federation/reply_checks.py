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
  and never reported by two nodes in one round;
- size: a client's `num-examples` never exceeds the first one the run
  accepted from it (`bind_size`; its data does not grow during a run), and
  under DP its `unit-weight` is 1 (how much a size may count for at all:
  `screening.capped_sizes`);
- arrays: they decode, and each is real floating point (`FLOAT_DTYPES`): a
  bool, int, string or bytes array is not a weight, even when numpy can add it;
- the init reply (θ₀ and the checkpoint layout, `read_init_reply`): its layout
  is checked field by field (`export.layout_problem`, so it chooses no path)
  and θ₀ is screened like an update: floating point, finite, bounded, and
  exactly the arrays the layout names.

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

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fgrpo.errors import FederationError
from fgrpo.federation import wire
from fgrpo.federation.export import layout_from_text

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
# Task families in one evaluation reply, and the length of a family name: far beyond any real task suite.
MAX_FAMILIES = 1000
MAX_FAMILY_NAME = 200
# The dtypes weights travel in (what numpy, safetensors and the codecs' decoders share).
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
# θ₀'s entries: a real model's weights are a few units at most; 1e30 would only set every client up to diverge.
MAX_ABS_INITIAL = 1e4


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
    if weight_key == wire.UNIT_WEIGHT and metrics[weight_key] != 1:
        return f"'{wire.UNIT_WEIGHT}' must be 1 (every client weighs the same under DP)"
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
    if len(families) > MAX_FAMILIES or any(len(family) > MAX_FAMILY_NAME for family in families):
        return f"at most {MAX_FAMILIES} 'acc/<family>' metrics, each family name at most {MAX_FAMILY_NAME} characters"
    if families != counted:
        return f"each 'acc/<family>' needs its 'n/<family>' and back (unmatched: {sorted(families ^ counted)[:5]})"
    for family in sorted(families):
        acc, count = f"{wire.FAMILY_ACC}{family}", f"{wire.FAMILY_N}{family}"
        if problem := _fraction(acc, metrics[acc]) or _count(count, metrics[count]):
            return problem
    if families and sum(metrics[f"{wire.FAMILY_N}{f}"] for f in families) != n:
        return f"the 'n/<family>' counts do not add up to {NUM_EXAMPLES} = {n}"
    return None


def decode_arrays(record: ArrayRecord) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """(the record's arrays, None), or (None, why they do not decode): a peer's bytes never raise here."""
    arrays = {}
    for name, array in record.items():
        try:
            arrays[name] = array.numpy()
        except Exception as error:  # numpy's loader raises ValueError, EOFError, OSError... on foreign bytes
            return None, f"array '{name[:80]}' does not decode as a numpy array ({type(error).__name__})"
    return arrays, None


def dtype_problem(arrays: Mapping[str, np.ndarray]) -> str | None:
    """Why the arrays are not all real floating point (`FLOAT_DTYPES`, native byte order), or None."""
    for name, value in arrays.items():
        dtype = getattr(value, "dtype", None)
        if not isinstance(value, np.ndarray) or dtype not in FLOAT_DTYPES:
            expected = "/".join(str(d) for d in FLOAT_DTYPES)
            return f"array '{name[:80]}' is {dtype if dtype is not None else type(value).__name__}, expected floating point ({expected})"
    return None


def initial_arrays_problem(
    arrays: Mapping[str, np.ndarray], names: Mapping[str, str], reference: Mapping[str, np.ndarray] | None = None
) -> str | None:
    """Why θ₀ cannot start the run, or None: the layout's arrays, floating point, finite, |θ| <= MAX_ABS_INITIAL.

    With `reference` (a resumed run's checkpointed θ_t), θ₀ must also have its names and shapes: the final
    adapter is written with this layout.
    """
    if set(arrays) != set(names):
        missing, extra = sorted(set(names) - set(arrays)), sorted(set(arrays) - set(names))
        return f"θ₀ does not match its checkpoint layout: missing {missing[:3]}, unexpected {extra[:3]}"
    if problem := dtype_problem(arrays):
        return f"θ₀: {problem}"
    if reference is not None:
        if set(arrays) != set(reference):
            missing, extra = sorted(set(reference) - set(arrays)), sorted(set(arrays) - set(reference))
            return f"θ₀ does not match the checkpointed run's arrays: missing {missing[:3]}, unexpected {extra[:3]}"
        for name, value in arrays.items():
            if value.shape != np.shape(reference[name]):
                return f"θ₀: '{name[:80]}' has shape {value.shape}, the checkpointed run's has {np.shape(reference[name])}"
    for name, value in arrays.items():
        if not np.all(np.isfinite(value)):
            return f"θ₀: non-finite values (NaN/Inf) in '{name[:80]}'"
        if value.size and float(np.max(np.abs(value))) > MAX_ABS_INITIAL:
            return f"θ₀: '{name[:80]}' has values beyond ±{MAX_ABS_INITIAL:g}, which no model's starting weights hold"
    return None


def read_init_reply(
    content: RecordDict, reference: Mapping[str, np.ndarray] | None = None
) -> tuple[dict[str, np.ndarray], dict]:
    """(θ₀, checkpoint layout) from an init reply, each checked; FederationError says why the reply is refused.

    The reply holds one ArrayRecord (θ₀) and one ConfigRecord whose
    `checkpoint-layout` is the layout's JSON text, and nothing else.
    `reference`: see `initial_arrays_problem`.
    """
    arrays, metrics, configs = len(content.array_records), len(content.metric_records), len(content.config_records)
    if (arrays, metrics, configs) != (1, 0, 1):
        raise FederationError(
            f"the init reply must carry one ArrayRecord and one ConfigRecord and nothing else "
            f"(got {arrays} ArrayRecord, {metrics} MetricRecord, {configs} ConfigRecord)"
        )
    config = next(iter(content.config_records.values()))
    if wire.CHECKPOINT_LAYOUT not in config:
        raise FederationError(f"the init reply has no '{wire.CHECKPOINT_LAYOUT}'")
    layout = layout_from_text(config[wire.CHECKPOINT_LAYOUT])
    theta, problem = decode_arrays(next(iter(content.array_records.values())))
    problem = problem or initial_arrays_problem(theta, layout["names"], reference)
    if problem is not None:
        raise FederationError(problem)
    return theta, layout


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


def bind_size(client_id: int, size: int, sizes: dict[int, int]) -> str | None:
    """Bind a client's first accepted `num-examples` (in place); the reason a later, larger claim is refused.

    `sizes` maps client id -> that first size and lives as long as the run (it
    is checkpointed). A client's data does not grow during a run, so a larger
    claim is not its data; a smaller one (a client that drops examples) is kept.
    """
    first = sizes.setdefault(client_id, size)
    if size > first:
        return f"'{NUM_EXAMPLES}' = {size} is more than the {first} client {client_id} declared first"
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
    replies: list[Message],
    *,
    train: bool,
    num_clients: int,
    bindings: dict[int, int],
    weight_key: str = NUM_EXAMPLES,
    sizes: dict[int, int] | None = None,
) -> tuple[list[Message], list[Refusal]]:
    """Split one round's replies into accepted ones (records renamed, see `canonical_content`) and refusals.

    Error replies, broken records or metrics, duplicate ids and ids that are
    not the node's own are refused. `bindings` (node id -> client id) gains
    the first sight of each node; `sizes` (client id -> first num-examples,
    kept apart for training and evaluation) the first size of each client, and
    a later claim above it is refused (`bind_size`).
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
        if problem is None and sizes is not None:
            problem = bind_size(client_id, int(next(iter(reply.content.metric_records.values()))[NUM_EXAMPLES]), sizes)
        if problem is not None:
            refused.append(Refusal(node, bindings.get(node), problem))
            continue
        reply.content = canonical_content(reply.content, keep)
        accepted.append(reply)
    return accepted, refused
