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
    layout = {"files": {}, "weights_file": "w.safetensors", "names": {"a": "a"}}
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
