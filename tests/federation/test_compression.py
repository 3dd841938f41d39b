"""Update compression: codec round trips, error feedback, decode errors, and the federated loop with int8 uploads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays as np_arrays

from fgrpo.federation.compression import (
    SCALE_SUFFIX,
    CompressionError,
    apply_delta,
    compress_update,
    decode_delta,
    dequantize_int8,
    encode_delta,
    encoded_nbytes,
    from_bf16_bits,
    quantize_int8,
    to_bf16_bits,
)
from fgrpo.config import config_from_dict
from fgrpo.errors import ConfigError

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(np_arrays(np.float32, st.integers(1, 700), elements=finite), st.sampled_from([8, 64, 256]))
def test_int8_error_is_at_most_half_a_step_of_its_block(values, block_size):
    quantized, scales = quantize_int8(values, block_size)
    assert quantized.dtype == np.int8 and quantized.shape == values.shape
    assert scales.shape == (-(-values.size // block_size),)
    restored = dequantize_int8(quantized, scales, block_size)
    step = scales[np.arange(values.size) // block_size]  # (n,) the resolution of each value's block
    assert np.all(np.abs(restored - values) <= step / 2 + 1e-6 * np.abs(values) + 1e-30)


def test_int8_keeps_zero_and_each_blocks_extreme_exactly():
    values = np.array([0.0, 1e-3, -2.0, 0.5, 0.0, 0.0, 0.0, 7.0], dtype=np.float32)
    quantized, scales = quantize_int8(values, 4)
    restored = dequantize_int8(quantized, scales, 4)
    assert restored[0] == 0 and restored[4:7].tolist() == [0, 0, 0]
    assert restored[2] == pytest.approx(-2.0) and restored[7] == pytest.approx(7.0)
    assert np.all(np.isfinite(restored))  # an all-zero block has scale 0 and must not divide by it


def test_bf16_bits_match_torchs_bfloat16_cast():
    values = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    bits = to_bf16_bits(values)
    assert bits.dtype == np.uint16 and bits.shape == values.shape
    expected = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(from_bf16_bits(bits), expected)


def test_numpy_bf16_is_bit_identical_to_torch_on_ties_extremes_and_specials():
    """The codec is numpy (the server decodes without torch); torch's cast is the reference."""
    rng = np.random.default_rng(1)
    wide = rng.standard_normal(20_000).astype(np.float32) * np.float32(10.0) ** rng.integers(-40, 38, 20_000)
    ties = np.array([1.00390625, 1.01171875, -1.00390625, 3.0e-39, 1e-45], np.float32)  # halfway cases, subnormals
    special = np.array([np.inf, -np.inf, 0.0, -0.0, np.finfo(np.float32).max, -np.finfo(np.float32).max], np.float32)
    values = np.concatenate([wide.astype(np.float32), ties, special])
    reference = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(to_bf16_bits(values), reference)
    back = torch.from_numpy(reference.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(from_bf16_bits(reference), back)
    assert np.isnan(from_bf16_bits(to_bf16_bits(np.array([np.nan], np.float32)))).all()


@pytest.mark.parametrize("codec,tolerance,bytes_per_value", [("none", 0, 4), ("fp16", 1e-3, 2), ("bf16", 8e-3, 2), ("int8", 1e-2, 1)])
def test_every_codec_decodes_to_the_same_shapes_within_its_precision(codec, tolerance, bytes_per_value):
    rng = np.random.default_rng(1)
    start = {"a": rng.normal(size=(4, 64)).astype(np.float32), "b": rng.normal(size=(300,)).astype(np.float32)}
    trained = {k: v + 0.01 * rng.normal(size=v.shape).astype(np.float32) for k, v in start.items()}
    encoded, residual = compress_update(start, trained, codec)
    restored = apply_delta(start, decode_delta(encoded, start, codec))
    for name in start:
        assert restored[name].shape == start[name].shape and restored[name].dtype == np.float32
        true_delta = trained[name] - start[name]
        err = np.abs(restored[name] - trained[name]).max()
        assert err <= tolerance * np.abs(true_delta).max() + 1e-7
        np.testing.assert_allclose(residual[name], true_delta - (restored[name] - start[name]), atol=1e-6)  # float32 sums
    # The size formula the communication benchmark uses is the payload actually built.
    shapes = {k: v.shape for k, v in start.items()}
    assert encoded_nbytes(shapes, codec) == sum(a.nbytes for a in encoded.values())
    assert sum(encoded[k].nbytes for k in start) == bytes_per_value * sum(v.size for v in start.values())


def test_error_feedback_keeps_the_sum_of_uploads_on_the_sum_of_true_updates():
    # One big value per block makes the small ones round to 0 every time without feedback.
    start = {"w": np.zeros(256, dtype=np.float32)}
    step = np.full(256, 1e-3, dtype=np.float32)
    step[0] = 1.0
    sent_plain = np.zeros(256)
    sent_feedback = np.zeros(256)
    residual = None
    rounds = 50
    for _ in range(rounds):
        plain, _ = compress_update(start, {"w": step}, "int8", None)
        sent_plain += decode_delta(plain, start, "int8")["w"]
        encoded, residual = compress_update(start, {"w": step}, "int8", residual)
        sent_feedback += decode_delta(encoded, start, "int8")["w"]
    truth = rounds * step.astype(np.float64)
    assert np.abs(sent_plain[1:] - truth[1:]).max() == pytest.approx(rounds * 1e-3, rel=1e-3)  # all lost
    # With feedback the gap is one round's rounding error, not 50 rounds' worth.
    assert np.abs(sent_feedback - truth).max() <= 1.0 / 254 + 1e-6


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda e: e.pop("w" + SCALE_SUFFIX), "missing arrays"),
        (lambda e: e.update(w=e["w"].astype(np.float32)), "'w' is float32, expected int8"),
        (lambda e: e.update(w=np.zeros((2, 2), np.int8)), "'w' has shape (2, 2), expected (300,)"),
        (lambda e: e.update({"w" + SCALE_SUFFIX: np.zeros(5, np.float32)}), "must be 2 finite float32 scales"),
        (lambda e: e.update({"w" + SCALE_SUFFIX: np.array([np.inf, 1], np.float32)}), "must be 2 finite float32"),
    ],
)
def test_a_reply_that_does_not_fit_the_codec_is_refused_by_name(mutate, message):
    start = {"w": np.zeros(300, dtype=np.float32)}
    encoded = encode_delta({"w": np.ones(300, dtype=np.float32)}, "int8")
    mutate(encoded)
    with pytest.raises(CompressionError) as caught:
        decode_delta(encoded, start, "int8")
    assert message in str(caught.value)


def test_dp_with_compression_is_refused_with_the_keys_named(tmp_path):
    from conftest import small_config_dict

    data = small_config_dict(tmp_path, federation={"dp": {"enabled": True}, "compression": {"codec": "int8"}})
    with pytest.raises(ConfigError, match="compression.codec = 'int8'"):
        config_from_dict(data)


@pytest.mark.slow
def test_int8_uploads_quarter_the_bytes_and_the_server_decodes_them(tmp_path):
    from conftest import small_config_dict

    from fgrpo.deploy.runtime import run_simulation

    def run(codec: str, name: str) -> list[dict]:
        data = small_config_dict(tmp_path, federation={"compression": {"codec": codec}}, output={"dir": str(tmp_path / name)})
        run_simulation(config_from_dict(data), progress=False)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] in ("round", "failure")]

    plain, int8 = run("none", "plain"), run("int8", "int8")
    assert not [r for r in int8 if r["kind"] == "failure"]  # every int8 reply decoded and was aggregated
    for p, q in zip([r for r in plain if r["round"] > 0], [r for r in int8 if r["round"] > 0]):
        assert q["clients/aggregated"] == 2
        assert q["comm/bytes_down"] == p["comm/bytes_down"]  # the global adapter still goes down in float32
        assert 3.5 < p["comm/bytes_up"] / q["comm/bytes_up"] <= 4.0
        assert np.isfinite(q["global/acc_heldout"])


def test_a_client_sending_the_wrong_encoding_is_excluded_with_the_reason(tmp_path):
    from conftest import small_config_dict
    from flwr.app import Array, ArrayRecord, Context, Message
    from flwr.clientapp import ClientApp

    from fgrpo.federation.clientapp import client_evaluate, client_init, client_train
    from fgrpo.federation.wire import CONFIG_KEY
    from fgrpo.config import dump_config
    from fgrpo.federation.inprocess import InProcessGrid
    from fgrpo.deploy.runtime import node_configs
    from fgrpo.federation.server import run_federation

    config = config_from_dict(
        small_config_dict(tmp_path, federation={"rounds": 1, "min_train_clients": 1, "compression": {"codec": "int8"}})
    )
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = client_train(msg, context)
        if int(context.node_config["partition-id"]) == 1:  # drops its scales, as an outdated client would
            kept = {k: v for k, v in reply.content["arrays"].items() if not k.endswith(SCALE_SUFFIX)}
            reply.content["arrays"] = ArrayRecord({k: Array(v.numpy()) for k, v in kept.items()})
        return reply

    app.evaluate()(client_evaluate)
    app.query()(client_init)
    grid = InProcessGrid(app, node_configs(config), run_config={CONFIG_KEY: dump_config(config)})
    run_federation(grid, config, tmp_path / "run", progress=False)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    (failure,) = [r for r in map(json.loads, lines) if r["kind"] == "failure"]
    assert failure["client"] == 1 and "int8 update: missing arrays" in failure["reason"]
