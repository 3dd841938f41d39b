"""Data and rewards: task families, answer extraction, dataset sources, reward functions, non-IID partitions.

Also holds the packaged JSONL samples (`sample_gsm8k.jsonl`, `sample_math.jsonl`).
"""
