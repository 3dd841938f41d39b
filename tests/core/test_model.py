import numpy as np
import pytest
import torch

from fgrpo.errors import ModelError
from fgrpo.federation.wire import arrays_nbytes
from fgrpo.core.model import (
    add_lora,
    build_tiny_model,
    build_tiny_tokenizer,
    get_trainable_arrays,
    load_model_and_tokenizer,
    model_nbytes,
    set_trainable_arrays,
)


def test_tiny_tokenizer_is_character_level_and_round_trips(tmp_path):
    tokenizer = build_tiny_tokenizer()
    text = "sort 3142=1234\nA b"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert again.eos_token_id == tokenizer.eos_token_id


def test_tiny_model_save_and_load_from_local_folder(tmp_path):
    model, tokenizer = build_tiny_model(seed=3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model_and_tokenizer(str(tmp_path), dtype="float32", device="cpu")
    ids = torch.tensor([tokenizer("12+3=")["input_ids"]])
    assert torch.allclose(model.eval()(ids).logits, loaded(ids).logits, atol=1e-6)
    assert loaded_tokenizer.padding_side == "left"


def test_load_errors_name_the_source(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model_and_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model_and_tokenizer(str(tmp_path / "empty"))
    model, _ = build_tiny_model()
    model.save_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(ModelError, match="tokenizer"):
        load_model_and_tokenizer(str(tmp_path / "no_tokenizer"))


def test_lora_arrays_are_the_adapter_only_and_round_trip():
    model, _ = build_tiny_model()
    full_bytes = model_nbytes(model)
    peft_model = add_lora(model, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    arrays = get_trainable_arrays(peft_model)
    assert arrays and all("lora_" in name for name in arrays)
    assert arrays_nbytes(arrays) < 0.1 * full_bytes
    changed = {name: value + 1.0 for name, value in arrays.items()}
    set_trainable_arrays(peft_model, changed)
    again = get_trainable_arrays(peft_model)
    assert all(np.allclose(again[n], changed[n]) for n in arrays)


def test_set_arrays_rejects_wrong_names_and_shapes():
    model = add_lora(build_tiny_model()[0], 4, 8, 0.0, ["q_proj"])
    arrays = get_trainable_arrays(model)
    name = next(iter(arrays))
    with pytest.raises(ModelError, match="missing"):
        set_trainable_arrays(model, {k: v for k, v in arrays.items() if k != name})
    bad = dict(arrays)
    bad[name] = np.zeros((1, 1), dtype=np.float32)
    with pytest.raises(ModelError, match="shape"):
        set_trainable_arrays(model, bad)


def test_bad_lora_targets_are_a_clear_error():
    with pytest.raises(ModelError, match="target_modules.*q_proj"):
        add_lora(build_tiny_model()[0], 4, 8, 0.0, ["attn.c_attn"])


def test_merge_names_a_corrupt_adapter_config(tmp_path):
    from fgrpo.core.model import merge_adapter

    (tmp_path / "adapter_config.json").write_text('{"base_model_name_or_path": "tiny",\n')
    with pytest.raises(ModelError, match=r"adapter_config.json: not valid JSON \(.* at line 2, column 1\)"):
        merge_adapter(tmp_path, tmp_path / "out")
    (tmp_path / "adapter_config.json").write_text('["a list"]')
    with pytest.raises(ModelError, match="adapter_config.json: expected a JSON object, got list"):
        merge_adapter(tmp_path, tmp_path / "out", base="tiny")


def test_merge_refuses_an_unknown_dtype_before_loading(tmp_path):
    from fgrpo.core.model import merge_adapter

    (tmp_path / "adapter_config.json").write_text('{"base_model_name_or_path": "tiny"}')
    with pytest.raises(ModelError, match="dtype 'float8' is not supported; choose auto, float32, bfloat16, float16"):
        merge_adapter(tmp_path, tmp_path / "out", dtype="float8")
    assert not (tmp_path / "out").exists()
