"""Benchmark: peak memory of per-token log-probs (forward + backward) at a 150k-token vocabulary.

    python benchmarks/log_prob_memory.py [--rows 16] [--length 128] [--vocab 151936] [--dtype bfloat16]

Compares fgrpo's `grpo.token_log_probs` (z_token − logsumexp(z), a chunk of
sequences at a time) with the direct `log_softmax(logits.float() / τ).gather(…)`
it replaced, on the same random logits of Qwen2.5's vocabulary size. Each
variant runs in a fresh process, with the logits created as a leaf that needs
grad (what the LM head hands over), and reports its peak RSS above the logits
themselves; on CUDA it uses `torch.cuda.max_memory_allocated`. The last line is
the ratio of the two peaks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch
variant, rows, length, vocab, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), getattr(torch, sys.argv[5])
from fgrpo.core.grpo import token_log_probs
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)
logits = torch.randn(rows, length, vocab, dtype=dtype, device=device).requires_grad_(True)
ids = torch.randint(0, vocab, (rows, length), device=device)
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() / 2**20
else:
    base = rss_mb()
if variant == "chunked":
    log_probs = token_log_probs(logits, ids, 0.7)
else:
    log_probs = torch.log_softmax(logits.float() / 0.7, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
log_probs.sum().backward()
peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss_mb()
print("RESULT " + json.dumps({"variant": variant, "extra_mb": peak - base, "device": device.type}))
"""


def run(variant: str, args) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, variant, str(args.rows), str(args.length), str(args.vocab), args.dtype],
        capture_output=True,
        text=True,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16, help="Completions N.")
    parser.add_argument("--length", type=int, default=128, help="Completion tokens T.")
    parser.add_argument("--vocab", type=int, default=151_936, help="Vocabulary size V (Qwen2.5's).")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="Logits dtype.")
    args = parser.parse_args()
    full, chunked = run("log_softmax", args), run("chunked", args)
    logits_mb = args.rows * args.length * args.vocab * (2 if args.dtype == "bfloat16" else 4) / 2**20
    print(f"N={args.rows} T={args.length} V={args.vocab} {args.dtype} logits = {logits_mb:.0f} MB on {full['device']}")
    print(f"{'variant':<34}{'peak above the logits (MB)':>28}")
    print(f"{'log_softmax(float) + gather':<34}{full['extra_mb']:>28.0f}")
    print(f"{'chunked gather - logsumexp':<34}{chunked['extra_mb']:>28.0f}")
    print(f"ratio: peak memory chunked / log_softmax = {chunked['extra_mb'] / full['extra_mb']:.2f}x")


if __name__ == "__main__":
    main()
