"""Compress what a client uploads: the update Δ_k = θ_k − θ_t in fp16, bf16 or block-wise int8, with error feedback.

Why the delta and not θ_k: one round moves the adapter by a small amount, so
rounding the *change* costs little, while rounding θ_k itself would add the
same absolute error to every weight every round.

Why error feedback (Seide et al. 2014; Karimireddy et al. 2019, "EF-SGD"):
what rounding removes from a client's Δ is kept by that client and added to
its next upload, so rounding errors are delayed rather than lost, and the sum
of what the server receives tracks the sum of the true updates.

Wire format (one ArrayRecord; every name is a trainable array of θ_t):
- fp16: `name` → float16, same shape;
- bf16: `name` → uint16 holding bfloat16 bits, same shape (NumPy has no bfloat16);
- int8: `name` → int8, same shape, and `name + SCALE_SUFFIX` → float32 (num_blocks,):
  symmetric absmax quantisation per block of `block_size` consecutive values
  (as bitsandbytes' blockwise 8-bit does), so one outlier only coarsens its block.

The server decodes every reply back to float32 θ_t + Δ̂ before screening and
aggregation, so every strategy (FGRPO, the FedAvg family, robust aggregators)
aggregates ordinary weights of the usual shapes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import numpy as np

Codec = Literal["none", "fp16", "bf16", "int8"]
CODECS: tuple[str, ...] = ("none", "fp16", "bf16", "int8")
SCALE_SUFFIX = "::int8-scale"
INT8_LEVELS = 127  # symmetric range [-127, 127]; -128 is never used, so 0 and ±x are exact
WIRE_DTYPE = {"fp16": np.dtype(np.float16), "bf16": np.dtype(np.uint16), "int8": np.dtype(np.int8)}


class CompressionError(ValueError):
    """A reply cannot be decoded with the configured codec (its message says which array and why)."""


def quantize_int8(values: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Block-wise absmax int8: (q int8, same shape as values; scales float32 (ceil(n / block_size),)).

    value ≈ q · scale of its block, with |error| ≤ scale / 2 = max|block| / 254.
    """
    flat = np.asarray(values, dtype=np.float32).reshape(-1)  # (n,)
    num_blocks = max(1, math.ceil(flat.size / block_size))
    padded = np.zeros(num_blocks * block_size, dtype=np.float32)
    padded[: flat.size] = flat
    blocks = padded.reshape(num_blocks, block_size)  # (num_blocks, block_size)
    scales = np.abs(blocks).max(axis=1) / INT8_LEVELS  # (num_blocks,)
    safe = np.where(scales > 0, scales, 1.0)[:, None]
    quantized = np.clip(np.rint(blocks / safe), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
    return quantized.reshape(-1)[: flat.size].reshape(np.shape(values)), scales.astype(np.float32)


def dequantize_int8(quantized: np.ndarray, scales: np.ndarray, block_size: int) -> np.ndarray:
    """Inverse of `quantize_int8`: float32 array of `quantized`'s shape."""
    flat = quantized.reshape(-1).astype(np.float32)  # (n,)
    block_of = np.arange(flat.size) // block_size  # (n,)
    return (flat * scales[block_of]).reshape(quantized.shape)


# bfloat16 is float32's top 16 bits; torch's CPU cast maps every NaN to this one (a NaN either way).
_BF16_NAN = np.uint16(0xFFFF)


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits (uint16), rounding to nearest even exactly as torch's cast does.

    Numpy only, so the server decodes bf16 uploads without torch: add 0x7FFF
    plus the lowest kept bit, then keep the top half (a tie rounds to even;
    overflow rounds to ±inf, as in IEEE).
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), _BF16_NAN, rounded).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits → float32 (exact: bf16 values are float32 values)."""
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def encode_delta(delta: Mapping[str, np.ndarray], codec: Codec, block_size: int = 256) -> dict[str, np.ndarray]:
    """Encode {name: float32 Δ} for the wire (see the module docstring for the format)."""
    if codec == "none":
        return {name: np.asarray(value, dtype=np.float32) for name, value in delta.items()}
    encoded: dict[str, np.ndarray] = {}
    for name, value in delta.items():
        if codec == "fp16":
            encoded[name] = np.asarray(value, dtype=np.float32).astype(np.float16)
        elif codec == "bf16":
            encoded[name] = to_bf16_bits(value)
        elif codec == "int8":
            encoded[name], encoded[name + SCALE_SUFFIX] = quantize_int8(value, block_size)
        else:
            raise CompressionError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    return encoded


def decode_delta(
    encoded: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], codec: Codec, block_size: int = 256
) -> dict[str, np.ndarray]:
    """Decode a reply's arrays to {name: float32 Δ̂} with `reference`'s names and shapes.

    Raises CompressionError naming the first array that does not match the codec.
    """
    expected = set(reference)
    if codec == "int8":
        expected |= {name + SCALE_SUFFIX for name in reference}
    missing, extra = sorted(expected - set(encoded)), sorted(set(encoded) - expected)
    if missing or extra:
        raise CompressionError(f"{codec} update: missing arrays {missing[:3]}, unexpected {extra[:3]}")
    delta: dict[str, np.ndarray] = {}
    for name, theta in reference.items():
        value = np.asarray(encoded[name])
        if value.shape != np.shape(theta):
            raise CompressionError(f"{codec} update: '{name}' has shape {value.shape}, expected {np.shape(theta)}")
        wire_dtype = WIRE_DTYPE.get(codec, np.dtype(np.float32))
        if value.dtype != wire_dtype:
            raise CompressionError(f"{codec} update: '{name}' is {value.dtype}, expected {wire_dtype}")
        if codec == "fp16":
            delta[name] = value.astype(np.float32)
        elif codec == "bf16":
            delta[name] = from_bf16_bits(value)
        elif codec == "int8":
            scales = np.asarray(encoded[name + SCALE_SUFFIX])
            num_blocks = max(1, math.ceil(value.size / block_size))
            if scales.shape != (num_blocks,) or scales.dtype != np.float32 or not np.all(np.isfinite(scales)):
                raise CompressionError(
                    f"int8 update: '{name}{SCALE_SUFFIX}' must be {num_blocks} finite float32 scales "
                    f"(block size {block_size}), got {scales.dtype} {scales.shape}"
                )
            delta[name] = dequantize_int8(value, scales, block_size)
        else:
            delta[name] = value.astype(np.float32)
    return delta


def compress_update(
    start: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    codec: Codec,
    residual: Mapping[str, np.ndarray] | None = None,
    block_size: int = 256,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Client side: encode Δ = (θ_k − θ_t) + residual; return (wire arrays, new residual = Δ − decode(wire)).

    Pass the returned residual back next round for error feedback (None = no feedback).
    """
    delta = {
        name: np.asarray(trained[name], dtype=np.float32)
        - np.asarray(theta, dtype=np.float32)
        + (0.0 if residual is None else np.asarray(residual[name], dtype=np.float32))
        for name, theta in start.items()
    }
    encoded = encode_delta(delta, codec, block_size)
    decoded = decode_delta(encoded, start, codec, block_size)
    return encoded, {name: delta[name] - decoded[name] for name in delta}


def apply_delta(current: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Server side: θ_t + Δ̂ as float32 arrays (what every strategy aggregates)."""
    return {name: (np.asarray(theta, dtype=np.float32) + delta[name]).astype(np.float32) for name, theta in current.items()}


def encoded_nbytes(shapes: Mapping[str, tuple[int, ...]], codec: Codec, block_size: int = 256) -> int:
    """Payload bytes of an encoded update with these array shapes (no per-array wire headers)."""
    total = 0
    for shape in shapes.values():
        numel = math.prod(shape)
        if codec == "none":
            total += 4 * numel
        elif codec in ("fp16", "bf16"):
            total += 2 * numel
        else:
            total += numel + 4 * max(1, math.ceil(numel / block_size))
    return total
