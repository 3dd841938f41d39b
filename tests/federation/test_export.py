"""The model-free server's adapter: written from arrays, byte-identical to peft's, loadable by peft."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fgrpo.core.model import add_lora, build_tiny_model, checkpoint_layout, get_trainable_arrays, set_trainable_arrays
from fgrpo.errors import FederationError
from fgrpo.federation.export import layout_from_text, layout_to_text, save_weights


def lora_model():
    model, _ = build_tiny_model(seed=1)
    return add_lora(model, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def test_adapter_written_from_arrays_loads_with_peft_and_matches_save_pretrained(tmp_path):
    from peft import PeftModel

    model = lora_model()
    rng = np.random.default_rng(0)
    arrays = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in get_trainable_arrays(model).items()}
    set_trainable_arrays(model, arrays)
    layout = layout_from_text(layout_to_text(checkpoint_layout(model)))  # as it travels in the init reply
    path = save_weights(tmp_path / "ours", arrays, layout)

    model.save_pretrained(tmp_path / "peft")
    assert path.read_bytes() == (tmp_path / "peft" / "adapter_model.safetensors").read_bytes()

    base, _ = build_tiny_model(seed=1)
    loaded = PeftModel.from_pretrained(base, tmp_path / "ours")
    params = dict(loaded.named_parameters())
    assert set(arrays) <= set(params)
    for name, value in arrays.items():
        torch.testing.assert_close(params[name].detach(), torch.from_numpy(value), rtol=0, atol=0)


def test_full_fine_tuning_layout_names_the_parameters_as_they_are():
    model, _ = build_tiny_model(seed=1)
    layout = checkpoint_layout(model)
    assert layout["weights_file"] == "model.safetensors" and "config.json" in layout["files"]
    assert all(key == name for name, key in layout["names"].items())


def test_arrays_that_do_not_match_the_layout_are_refused(tmp_path):
    layout = {"files": {}, "weights_file": "model.safetensors", "names": {"a": "a"}}
    with pytest.raises(FederationError, match="missing"):
        save_weights(tmp_path, {"b": np.zeros(2, np.float32)}, layout)
    with pytest.raises(FederationError, match="layout"):
        layout_from_text('{"files": {}}')


def test_adapter_config_lists_target_modules_in_one_order_whatever_order_peft_used(tmp_path):
    """peft writes target_modules in set order, which differs between processes; the written folder must not."""
    import json

    layout = checkpoint_layout(lora_model())
    peft_text = layout["files"]["adapter_config.json"]
    modules = sorted(json.loads(peft_text)["target_modules"])
    assert peft_text == json.dumps(json.loads(peft_text), indent=2)  # peft's own formatting, which we keep
    arrays = {name: np.zeros(1, np.float32) for name in layout["names"]}
    written = []
    for order in (modules, modules[::-1]):  # the two orders two processes can give
        config = json.loads(peft_text)
        config["target_modules"] = order
        files = {"adapter_config.json": json.dumps(config, indent=2)}
        save_weights(tmp_path / "-".join(order), arrays, {**layout, "files": files})
        written.append((tmp_path / "-".join(order) / "adapter_config.json").read_text())
    assert written[0] == written[1]
    assert json.loads(written[0])["target_modules"] == modules and len(modules) == 2

# ------------------------------------------------------------------ a layout comes from a peer: it chooses no path

LAYOUT = {"files": {"adapter_config.json": "{}"}, "weights_file": "adapter_model.safetensors", "names": {"a": "k.a"}}
ESCAPES = ["../../escape.safetensors", "ABSOLUTE", "sub/adapter_model.safetensors", "..", "",
           "adapter_model.safetensors/../x", "x\\..\\y", "adapter_model.safetensors\x00"]


@pytest.mark.parametrize("name", ESCAPES)
def test_a_weights_file_that_is_a_path_is_refused_and_nothing_is_written(tmp_path, name):
    name = str(tmp_path / "escape.safetensors") if name == "ABSOLUTE" else name  # inside tmp_path, whatever happens
    layout = {**LAYOUT, "weights_file": name}
    with pytest.raises(FederationError, match="'weights_file' must be one of"):
        layout_from_text(layout_to_text(layout))
    with pytest.raises(FederationError, match="'weights_file' must be one of"):  # save_weights checks again
        save_weights(tmp_path / "run" / "adapter", {"a": np.zeros(2, np.float32)}, layout)
    assert list(tmp_path.rglob("*")) == []


@pytest.mark.parametrize("name", ["../adapter_config.json", "ABSOLUTE", "a/adapter_config.json", "config.json", "README.md", ".."])
def test_a_json_file_the_server_does_not_write_is_refused(tmp_path, name):
    name = str(tmp_path / "escape.json") if name == "ABSOLUTE" else name
    layout = {**LAYOUT, "files": {name: "{}"}}
    with pytest.raises(FederationError, match="names files the server does not write"):
        layout_from_text(layout_to_text(layout))
    with pytest.raises(FederationError, match="names files the server does not write"):
        save_weights(tmp_path / "adapter", {"a": np.zeros(2, np.float32)}, layout)
    assert list(tmp_path.rglob("*")) == []


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{not json", "is not JSON"),
        ("[" * 100_000 + "]" * 100_000, "is not JSON"),  # deeper than the parser's stack
        ("[]", "must be a JSON object with exactly the keys"),
        ('{"files": {}, "weights_file": "model.safetensors"}', "exactly the keys"),
        ('{"files": [], "weights_file": "model.safetensors", "names": {"a": "a"}}', "'files' must map"),
        ('{"files": {"config.json": 3}, "weights_file": "model.safetensors", "names": {"a": "a"}}', "'files' must map"),
        ('{"files": {"config.json": "[1]"}, "weights_file": "model.safetensors", "names": {"a": "a"}}', "JSON object"),
        ('{"files": {"config.json": "{x"}, "weights_file": "model.safetensors", "names": {"a": "a"}}', "is not JSON"),
        ('{"files": {}, "weights_file": 7, "names": {"a": "a"}}', "'weights_file' must be one of"),
        ('{"files": {}, "weights_file": "model.safetensors", "names": ["a"]}', "'names' must map"),
        ('{"files": {}, "weights_file": "model.safetensors", "names": {}}', "'names' must map"),
        ('{"files": {}, "weights_file": "model.safetensors", "names": {"a": "k", "b": "k"}}', "its own non-empty"),
        ('{"files": {}, "weights_file": "model.safetensors", "names": {"a": "a"}, "x": 1}', "exactly the keys"),
    ],
)
def test_a_malformed_layout_is_one_clear_error(text, reason):
    with pytest.raises(FederationError, match=reason):
        layout_from_text(text)


def test_a_layout_that_is_not_text_is_refused():
    with pytest.raises(FederationError, match="must be JSON text, got int"):
        layout_from_text(5)
