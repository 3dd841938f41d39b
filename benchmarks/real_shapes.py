"""A local checkpoint with a real model's published shapes and random weights, saved as a Hub download is.

Model hubs may be unreachable, and start-up, memory and step costs depend only
on shapes and file format, so the benchmarks that need "a real model" build
one here: the architecture numbers of Qwen2.5's config.json, random weights
stored in bf16 safetensors (as the Hub ships them), and a tokenizer whose
vocabulary has the model's 151,936 entries (the tiny model's characters, then
placeholder tokens), with Qwen's ChatML template.
"""

from __future__ import annotations

from pathlib import Path

# Published config.json numbers of the Qwen2.5 instruct models.
QWEN25 = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2),
}
VOCAB_SIZE = 151_936
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer():
    """A fast tokenizer with Qwen2.5's vocabulary size and special tokens: characters first, then placeholders."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from fgrpo.core.model import TINY_CHARACTERS

    tokens = SPECIALS + ["<unk>"] + list(dict.fromkeys(TINY_CHARACTERS))
    tokens += [f"<extra_{i}>" for i in range(VOCAB_SIZE - len(tokens))]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS + ["<unk>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def save_random_checkpoint(name: str, folder: Path, seed: int = 0) -> Path:
    """config.json, bf16 safetensors weights, tokenizer and chat template in `folder`, as `save_pretrained` writes them."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    tokenizer = qwen_tokenizer()
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE, tie_word_embeddings=True, max_position_embeddings=32_768,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **QWEN25[name],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
