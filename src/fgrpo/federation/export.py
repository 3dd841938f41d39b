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
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fgrpo.errors import FederationError


def save_weights(directory: str | Path, arrays: Mapping[str, np.ndarray], layout: dict) -> Path:
    """Write `arrays` into `directory` with the layout a client reported; returns the weights file."""
    from safetensors.numpy import save_file

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


def layout_from_text(text: str) -> dict:
    layout = json.loads(text)
    if not isinstance(layout, dict) or not {"files", "weights_file", "names"} <= set(layout):
        raise FederationError("a client's checkpoint layout must have 'files', 'weights_file' and 'names'")
    return layout
