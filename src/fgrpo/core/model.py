"""Load causal LMs (hub id, local folder, or the built-in tiny model), add LoRA, and
move the trainable weights in and out as named numpy arrays.

The named arrays are what federation exchanges: with LoRA they are the adapter
only, so a client's state costs adapter bytes, not model bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from fgrpo.errors import ModelError

# Printable ASCII plus newline: enough for every built-in task and for JSONL
# word problems; anything else maps to <unk>.
TINY_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
TINY_CHARACTERS = tuple(chr(i) for i in range(32, 127)) + ("\n",)


def pick_device(preferred: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if preferred == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preferred.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device '{preferred}' was asked for but CUDA is not available; use 'auto' or 'cpu'")
    return torch.device(preferred)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' = bf16 on a CUDA device that supports it, fp32 otherwise."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ModelError(f"dtype '{name}' is not supported; choose auto, {', '.join(dtypes)}")
    return dtypes[name]


def build_tiny_tokenizer():
    """A character-level fast tokenizer (one token per character), made offline.

    Built from a BPE model with no merges, so it saves as a standard
    `tokenizer.json` and reloads with `AutoTokenizer.from_pretrained`.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(TINY_SPECIAL_TOKENS + TINY_CHARACTERS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(TINY_SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.padding_side = "left"
    return tokenizer


def build_tiny_model(seed: int = 0, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4):
    """A randomly initialised Llama-style model sized for a laptop CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def load_model_and_tokenizer(
    source: str, dtype: str = "auto", device: str = "auto", quantization: str = "none"
):
    """Load a causal LM and its tokenizer from a local folder, a hub id, a packaged model or a .gguf file.

    A local folder is preferred when it exists; a hub id only works with network
    access (or a filled HF cache). Errors name the source and what is missing.
    `quantization` ('4bit' / '8bit') loads the frozen base through bitsandbytes.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fgrpo.core.packaged_models import resolve_model_source

    source = resolve_model_source(source)  # a packaged name or a .gguf file -> its cached folder
    path = Path(source).expanduser()
    looks_local = path.exists() or source.startswith((".", "/", "~"))
    if looks_local:
        if not path.is_dir():
            raise ModelError(f"model folder '{source}' does not exist")
        if not (path / "config.json").exists():
            raise ModelError(f"model folder '{source}' has no config.json: is it a Hugging Face save_pretrained folder?")
    target_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, target_device)
    load_options: dict = {"dtype": torch_dtype}
    if quantization != "none":
        load_options["quantization_config"] = bitsandbytes_config(quantization, torch_dtype, target_device)
        load_options["device_map"] = {"": target_device.index or 0}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if looks_local else source)
    except Exception as exc:  # transformers raises many types; the user needs the source named
        raise ModelError(f"cannot load a tokenizer from '{source}': {exc}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path) if looks_local else source, **load_options)
    except Exception as exc:
        raise ModelError(f"cannot load a causal LM from '{source}': {exc}") from exc
    if tokenizer.pad_token_id is None:
        # Many causal LMs ship without a pad token; padding is masked anyway.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation needs prompts aligned at the right edge
    if quantization != "none":
        return model, tokenizer  # bitsandbytes placed it already; .to() is not allowed on quantized models
    return model.to(target_device), tokenizer


def bitsandbytes_config(quantization: str, compute_dtype: torch.dtype, device: torch.device):
    """transformers' BitsAndBytesConfig for '4bit' (NF4, double quant) or '8bit'; clear errors when it cannot work."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            f"model.quantization = '{quantization}' needs bitsandbytes, which is not installed "
            "(pip install bitsandbytes), or set model.quantization = 'none'"
        )
    if device.type != "cuda":
        raise ModelError(f"model.quantization = '{quantization}' needs a CUDA device, got '{device}'")
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ModelError(f"model.quantization must be 'none', '4bit' or '8bit', got {quantization!r}")


# LoRA targets per architecture family (model_type in config.json). Attention and
# MLP projections: what QLoRA found matches full fine-tuning best.
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_PRESETS: dict[str, list[str]] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # fused qkv, output and MLP projections (Conv1D)
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}
# Architectures that share another's module names (SmolLM2 is a Llama).
_PRESET_ALIASES = {"smollm": "llama", "smollm2": "llama", "qwen": "qwen2", "gpt": "gpt2"}


def lora_target_modules(target_modules: list[str] | str, model=None) -> list[str] | str:
    """Resolve 'auto' or a preset name to module names; lists and 'all-linear' pass through.

    'auto' reads the model's `config.model_type`; an architecture without a
    preset falls back to 'all-linear' (peft adapts every linear layer but the head).
    """
    if not isinstance(target_modules, str) or target_modules == "all-linear":
        return target_modules
    name = target_modules.lower()
    if name == "auto":
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return LORA_PRESETS.get(model_type, "all-linear")
    name = _PRESET_ALIASES.get(name, name)
    if name in LORA_PRESETS:
        return LORA_PRESETS[name]
    return target_modules  # any other string is a peft regex over module names


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations during backward (non-reentrant, so frozen inputs need no grad hook)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelError(f"{type(model).__name__} does not support gradient checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # generate() still passes use_cache=True explicitly


def add_lora(model, rank: int, alpha: float, dropout: float, target_modules: list[str] | str):
    """Wrap `model` with a peft LoRA adapter; only adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    target_modules = lora_target_modules(target_modules, model)
    # GPT-2's projections are Conv1D layers that store weights transposed.
    fan_in_fan_out = getattr(getattr(model, "config", None), "model_type", None) == "gpt2"
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        fan_in_fan_out=fan_in_fan_out,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name})
        raise ModelError(
            f"LoRA target_modules {target_modules!r} do not fit {type(model).__name__}: {exc}. "
            f"Module names in this model include: {', '.join(names[:30])}"
        ) from exc


def trainable_parameters(model) -> "OrderedDict[str, torch.nn.Parameter]":
    """The parameters federation exchanges, in a stable order."""
    return OrderedDict((name, p) for name, p in model.named_parameters() if p.requires_grad)


def get_trainable_arrays(model, copy: bool = True) -> "OrderedDict[str, np.ndarray]":
    """The trainable weights as float32 numpy arrays (adapter only with LoRA).

    `copy=False` returns views of float32 CPU parameters (no copy): only for a
    caller that serialises them before the model trains again.
    """
    arrays: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, param in trainable_parameters(model).items():
        value = param.detach().to("cpu", torch.float32).numpy()  # a view when already float32 on CPU
        arrays[name] = value.copy() if copy else value
    return arrays


def set_trainable_arrays(model, arrays: dict[str, np.ndarray]) -> None:
    """Write named arrays into the trainable weights; names and shapes must match exactly."""
    params = trainable_parameters(model)
    missing = [name for name in params if name not in arrays]
    unexpected = [name for name in arrays if name not in params]
    if missing or unexpected:
        raise ModelError(
            f"adapter arrays do not match the model: missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}"
        )
    with torch.no_grad():
        for name, param in params.items():
            value = np.asarray(arrays[name])
            if tuple(value.shape) != tuple(param.shape):
                raise ModelError(f"adapter array '{name}' has shape {value.shape}, the model expects {tuple(param.shape)}")
            param.copy_(torch.from_numpy(value).to(param.device, param.dtype))


def checkpoint_layout(model) -> dict:
    """How `model.save_pretrained` lays out the trainable weights, so a process without the model can save them.

    Returns {"files": {name: JSON text}, "weights_file": name, "names":
    {trainable parameter name: key in the weights file}}. A peft model gives
    its adapter_config.json (as peft writes it) and peft's checkpoint keys (the
    adapter name removed); full fine-tuning gives config.json and the
    parameter names as they are. The model-free server writes the final
    weights from arrays with it (`fgrpo.federation.export`).
    """
    import tempfile

    params = trainable_parameters(model)
    if not hasattr(model, "peft_config"):
        return {
            "files": {"config.json": model.config.to_json_string()},
            "weights_file": "model.safetensors",
            "names": {name: name for name in params},
        }
    from peft import get_peft_model_state_dict

    # peft's own state dict holds the same tensors under its checkpoint keys: match them by storage.
    by_storage = {tensor.data_ptr(): key for key, tensor in get_peft_model_state_dict(model).items()}
    missing = [name for name, p in params.items() if p.data_ptr() not in by_storage]
    if missing:
        raise ModelError(f"peft does not save the trainable weights {missing[:3]}; the server could not write the adapter")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # the adapter only: small; its config as peft writes it
        config_text = (Path(tmp) / "adapter_config.json").read_text()
    return {
        "files": {"adapter_config.json": config_text},
        "weights_file": "adapter_model.safetensors",
        "names": {name: by_storage[p.data_ptr()] for name, p in params.items()},
    }


def model_nbytes(model) -> int:
    """Bytes of every parameter of the full model (base + adapter)."""
    return int(sum(p.numel() * p.element_size() for p in model.parameters()))


def merge_adapter(
    adapter_dir: str | Path, out_dir: str | Path, base: str | None = None, dtype: str = "auto", *, overwrite: bool = False
) -> Path:
    """Fold a saved LoRA adapter into its base model and save a plain transformers checkpoint.

    The result loads with `AutoModelForCausalLM.from_pretrained(out_dir)` (and
    serves in vLLM / TGI) with no peft at inference. `base` defaults to the
    base model recorded in the adapter's adapter_config.json. `out_dir` must be
    new or empty; with `overwrite`, files of an earlier merge are replaced, and
    never a file fgrpo did not write there (`fgrpo.owned_files`).
    """
    import json

    from peft import PeftModel

    from fgrpo.owned_files import staged_folder

    pick_dtype(dtype, torch.device("cpu"))  # an unknown dtype is refused before any loading
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise ModelError(f"'{adapter_dir}' has no adapter_config.json: is it the adapter/ folder of a run?")
    try:
        adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelError(f"{config_path}: not UTF-8 text; expected the JSON file peft writes (save the adapter again)") from None
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"{config_path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            "expected the JSON file peft writes (save the adapter again)"
        ) from None
    if not isinstance(adapter_config, dict):
        raise ModelError(f"{config_path}: expected a JSON object, got {type(adapter_config).__name__}")
    if base is None:
        base = adapter_config.get("base_model_name_or_path")
        if not base:
            raise ModelError(f"{config_path} names no base model; pass the base model's folder or hub id")
    out_dir = Path(out_dir)
    with staged_folder(out_dir, overwrite=overwrite, what="merged model folder") as stage:
        model, tokenizer = load_model_and_tokenizer(base, dtype, "cpu")
        try:
            merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        except Exception as exc:
            raise ModelError(f"cannot apply the adapter in '{adapter_dir}' to '{base}': {exc}") from exc
        merged.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
    return out_dir
