"""FedSA-LoRA (Guo et al., ICLR 2025): share LoRA's A matrices, keep each owner's B matrices at home.

On non-IID owners, the A matrices learn what the owners have in common and the
B matrices what is each owner's own. A FedSA client

- loads the global A with its own B (kept in its node's `Context.state`, like
  `keep_optimizer_state`'s moments: it never leaves the node; peft's zero B
  before its first round),
- trains A and B as usual, keeps the new B, and uploads only A (every array
  but the `lora_B` / `lora_embedding_B` ones).

The server, which holds no model, fills each A-only upload with θ_t's B
(`with_global_b`) so any weighted-average strategy aggregates A with FedAvg
weights and leaves B at θ_t's. θ_t's B therefore stays θ₀'s, peft's zeros, and
the adapter the server saves (global A, zero B) is the base model's function:
a FedSA run's models are per owner (global A + that owner's B), evaluated on
each owner's node, never gathered. Pure numpy, on the server's torch-free path.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fgrpo.federation.hetlora import rank_axis


def is_personal(name: str) -> bool:
    """LoRA's B matrices are the owner's own; everything else (A, any other trainable array) is shared."""
    return rank_axis(name) == 1


def shared_part(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a FedSA client uploads: every array but the B matrices."""
    return {name: value for name, value in arrays.items() if not is_personal(name)}


def personal_part(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a FedSA client keeps: its B matrices."""
    return {name: value for name, value in arrays.items() if is_personal(name)}


def personalize(global_arrays: Mapping[str, np.ndarray], personal: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The owner's model: the global arrays with its own B where it has one (none yet: θ_t's, peft's zeros)."""
    merged = dict(global_arrays)
    for name, value in (personal or {}).items():
        if name in merged and np.shape(merged[name]) == np.shape(value):
            merged[name] = value
    return merged


def upload_problem(arrays: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray]) -> str | None:
    """Why an upload is not FedSA's layout (exactly θ_t's shared arrays in θ_t's shapes), or None."""
    expected = shared_part(current)
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        sent_b = [name for name in extra if is_personal(name)]
        if sent_b:
            return f"fedsa uploads LoRA A matrices only, but the reply carries B matrices ({', '.join(sent_b[:3])})"
        return f"fedsa upload: wrong arrays: missing {missing[:3]}, unexpected {extra[:3]}"
    for name, value in expected.items():
        if np.shape(arrays[name]) != np.shape(value):
            return f"fedsa upload: wrong shape for '{name}': {np.shape(arrays[name])}, expected {np.shape(value)}"
    return None


def with_global_b(arrays: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An A-only upload completed with θ_t's B (a zero update), so a weighted average leaves B at θ_t's."""
    return {name: (np.asarray(value) if is_personal(name) else arrays[name]) for name, value in current.items()}
