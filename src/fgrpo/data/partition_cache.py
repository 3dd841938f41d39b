"""A node's disk cache of partition indices, so a fresh process does not partition the pool again.

On Flower's deployment runtime every message starts a new ClientApp process.
Partitioning is cheap, but the libraries it runs on are not: importing
`flwr_datasets` and `datasets` costs about 3 s per process (measured with
`benchmarks/clientapp_startup.py`), paid again for each round's train and
evaluate messages. The indices are a pure function of the labels, the scheme,
its options, the seed and the partition code, so the first process of a node
writes them to `FGRPO_CACHE/partitions/<key>.json` and the next ones read them.

The file is on the node's own disk and is only ever read as JSON. A file that
does not parse, or holds indices that are not a valid partition of this pool
(out of range, repeated, wrong number of clients), is ignored and rewritten:
a damaged or planted cache can cost time, never a wrong split or code.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from fgrpo.cache import cache_root
from fgrpo.data import partition as partition_module

# Bump when the file format changes.
FORMAT_VERSION = 1


@functools.cache
def code_fingerprint() -> dict[str, str]:
    """The partition code's SHA-256 and its libraries' versions: read once per process, not once per split."""
    code = Path(partition_module.__file__).read_bytes()
    return {
        "code": hashlib.sha256(code).hexdigest(),
        "flwr-datasets": metadata.version("flwr-datasets"),
        "numpy": metadata.version("numpy"),
    }


def partition_key(labels: Sequence[str], scheme: str, num_clients: int, seed: int, options: dict[str, Any]) -> str:
    """SHA-256 of everything the indices depend on, the partition code and its libraries' versions included."""
    spec = {
        "format": FORMAT_VERSION,
        **code_fingerprint(),
        "labels": list(labels),
        "scheme": scheme,
        "num_clients": num_clients,
        "seed": seed,
        "options": {name: options[name] for name in sorted(options)},
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def valid_partition(parts: Any, pool_size: int, num_clients: int) -> bool:
    """`parts` is num_clients lists of distinct ints in 0..pool_size-1 (no index in two clients)."""
    if not isinstance(parts, list) or len(parts) != num_clients:
        return False
    seen: set[int] = set()
    for part in parts:
        if not isinstance(part, list):
            return False
        for index in part:
            if type(index) is not int or not 0 <= index < pool_size or index in seen:
                return False
            seen.add(index)
    return True


def read_cached(path: Path, pool_size: int, num_clients: int) -> list[list[int]] | None:
    """The cached indices, or None when the file is missing, unreadable or not a partition of this pool."""
    try:
        parts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return parts if valid_partition(parts, pool_size, num_clients) else None


def write_cached(path: Path, parts: list[list[int]]) -> None:
    """Write atomically (a reader never sees half a file); a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=".partition-", dir=path.parent)
    except OSError:
        return
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(parts, file)
        os.replace(staging, path)
    except OSError:
        Path(staging).unlink(missing_ok=True)  # a full disk must not leave half-written staging files behind


def cached_partition(
    labels: Sequence[str], scheme: str, num_clients: int, seed: int, **options: Any
) -> list[list[int]]:
    """`partition.partition(...)`, read from this node's cache when an earlier process computed it."""
    path = cache_root() / "partitions" / f"{partition_key(labels, scheme, num_clients, seed, options)}.json"
    parts = read_cached(path, len(labels), num_clients)
    if parts is None:
        parts = partition_module.partition(labels, scheme, num_clients, seed, **options)
        write_cached(path, [[int(index) for index in part] for part in parts])
    return parts
