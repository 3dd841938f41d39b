"""Tiny, randomly initialised checkpoints of real architectures, saved like a hub download.

Each has the architecture's own config class and module names (so LoRA
presets are exercised), a character-level fast tokenizer with the family's
special tokens, and a chat template in that family's style, all built offline.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fgrpo.core.model import TINY_CHARACTERS

# Chat templates in each family's own style (simplified, same special tokens).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

ARCHITECTURES = {
    # name: (special tokens, bos, eos, pad, template)
    "llama": (
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|pad|>",
        LLAMA3_TEMPLATE,
    ),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>", CHATML_TEMPLATE),
    "gpt2": (["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", None, PLAIN_TEMPLATE),
}


def tiny_tokenizer(architecture: str):
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, pad, template = ARCHITECTURES[architecture]
    tokens = list(specials) + ["<unk>"] + list(TINY_CHARACTERS)
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(specials) + ["<unk>"])
    if architecture == "llama":  # like Llama-3's tokenizer: BOS added to every encoded text
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    named = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": "<unk>"}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **{k: v for k, v in named.items() if v})
    tokenizer.chat_template = template
    return tokenizer


def tiny_config(architecture: str, tokenizer):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if architecture == "gpt2":
        return GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=1024, **ids)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[architecture]
    return cls(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        **ids,
    )


def save_tiny_checkpoint(architecture: str, folder: Path, seed: int = 0) -> Path:
    """Write config.json, weights, tokenizer and chat template to `folder` (as save_pretrained does)."""
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer(architecture)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(architecture, tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
