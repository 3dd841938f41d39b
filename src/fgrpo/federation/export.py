"""Write the final weights from arrays, as `save_pretrained` would, in a process that holds no model.

The server never loads the LLM. A client describes, once, how its
`save_pretrained` lays out the trainable weights (`fgrpo.core.model.checkpoint_layout`:
the JSON files, the weights file's name, the checkpoint key of every array);
the server keeps that description and writes the global arrays with the
`safetensors` numpy API. With LoRA the result is a peft adapter folder
(`adapter_config.json` + `adapter_model.safetensors`) that
`PeftModel.from_pretrained` loads.
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
        (directory / name).write_text(text)
    path = directory / layout["weights_file"]
    # metadata {"format": "pt"}: what transformers and peft write and check for.
    save_file({names[k]: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path), metadata={"format": "pt"})
    return path


def layout_to_text(layout: dict) -> str:
    return json.dumps(layout, sort_keys=True)


def layout_from_text(text: str) -> dict:
    layout = json.loads(text)
    if not isinstance(layout, dict) or not {"files", "weights_file", "names"} <= set(layout):
        raise FederationError("a client's checkpoint layout must have 'files', 'weights_file' and 'names'")
    return layout
