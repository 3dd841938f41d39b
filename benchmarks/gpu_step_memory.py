"""Benchmark: peak GPU memory and time of one GRPO step at the shapes of a real model (random weights).

    python benchmarks/gpu_step_memory.py --model qwen2.5-0.5b --prompts 8 --generations 8 --length 512 --checkpointing

Model hubs may be unreachable, and a step's cost depends only on shapes, so the
model is a randomly initialised copy of the named architecture. Every completion
is forced to `--length` tokens (a random model rarely emits EOS): an upper bound
for real runs, whose completions stop early. The step is fgrpo's own rollout
log-probs and loss (`fgrpo.core.rollout`, `fgrpo.core.grpo`) after HF generate, with
LoRA r=16 on all projections and random advantages. Prints one line per step and
a final line with the measured step's peak memory and time (the last step; the
first includes CUDA warm-up). A compact inline version of this script produced
the table in examples/README.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from fgrpo.core.grpo import grpo_loss
from fgrpo.core.model import LORA_PRESETS
from fgrpo.core.rollout import Rollouts, completion_log_probs

# (hidden, intermediate, layers, attention heads, kv heads) of the Qwen2.5 instruct models.
SHAPES = {
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--prompt-length", type=int, default=160)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark measures GPU memory: it needs CUDA")
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, intermediate, layers, heads, kv_heads = SHAPES[args.model]
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config).to("cuda", torch.bfloat16)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_PRESETS["qwen2"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    n = args.prompts * args.generations
    for step in range(args.steps):
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        prompt_ids = torch.randint(100, 150000, (args.prompts, args.prompt_length), device="cuda")
        prompt_ids = prompt_ids.repeat_interleave(args.generations, 0)  # (B*G, P)
        prompt_mask = torch.ones_like(prompt_ids)
        model.eval()
        with torch.no_grad():
            output = model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                max_new_tokens=args.length,
                min_new_tokens=args.length,
                do_sample=True,
                top_k=0,
                pad_token_id=0,
                eos_token_id=1,
            )
        torch.cuda.synchronize()
        generate_s = time.perf_counter() - start
        completion_ids = output[:, args.prompt_length :]  # (B*G, T)
        rollouts = Rollouts(prompt_ids, prompt_mask, completion_ids, torch.ones_like(completion_ids), [])
        model.train()
        status = "ok"
        try:
            loss = grpo_loss(
                completion_log_probs(model, rollouts),
                None,
                torch.randn(n, device="cuda"),
                rollouts.completion_mask,
                epsilon_low=0.2,
                epsilon_high=0.28,
                beta=0.0,
                ref_log_probs=None,
                loss_type="dapo",
                max_completion_length=args.length,
            ).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        except torch.cuda.OutOfMemoryError:
            status = "out of memory"
        torch.cuda.synchronize()
        step_s = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"step {step}: generate {generate_s:.1f} s, step {step_s:.1f} s, peak {peak:.1f} GiB, {status}")
    print(
        f"{args.model} {args.prompts}x{args.generations}x{args.length} checkpointing={args.checkpointing}: "
        f"peak {peak:.1f} GiB, step {step_s:.1f} s ({generate_s / step_s:.0%} generate), {status}"
    )


if __name__ == "__main__":
    main()
