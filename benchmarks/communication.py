"""Benchmark: bytes a client uploads per round (its adapter delta) as a share of the full model's bytes.

    python benchmarks/communication.py [--rank 8] [--block-size 256]

Models: fgrpo's built-in tiny Llama, and the published configs of Qwen2.5-0.5B
and Qwen2.5-1.5B (architecture numbers copied from their config.json). The real
models are built on PyTorch's meta device: shapes only, no weights, no download,
so the numbers are exact parameter counts. LoRA uses fgrpo's own `add_lora` with
the 'auto' target modules (all attention and MLP projections).

For each codec of `federation.compression` the upload is computed by
`compression.encoded_nbytes` (payload bytes). The benchmark also builds a real
encoded update of those shapes (random values), sends it through Flower's wire
serialisation (the round trip the in-process grid does) and prints the bytes on
the wire, which add Flower's per-array headers (about 0.5 KB per array). Shares are against the full model
stored in float32 (the adapter travels in float32 when uncompressed).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from fgrpo.federation.compression import CODECS, compress_update, encoded_nbytes
from fgrpo.core.model import add_lora, build_tiny_model, trainable_parameters

# Architecture numbers from the models' config.json on the Hugging Face Hub.
QWEN25_CONFIGS = {
    "Qwen2.5-0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
    "Qwen2.5-1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2),
}


def meta_qwen(name: str):
    """A Qwen2.5 model with the published shapes on the meta device (no memory, no download)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=151_936, tie_word_embeddings=True, max_position_embeddings=32_768, **QWEN25_CONFIGS[name])
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count(model) -> tuple[int, dict[str, tuple[int, ...]]]:
    """(full parameter count, trainable shapes); tied weights count once, as they are stored once."""
    full = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    return full, {name: tuple(p.shape) for name, p in trainable_parameters(model).items()}


def wire_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of a reply carrying `arrays` through Flower's wire serialisation."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from fgrpo.federation.wire import arrays_to_record
    from fgrpo.federation.inprocess import wire_round_trip

    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # Message() reads the sender from here
    empty = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=2, message_type="train")
    _, overhead = wire_round_trip(empty)
    message = Message(RecordDict({"arrays": arrays_to_record(arrays), "config": ConfigRecord({})}), dst_node_id=2, message_type="train")
    return wire_round_trip(message)[1] - overhead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r.")
    parser.add_argument("--block-size", type=int, default=256, help="Values per int8 scale.")
    args = parser.parse_args()

    tiny, _ = build_tiny_model()
    models = {"tiny (built-in)": add_lora(tiny, args.rank, 2 * args.rank, 0.0, "auto")}
    models.update({name: add_lora(meta_qwen(name), args.rank, 2 * args.rank, 0.0, "auto") for name in QWEN25_CONFIGS})

    print(f"LoRA r={args.rank} on all attention + MLP projections; full model counted in float32; int8 block {args.block_size}")
    print(f"{'model':<16}{'params':>14}{'adapter':>12}{'codec':>7}{'upload':>12}{'share':>9}{'vs fp32':>9}{'on wire':>12}")
    shares: dict[tuple[str, str], float] = {}
    wire: dict[tuple[str, str], int] = {}
    for name, model in models.items():
        full, shapes = count(model)
        adapter = sum(int(np.prod(s)) for s in shapes.values())
        reference = encoded_nbytes(shapes, "none")
        rng = np.random.default_rng(0)  # one stream: equal arrays would be sent once (Flower dedupes objects)
        start = {k: rng.standard_normal(shape, dtype=np.float32) for k, shape in shapes.items()}
        moved = {k: v + np.float32(1e-3) * rng.standard_normal(v.shape, dtype=np.float32) for k, v in start.items()}
        on_wire = {codec: wire_bytes(compress_update(start, moved, codec, block_size=args.block_size)[0]) for codec in CODECS}
        for codec in CODECS:
            upload = encoded_nbytes(shapes, codec, args.block_size)
            shares[(name, codec)] = upload / (4 * full)
            wire[(name, codec)] = on_wire[codec]
            print(
                f"{name:<16}{full:>14,}{adapter:>12,}{codec:>7}{upload / 1024**2:>10.3f}MB"
                f"{100 * shares[(name, codec)]:>8.3f}%{reference / upload:>8.2f}x{on_wire[codec] / 1024**2:>10.3f}MB"
            )
    half = "Qwen2.5-0.5B"
    print(
        f"ratio: {half} LoRA r={args.rank} delta = {100 * shares[(half, 'none')]:.2f}% of full-model bytes; "
        f"int8 = {100 * shares[(half, 'int8')]:.3f}% ({shares[(half, 'none')] / shares[(half, 'int8')]:.2f}x smaller; "
        f"{wire[(half, 'none')] / wire[(half, 'int8')]:.2f}x on the wire)"
    )


if __name__ == "__main__":
    main()
