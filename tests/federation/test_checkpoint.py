"""Checkpoints: atomic writes, clear errors, and kill -9 at a random point → resume → the same run."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fgrpo.federation.checkpoint import (
    CHECKPOINT_NAME,
    ServerState,
    config_differences,
    load_checkpoint,
    load_strategy_state,
    save_checkpoint,
    strategy_state,
)
from fgrpo.config import config_from_dict, dump_config
from fgrpo.errors import ConfigError, FederationError


def state(server_round: int) -> ServerState:
    import numpy as np

    return ServerState(
        server_round=server_round,
        arrays={"w": np.arange(3.0)},
        strategy={"class": "FedAvg"},
        python_rng=random.getstate(),
        numpy_rng=np.random.get_state(),
        metrics_offset=0,
        config_text="",
        initial={"global/acc_heldout": 0.5},
        final_accuracy=0.5,
        elapsed_s=1.0,
    )


def test_a_full_disk_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, state(1))

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(FederationError, match="disk is full.*previous checkpoint"):
        save_checkpoint(tmp_path, state(2))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path).server_round == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]  # no temp file left behind


def test_missing_or_damaged_checkpoints_are_named(tmp_path):
    with pytest.raises(ConfigError, match=f"has no {CHECKPOINT_NAME}"):
        load_checkpoint(tmp_path)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"\x80\x05garbage")
    with pytest.raises(ConfigError, match="is damaged"):
        load_checkpoint(tmp_path)


def test_config_differences_list_dotted_keys():
    a = 'x = 1\n[grpo]\nbeta = 0.0\n[federation]\nrounds = 2\n'
    b = 'x = 1\n[grpo]\nbeta = 0.1\n[federation]\nrounds = 5\n'
    assert config_differences(a, b, ignore=("federation.rounds",)) == ["grpo.beta"]


def test_fedadam_moments_and_fgrpo_baselines_survive_a_round_trip():
    import numpy as np

    from fgrpo.federation.strategies import FGRPO, make_strategy

    adam = make_strategy("fedadam")
    adam.m_t, adam.v_t = {"w": np.ones(2)}, {"w": np.full(2, 0.5)}
    fresh = make_strategy("fedadam")
    load_strategy_state(fresh, strategy_state(adam))
    assert fresh.m_t["w"].tolist() == [1, 1] and fresh.v_t["w"].tolist() == [0.5, 0.5]
    fgrpo = FGRPO()
    fgrpo._after_round(1, [type("R", (), {"client_id": 3, "reward_mean": 2.0, "reward_var": 0.01})()])
    restored = FGRPO()
    load_strategy_state(restored, strategy_state(fgrpo))
    assert restored.clients[3].baseline == 2.0 and restored.clients[3].baseline_var == 0.01
    with pytest.raises(ConfigError, match="written by strategy FedAdam"):
        load_strategy_state(FGRPO(), strategy_state(adam))


# ------------------------------------------------------------------ kill -9 and resume


def write_config(tmp_path: Path) -> Path:
    from conftest import small_config_dict

    import tomli_w

    data = small_config_dict(tmp_path)
    data["tasks"]["rewards"] = [{"name": "exact_match"}, {"name": "partial_credit"}]
    data["training"]["prompts_per_step"] = 4
    data["federation"].update(rounds=4, local_steps=2)
    path = tmp_path / "run.toml"
    path.write_text(dump_config(config_from_dict(data)))
    return path


def fgrpo_run(*args: str) -> subprocess.Popen:
    code = "import sys; from fgrpo.cli import main; sys.argv = ['fgrpo', *sys.argv[1:]]; main()"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.Popen([sys.executable, "-c", code, "run", *args, "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def comparable(run_dir: Path) -> tuple[list[dict], bytes]:
    """metrics.jsonl without wall-clock timings, and the final adapter's bytes."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [{k: v for k, v in r.items() if not (k.startswith("time/") or k.endswith("train_s"))} for r in recs]
    return recs, (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()


def finish(process: subprocess.Popen, timeout: float = 600) -> None:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output


@pytest.mark.slow
def test_killed_at_a_random_point_and_resumed_equals_an_uninterrupted_run(tmp_path):
    config = write_config(tmp_path)
    reference_process = fgrpo_run(str(config), "-o", str(tmp_path / "reference"))
    while not (tmp_path / "reference" / CHECKPOINT_NAME).exists() and reference_process.poll() is None:
        time.sleep(0.05)
    first_checkpoint = time.perf_counter()
    finish(reference_process)
    training_s = time.perf_counter() - first_checkpoint  # the window in which a kill lands mid-run
    reference = comparable(tmp_path / "reference")
    repeats = int(os.environ.get("FGRPO_KILL_REPEATS", "2"))
    rng = random.Random(20261127)
    for repeat in range(repeats):
        run_dir = tmp_path / f"killed{repeat}"
        process = fgrpo_run(str(config), "-o", str(run_dir))
        while not (run_dir / CHECKPOINT_NAME).exists() and process.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, training_s))  # anywhere from round 1 to the final writes
        process.send_signal(signal.SIGKILL)
        process.communicate()
        killed_at = load_checkpoint(run_dir).server_round
        print(f"repeat {repeat}: killed with round {killed_at} of 4 checkpointed, finished={((run_dir / 'summary.json').exists())}")
        if not (run_dir / "summary.json").exists():
            finish(fgrpo_run(str(config), "--resume", str(run_dir)))
        assert comparable(run_dir) == reference, f"repeat {repeat}: killed after round {killed_at}"


@pytest.mark.slow
def test_resume_refuses_a_changed_config_and_a_finished_run(tmp_path):
    from fgrpo.deploy.runtime import run_simulation

    from conftest import small_config_dict

    data = small_config_dict(tmp_path)
    run_simulation(config_from_dict(data), progress=False)
    changed = {**data, "grpo": {**data["grpo"], "beta": 0.5}}
    with pytest.raises(ConfigError, match="differs from the checkpointed run in grpo.beta"):
        run_simulation(config_from_dict(changed), progress=False, resume=True)
    with pytest.raises(ConfigError, match="already finished its 2 rounds"):
        run_simulation(config_from_dict(data), progress=False, resume=True)
    longer = {**data, "federation": {**data["federation"], "rounds": 3}}
    summary = run_simulation(config_from_dict(longer), progress=False, resume=True)  # extend a finished run
    assert summary["rounds"] == 3
    rounds = [json.loads(x)["round"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "round"]
    assert rounds == [0, 1, 2, 3]


@pytest.mark.slow
def test_compression_residuals_survive_a_resume(tmp_path):
    """Error feedback lives in each node's context: a stop after round 1 and a resume must equal one 2-round run."""
    from conftest import small_config_dict

    from fgrpo.deploy.runtime import run_simulation

    def data(name: str, rounds: int) -> dict:
        d = small_config_dict(tmp_path, output={"dir": str(tmp_path / name)})
        d["tasks"]["rewards"] = [{"name": "exact_match"}, {"name": "partial_credit"}]  # reward variance: real updates
        d["training"]["prompts_per_step"] = 4
        d["federation"].update(rounds=rounds, local_steps=2, compression={"codec": "int8", "block_size": 64})
        return d

    run_simulation(config_from_dict(data("straight", 2)), progress=False)
    run_simulation(config_from_dict(data("resumed", 1)), progress=False)
    run_simulation(config_from_dict(data("resumed", 2)), progress=False, resume=True)
    records, _ = comparable(tmp_path / "straight")
    norms = [r["client/update_norm"] for r in records if r["round"] == 1 and "client/update_norm" in r]
    assert len(norms) == 2 and min(norms) > 0  # round 1 leaves a rounding residual to carry
    assert comparable(tmp_path / "resumed") == comparable(tmp_path / "straight")


def test_every_piece_of_state_survives_the_safetensors_round_trip(tmp_path):
    import numpy as np
    from flwr.app import Array, ArrayRecord

    random.seed(7)
    np.random.seed(7)
    full = state(3)
    full.strategy = {
        "class": "FedAdam",
        "m_t": ArrayRecord({"a": Array(np.ones((2, 2), dtype=np.float32))}),
        "state_dict": {"version": 1, "clients": {"0": {"baseline": None, "count": 2, "mean": float("inf")}}},
    }
    full.grid_state = {5: b"\x00\x01proto", 9: b""}
    full.extra = {"node_clients": {5: 0, 9: 1}}
    save_checkpoint(tmp_path, full)
    back = load_checkpoint(tmp_path)
    assert back.grid_state == full.grid_state and back.extra == full.extra
    assert back.python_rng == full.python_rng
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(back.numpy_rng, full.numpy_rng))
    assert np.array_equal(back.strategy["m_t"]["a"].numpy(), np.ones((2, 2)))
    assert back.strategy["state_dict"]["clients"]["0"]["mean"] == float("inf")
    random.setstate(back.python_rng)  # the restored states are usable as they are
    np.random.set_state(back.numpy_rng)


def test_a_crafted_pickle_or_tampered_checkpoint_runs_no_code_and_is_refused(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / CHECKPOINT_NAME).write_bytes(pickle.dumps({"version": 1, "state": Boom()}))
    with pytest.raises(ConfigError, match="damaged|not an fgrpo checkpoint"):
        load_checkpoint(tmp_path)
    assert not (tmp_path / "pwned").exists()
    save_checkpoint(tmp_path, state(1))
    data = bytearray((tmp_path / CHECKPOINT_NAME).read_bytes())
    data[-3] ^= 0xFF  # flip a bit in the arrays
    (tmp_path / CHECKPOINT_NAME).write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="was not written by fgrpo"):
        load_checkpoint(tmp_path)


def rewrite_checkpoint(run_dir: Path, edit, digest) -> None:
    """What someone who can write the run folder (but holds no key) can do: edit the state, recompute a digest."""
    from safetensors import safe_open
    from safetensors.numpy import save

    path = run_dir / CHECKPOINT_NAME
    with safe_open(str(path), framework="numpy") as handle:
        metadata = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    fields = json.loads(metadata["fgrpo-checkpoint"])
    edit(fields)
    metadata["fgrpo-checkpoint"] = json.dumps(fields)
    metadata["hmac-sha256"] = digest(metadata["fgrpo-checkpoint"], tensors)
    path.write_bytes(save(tensors, metadata=metadata))


def plain_sha256(state_json: str, tensors: dict) -> str:
    """The unkeyed digest version 2 used: anyone can recompute it."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256(state_json.encode("utf-8"))
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def test_a_checkpoint_is_trusted_only_if_fgrpo_wrote_it_with_this_users_key(tmp_path):
    from fgrpo.federation import checkpoint
    from fgrpo.federation.signing import signing_key

    def negative_round(fields):
        fields["server_round"] = -5

    save_checkpoint(tmp_path, state(2))
    rewrite_checkpoint(tmp_path, negative_round, plain_sha256)
    with pytest.raises(ConfigError, match=r"was not written by fgrpo with this user's key") as refused:
        load_checkpoint(tmp_path)
    assert "Traceback" not in str(refused.value) and str(tmp_path) not in str(checkpoint.key_path())
    save_checkpoint(tmp_path, state(2))
    rewrite_checkpoint(tmp_path, negative_round, lambda text, tensors: checkpoint._digest(b"k" * 32, text, tensors))
    with pytest.raises(ConfigError, match="was not written by fgrpo"):  # a key of one's own does not help
        load_checkpoint(tmp_path)
    rewrite_checkpoint(tmp_path, negative_round, lambda text, tensors: checkpoint._digest(signing_key(), text, tensors))
    assert load_checkpoint(tmp_path).server_round == -5  # only the key holder (fgrpo) can sign a state


def test_the_key_is_private_and_kept_outside_the_run_folder(tmp_path, monkeypatch):
    import stat

    from fgrpo.federation.signing import key_path, signing_key

    monkeypatch.setenv("FGRPO_CACHE", str(tmp_path / "cache"))
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run", state(1))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [CHECKPOINT_NAME]
    assert stat.S_IMODE(key_path().stat().st_mode) == 0o600
    key = signing_key()
    assert signing_key() == key and len(key) == 32  # made once, then read
    key_path().chmod(0o644)
    with pytest.raises(ConfigError, match=r"is not private.*chmod 600"):
        load_checkpoint(tmp_path / "run")
    key_path().chmod(0o600)
    assert load_checkpoint(tmp_path / "run").server_round == 1
    key_path().unlink()  # a new key: the old runs are no longer fgrpo's word
    with pytest.raises(ConfigError, match="was not written by fgrpo"):
        load_checkpoint(tmp_path / "run")


def test_resume_refuses_a_missing_shortened_or_edited_metrics_file(tmp_path):
    from conftest import small_config_dict
    from fgrpo.deploy.runtime import run_simulation

    config = config_from_dict(small_config_dict(tmp_path, federation={"rounds": 1}))
    run_simulation(config, progress=False)
    run_dir = tmp_path / "run"
    longer = config_from_dict(small_config_dict(tmp_path, federation={"rounds": 2}))
    metrics = run_dir / "metrics.jsonl"
    original = metrics.read_bytes()
    metrics.write_bytes(original[: len(original) // 2])
    with pytest.raises(ConfigError, match="shortened"):
        run_simulation(longer, progress=False, resume=True)
    assert metrics.read_bytes() == original[: len(original) // 2]  # no NUL padding
    metrics.write_bytes(original.replace(b'"round"', b'"rounD"', 1))
    with pytest.raises(ConfigError, match="was edited"):
        run_simulation(longer, progress=False, resume=True)
    metrics.unlink()
    with pytest.raises(ConfigError, match="metrics.jsonl' is missing"):
        run_simulation(longer, progress=False, resume=True)
    metrics.write_bytes(original)
    assert run_simulation(longer, progress=False, resume=True)["rounds"] == 2


def test_a_refused_resume_leaves_config_toml_as_it_was(tmp_path):
    from conftest import small_config_dict
    from fgrpo.deploy.runtime import run_simulation

    run_simulation(config_from_dict(small_config_dict(tmp_path, federation={"rounds": 1})), progress=False)
    run_dir = tmp_path / "run"
    config_before = (run_dir / "config.toml").read_bytes()
    metrics = run_dir / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes()[:50])
    longer = config_from_dict(small_config_dict(tmp_path, federation={"rounds": 2}))
    with pytest.raises(ConfigError, match="shortened"):
        run_simulation(longer, progress=False, resume=True)
    assert (run_dir / "config.toml").read_bytes() == config_before


def test_resume_never_truncates_metrics_on_a_checkpoints_word_alone(tmp_path):
    """Even a checkpoint signed with the key (a bug, a stolen key) cannot make resume drop rounds it holds."""
    import hashlib
    from dataclasses import replace

    from conftest import small_config_dict
    from fgrpo.deploy.runtime import run_simulation

    run_simulation(config_from_dict(small_config_dict(tmp_path, federation={"rounds": 1})), progress=False)
    run_dir = tmp_path / "run"
    metrics = run_dir / "metrics.jsonl"
    original = metrics.read_bytes()
    honest = load_checkpoint(run_dir)
    longer = config_from_dict(small_config_dict(tmp_path, federation={"rounds": 2}))
    lies = {
        "no metrics hash": replace(honest, metrics_offset=0, metrics_sha256=None),
        "the hash of nothing": replace(honest, metrics_offset=0, metrics_sha256=hashlib.sha256(b"").hexdigest()),
    }
    for why, lie in lies.items():
        save_checkpoint(run_dir, lie)
        with pytest.raises(ConfigError, match="cannot resume: .*metrics.jsonl"):
            run_simulation(longer, progress=False, resume=True)
        assert metrics.read_bytes() == original, why
    save_checkpoint(run_dir, honest)
    metrics.write_bytes(original + b'{"kind": "round", "round": 2, "method": "fgrpo"}\n{"kind": "cl')  # a cut round
    assert run_simulation(longer, progress=False, resume=True)["rounds"] == 2  # that round is dropped and redone
    rounds = [json.loads(line)["round"] for line in metrics.read_text().splitlines()]
    assert rounds[: original.count(b"\n")] == [json.loads(line)["round"] for line in original.decode().splitlines()]
    assert rounds.count(2) >= 1 and all(r in (0, 1, 2) for r in rounds)
