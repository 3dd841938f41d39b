import re
from pathlib import Path

import pytest

from fgrpo.config import Config, config_from_dict, dump_config, load_config, parse_override
from fgrpo.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_round_trip(tmp_path):
    config = Config()
    again = load_config(write(tmp_path, dump_config(config)))
    assert again == config


def test_typo_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "[grpo]\nnum_generation = 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    assert "grpo.num_generation" in message and "did you mean 'num_generations'" in message


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'trainer'"):
        load_config(write(tmp_path, "[trainer]\nsteps = 3\n"))


def test_wrong_type_and_range_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"grpo\.num_generations.*(integer|greater)"):
        load_config(write(tmp_path, "[grpo]\nnum_generations = 'eight'\n"))
    with pytest.raises(ConfigError, match=r"grpo\.num_generations: Input should be greater than or equal to 2"):
        load_config(write(tmp_path, "[grpo]\nnum_generations = 1\n"))
    with pytest.raises(ConfigError, match=r"grpo\.loss_type.*'grpo', 'bnpo', 'dr_grpo' or 'dapo'"):
        load_config(write(tmp_path, "[grpo]\nloss_type = 'ppo'\n"))


def test_reward_scale_must_be_ordered(tmp_path):
    text = "[[tasks.families]]\nname = 'add'\nreward_scale = [1.0, 0.0]\n"
    with pytest.raises(ConfigError, match=r"tasks\.families\[0\]\.reward_scale.*low < high"):
        load_config(write(tmp_path, text))


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[grpo\n"))


def test_overrides_win_and_parse_types(tmp_path):
    path = write(tmp_path, "[grpo]\nbeta = 0.0\n")
    config = load_config(path, parse_override("grpo.beta=0.04") | {"training": {"steps": 7}})
    assert config.grpo.beta == 0.04 and config.training.steps == 7
    assert parse_override("output.dir=runs/x") == {"output": {"dir": "runs/x"}}
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("grpo.beta")


def test_fgrpo_temperature_accepts_inf(tmp_path):
    config = load_config(write(tmp_path, "[federation.fgrpo]\ntemperature = inf\nw_min = 0.1\nw_max = 0.5\n"))
    assert config.federation.fgrpo.temperature == float("inf")
    assert load_config(write(tmp_path, dump_config(config))).federation.fgrpo.temperature == float("inf")
    with pytest.raises(ConfigError, match="w_min"):
        load_config(write(tmp_path, "[federation.fgrpo]\nw_min = 0.6\nw_max = 0.5\n"))


def test_defaults_are_safe_and_each_can_be_overridden_or_turned_off(tmp_path):
    defaults = load_config(write(tmp_path, "[federation]\n"))
    assert defaults.federation.defense.norm_clip == 1.5 and defaults.federation.defense.clip_multiple == 1.5
    assert defaults.federation.defense.norm_clip_mode == "scale"
    assert defaults.federation.fgrpo.w_max == "auto"
    off = load_config(write(tmp_path, '[federation.defense]\nnorm_clip = "off"\n[federation.fgrpo]\nw_max = 0.7\n'))
    assert off.federation.defense.clip_multiple is None and off.federation.fgrpo.w_max == 0.7
    # "off" survives the config.toml written next to a run (TOML has no null: None must not fall back to 1.5).
    again = load_config(write(tmp_path, dump_config(off)))
    assert again.federation.defense.clip_multiple is None and again.federation.fgrpo.w_max == 0.7
    assert load_config(write(tmp_path, "[federation.defense]\nnorm_clip = 3\n")).federation.defense.clip_multiple == 3.0
    assert parse_override("federation.defense.norm_clip=off") == {"federation": {"defense": {"norm_clip": "off"}}}


@pytest.mark.parametrize(
    "text, message",
    [
        ('[federation.defense]\nnorm_clip = "of"\n', "federation.defense.norm_clip: expected a number > 1 or 'off'"),
        ("[federation.defense]\nnorm_clip = 1.0\n", "federation.defense.norm_clip: expected a number > 1 or 'off'"),
        ('[federation.fgrpo]\nw_max = "aut"\n', r"federation.fgrpo.w_max: expected a number in \(0, 1\] or 'auto'"),
        ("[federation.fgrpo]\nw_max = 1.5\n", r"federation.fgrpo.w_max: expected a number in \(0, 1\] or 'auto'"),
    ],
)
def test_bad_norm_clip_or_w_max_gets_one_clear_error(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(write(tmp_path, text))
    assert str(error.value).count("\n") == 1  # one line for the key, not one per member of the union


def test_shipped_configs_load():
    root = Path(__file__).resolve().parents[1]
    for path in [*root.glob("examples/*.toml"), *root.glob("src/fgrpo/scenarios/*.toml")]:
        load_config(path)


def test_sources_section_checks_names_formats_and_suggests_keys(tmp_path):
    text = '[[tasks.sources]]\nname = "a"\npath = "a.jsonl"\n[[tasks.sources]]\nname = "a"\npath = "b.jsonl"\n'
    with pytest.raises(ConfigError, match="source names must be distinct.*repeated: a"):
        load_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"tasks\.sources\[0\]\.format.*'gsm8k', 'math' or 'generic'"):
        load_config(write(tmp_path, '[[tasks.sources]]\nname = "a"\npath = "a"\nformat = "csv"\n'))
    with pytest.raises(ConfigError, match="did you mean 'family_column'"):
        load_config(write(tmp_path, '[[tasks.sources]]\nname = "a"\npath = "a"\nfamily_col = "x"\n'))
    config = load_config(write(tmp_path, '[model]\nsystem_prompt = "Be brief."\n[[tasks.rewards]]\nname = "length_penalty"\nkwargs = { soft_cache = 16 }\n'))
    assert config.tasks.rewards[0].kwargs == {"soft_cache": 16} and config.model.lora.target_modules == "auto"
    assert load_config(write(tmp_path, dump_config(config))) == config


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"[grpo]\nbeta = 0.0\n# caf\xe9\n", r"line 3 is not UTF-8 text \(byte 0xe9\)"),
        (b"", "is empty"),
        (b"  \n\n", "is empty"),
    ],
)
def test_unreadable_or_empty_config_files_are_named(tmp_path, content, expected):
    path = tmp_path / "c.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_a_utf8_bom_is_accepted_and_a_directory_is_named_as_one(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b"\xef\xbb\xbf[grpo]\nbeta = 0.04\n")
    assert load_config(path).grpo.beta == 0.04
    with pytest.raises(ConfigError, match="is a directory; pass a TOML file"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    "data, key",
    [
        ({"training": {"seed": -1}}, "training.seed"),
        ({"training": {"seed": 2**40}}, "training.seed"),
        ({"model": {"device": "banana"}}, "model.device"),
        ({"grpo": {"learning_rate": float("inf")}}, "grpo.learning_rate"),
        ({"grpo": {"learning_rate": float("nan")}}, "grpo.learning_rate"),
        ({"tasks": {"families": [{"name": "add", "reward_scale": [0.0, 1e30]}]}}, "tasks.families[0].reward_scale"),
        ({"tasks": {"train_per_family": 100_000_000}}, "tasks.train_per_family"),
        ({"federation": {"num_clients": 2, "min_train_clients": 3}}, "min_train_clients"),
        ({"runtime": {"workers": 0}}, "runtime.workers"),
        ({"runtime": {"workers": "many"}}, "runtime.workers"),
        ({"runtime": {"threads": 1.5}}, "runtime.threads"),
        ({"runtime": {"threads": True}}, "runtime.threads"),
        ({"runtime": {"backend": "dask"}}, "runtime.backend"),
        ({"runtime": {"num_gpus_per_client": 2}}, "runtime.num_gpus_per_client"),
    ],
)
def test_values_that_used_to_fail_deep_inside_a_library_are_refused_by_key(data, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        config_from_dict(data)


def test_fgrpo_temperature_may_still_be_infinite():
    assert config_from_dict({"federation": {"fgrpo": {"temperature": "inf"}}}).federation.fgrpo.temperature == float("inf")


def test_no_families_on_the_tiny_model_is_refused_before_its_warm_start(tmp_path):
    from fgrpo.core.warmstart import train_warm_start

    config = config_from_dict({"tasks": {"families": [], "files": [{"path": str(tmp_path / "data.jsonl")}]}})
    with pytest.raises(ConfigError, match=r"tasks.families = \[\] but model.source = 'tiny' warm-starts on the built-in families"):
        train_warm_start(config.model.warm_start, config.tasks.families)


def test_federation_clients_set_num_clients_and_a_disagreeing_count_is_refused_by_key():
    owners = [{"families": [{"name": "add"}]}, {"families": [{"name": "sort"}]}]
    assert config_from_dict({"federation": {"clients": owners}}).federation.num_clients == 2
    assert config_from_dict({"federation": {"clients": owners, "num_clients": 2}}).federation.num_clients == 2
    with pytest.raises(ConfigError, match=r"federation.num_clients = 3 but federation.clients lists 2 owners"):
        config_from_dict({"federation": {"clients": owners, "num_clients": 3}})
    # The resolved config (num_clients written out) loads back unchanged.
    config = config_from_dict({"federation": {"clients": owners}})
    assert load_config_text(dump_config(config)) == config


def load_config_text(text: str):
    from fgrpo.config import tomllib

    return config_from_dict(tomllib.loads(text))


@pytest.mark.parametrize(
    "owner, key",
    [
        ({"families": [{"name": "add"}], "reward_scale": [1.0, 0.0]}, "federation.clients[1].reward_scale"),
        ({"families": [{"name": "add"}], "size": 0}, "federation.clients[1].size"),
        ({"families": [{"name": "add"}], "rewards": [{"name": "exact_match", "wieght": 2}]}, "federation.clients[1].rewards[0].wieght"),
        ({"sources": [{"name": "s"}]}, "federation.clients[1].sources[0].path"),
        ({"rewards": [{"name": "exact_match"}]}, "federation.clients[1] lists no data"),
        ({"name": "owner0", "families": [{"name": "add"}]}, "owner names must be distinct; repeated: owner0"),
    ],
)
def test_a_bad_owner_entry_is_refused_naming_its_key(owner, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        config_from_dict({"federation": {"clients": [{"families": [{"name": "sub"}]}, owner]}})


def test_trl_loss_options_are_checked_by_key():
    with pytest.raises(ConfigError, match=r"grpo\.delta"):
        config_from_dict({"grpo": {"delta": 0.9}})
    with pytest.raises(ConfigError, match=r"grpo\.importance_sampling_level"):
        config_from_dict({"grpo": {"importance_sampling_level": "seq"}})
    assert config_from_dict({"grpo": {"importance_sampling_level": "sequence"}}).grpo.delta is None
def test_runtime_counts_are_auto_or_whole_numbers_also_from_command_line_text():
    runtime = config_from_dict({"runtime": {"workers": "2", "threads": "auto"}}).runtime
    assert (runtime.workers, runtime.threads) == (2, "auto")
    assert (Config().runtime.workers, Config().runtime.threads) == ("auto", "auto")


def test_fgrpo_max_tilt_is_1_25_by_default_off_a_number_at_least_one_or_refused_naming_its_key():
    assert config_from_dict({}).federation.fgrpo.max_tilt == 1.25
    assert config_from_dict({"federation": {"fgrpo": {"max_tilt": "off"}}}).federation.fgrpo.max_tilt == "off"
    assert config_from_dict({"federation": {"fgrpo": {"max_tilt": 1.5}}}).federation.fgrpo.max_tilt == 1.5
    for bad in (0.5, "inf", "big"):
        with pytest.raises(ConfigError, match="max_tilt"):
            config_from_dict({"federation": {"fgrpo": {"max_tilt": bad}}})


# ------------------------------------------------------------------ silently accepted before (issue 24)


@pytest.mark.parametrize(
    "data, key, message",
    [
        ({"federation": {"rounds": True}}, "federation.rounds", "not true/false"),
        ({"grpo": {"learning_rate": True}}, "grpo.learning_rate", "not true/false"),
        ({"federation": {"fgrpo": {"temperature": False}}}, "federation.fgrpo.temperature", "not true/false"),
        ({"tasks": {"families": [{"name": "add", "reward_scale": [False, True]}]}}, "reward_scale", "not true/false"),
        ({"federation": {"rounds": 2**70}}, "federation.rounds", "64 bits"),
        ({"training": {"steps": 2**64}}, "training.steps", "64 bits"),
        ({"federation": {"rounds": 10**7}}, "federation.rounds", "less than or equal to 1000000"),
        ({"tasks": {"train_per_family": 10, "validation_per_family": 11}}, "validation_per_family = 11", "at most 5"),
        ({"tasks": {"rewards": [{"name": "exact_match", "weight": 0}]}}, "tasks.rewards", "every reward function has weight 0"),
        ({"federation": {"clients": [{"families": [{"name": "add"}], "rewards": [{"name": "format", "weight": 0.0}]}]}},
         "federation.clients[0].rewards", "weight 0"),
        ({"model": {"lora": {"rank": 4, "alpha": 1e9}}}, "model.lora.alpha / model.lora.rank", "beyond 256"),
        ({"grpo": {"learning_rate": 1e6}}, "grpo.learning_rate", "less than or equal to 1"),
    ],
)
def test_values_that_ran_silently_are_refused_by_key(data, key, message):
    with pytest.raises(ConfigError, match=f"{re.escape(key)}.*{message}"):
        config_from_dict(data)


def test_plain_values_still_pass():
    config = config_from_dict({"federation": {"rounds": 3}, "model": {"lora": {"rank": 4, "alpha": 16}},
                               "tasks": {"train_per_family": 10, "validation_per_family": 5,
                                         "rewards": [{"name": "exact_match"}, {"name": "format", "weight": 0}]}})
    assert config.federation.rounds == 3 and config.tasks.validation_per_family == 5
    assert config.model.lora.enabled is True


def test_the_default_validation_share_shrinks_to_fit_a_small_pool_and_round_trips(tmp_path):
    config = config_from_dict({"tasks": {"train_per_family": 40}})
    assert config.tasks.validation_per_family == 20  # what carve_validation takes (at most half), said in the config
    assert config_from_dict({}).tasks.validation_per_family == 100
    assert load_config(write(tmp_path, dump_config(config))) == config


def test_a_config_of_comments_only_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"sets nothing \(it holds only comments\).*'\[federation\]'"):
        load_config(write(tmp_path, "# [federation]\n# rounds = 3\n"))
    assert load_config(write(tmp_path, "[federation]\n")).federation.rounds == Config().federation.rounds


def test_dev_null_and_a_fifo_are_named_for_what_they_are(tmp_path):
    import os

    with pytest.raises(ConfigError, match="'/dev/null' is a character device, not a regular file"):
        load_config("/dev/null")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is a FIFO, not a regular file"):  # and is not read: that would block
        load_config(fifo)
