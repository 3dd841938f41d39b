"""Write the final weights from arrays, as `save_pretrained` would, in a process that holds no model.

The server never loads the LLM. A client describes, once, how its
`save_pretrained` lays out the trainable weights (`fgrpo.core.model.checkpoint_layout`:
the JSON files, the weights file's name, the checkpoint key of every array);
the server keeps that description and writes the global arrays with the
`safetensors` numpy API. With LoRA the result is a peft adapter folder
(`adapter_config.json` + `adapter_model.safetensors`) that
`PeftModel.from_pretrained` loads.

peft keeps `target_modules` as a Python set and writes it in the set's order,
which string hashing changes from one process to the next; the server writes
such lists sorted, so two identical runs give the same bytes in every file of
the adapter folder, not only in the weights.

That description comes from a peer, so it chooses no path: the file names
must be one of the two layouts `save_pretrained` writes (`FILE_NAMES`), and
every field is type-checked (`layout_problem`) before the server uses it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fgrpo.errors import FederationError

# The only names the server writes: weights file -> the JSON files beside it (peft adapter, full fine-tuning).
FILE_NAMES: dict[str, frozenset[str]] = {
    "adapter_model.safetensors": frozenset({"adapter_config.json"}),
    "model.safetensors": frozenset({"config.json"}),
}
LAYOUT_KEYS = ("files", "names", "weights_file")
# A real layout is a few kB (an adapter config, one key per trainable array); far more is not a layout.
MAX_LAYOUT_CHARS = 10_000_000


def _string_map(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def layout_problem(layout) -> str | None:
    """Why `layout` cannot be used to write weights, or None: exactly `LAYOUT_KEYS`, allowed names, JSON files."""
    if not isinstance(layout, dict) or set(layout) != set(LAYOUT_KEYS):
        got = sorted(map(str, layout))[:5] if isinstance(layout, dict) else type(layout).__name__
        return f"the checkpoint layout must be a JSON object with exactly the keys {list(LAYOUT_KEYS)} (got {got})"
    weights_file, files, names = layout["weights_file"], layout["files"], layout["names"]
    if not isinstance(weights_file, str) or weights_file not in FILE_NAMES:
        return f"the checkpoint layout's 'weights_file' must be one of {sorted(FILE_NAMES)} (a name, never a path)"
    if not _string_map(files):
        return "the checkpoint layout's 'files' must map file names to their text"
    if not set(files) <= FILE_NAMES[weights_file]:
        unexpected = sorted(set(files) - FILE_NAMES[weights_file])
        return (
            f"the checkpoint layout names files the server does not write: {[n[:60] for n in unexpected[:3]]} "
            f"(with '{weights_file}' only {sorted(FILE_NAMES[weights_file])})"
        )
    for name, text in files.items():
        try:
            if not isinstance(json.loads(text), dict):
                return f"the checkpoint layout's '{name}' must hold a JSON object"
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
            return f"the checkpoint layout's '{name}' is not JSON"
    if not _string_map(names) or not names:
        return "the checkpoint layout's 'names' must map every array name to its checkpoint key"
    if len(set(names.values())) != len(names) or "" in names.values():
        return "the checkpoint layout's 'names' must give every array its own non-empty checkpoint key"
    return None


def save_weights(directory: str | Path, arrays: Mapping[str, np.ndarray], layout: dict) -> Path:
    """Write `arrays` into `directory` with the layout a client reported; returns the weights file."""
    from safetensors.numpy import save_file

    problem = layout_problem(layout)  # again here: whoever calls this, no name from a peer becomes a path
    if problem is not None:
        raise FederationError(problem)
    names = layout["names"]
    if set(names) != set(arrays):
        missing, extra = sorted(set(names) - set(arrays)), sorted(set(arrays) - set(names))
        raise FederationError(f"final arrays do not match the clients' checkpoint layout: missing {missing[:3]}, extra {extra[:3]}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in layout["files"].items():
        (directory / name).write_text(canonical_file(name, text))
    path = directory / layout["weights_file"]
    # metadata {"format": "pt"}: what transformers and peft write and check for.
    save_file({names[k]: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path), metadata={"format": "pt"})
    return path


# Keys of adapter_config.json that peft holds as sets: their order carries no meaning.
UNORDERED_KEYS = ("target_modules", "exclude_modules")


def canonical_file(name: str, text: str) -> str:
    """`text` with adapter_config.json's set-valued lists sorted, formatted as peft formats it; other files as they are."""
    if name != "adapter_config.json":
        return text
    try:
        config = json.loads(text)
    except ValueError:
        return text
    if not isinstance(config, dict):
        return text
    changed = False
    for key in UNORDERED_KEYS:
        value = config.get(key)
        if isinstance(value, list) and all(isinstance(item, str) for item in value) and value != sorted(value):
            config[key] = sorted(value)
            changed = True
    return json.dumps(config, indent=2) if changed else text  # peft: json.dumps(sorted keys, indent=2)


def layout_to_text(layout: dict) -> str:
    return json.dumps(layout, sort_keys=True)


def layout_from_text(text) -> dict:
    """The layout a client sent, checked (`layout_problem`); FederationError says what is wrong with it."""
    if not isinstance(text, str):
        raise FederationError(f"the checkpoint layout must be JSON text, got {type(text).__name__}")
    if len(text) > MAX_LAYOUT_CHARS:
        raise FederationError(f"the checkpoint layout has {len(text)} characters (at most {MAX_LAYOUT_CHARS})")
    try:
        layout = json.loads(text)
    except (ValueError, RecursionError) as error:  # bad JSON, a number too long to convert, nesting too deep
        raise FederationError(f"the checkpoint layout is not JSON ({type(error).__name__}: {str(error)[:80]})") from None
    problem = layout_problem(layout)
    if problem is not None:
        raise FederationError(problem)
    return layout
