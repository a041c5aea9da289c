"""Engine config: every shipped YAML loads, unknown keys and bad values are refused naming the key,
overrides are typed, and the fingerprint is stable."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tailoredgen_train.config import DataConfig, EngineConfig, engine_config_from_dict, load_engine_config
from tailoredgen_train.errors import ConfigError
from tailoredgen_train.families import (
    FAMILIES,
    check_config_family,
    family_class,
    family_for_config,
    family_for_version,
    load_version_map,
)

REPO = Path(__file__).resolve().parents[1]
# engine configs are named after their family: fibo.yaml, bria-3.2-tiny.yaml, ...
SHIPPED_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name != "versions.yaml")
FIBO_TINY = REPO / "configs" / "fibo-tiny.yaml"


def _write(tmp_path: Path, raw, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def test_there_are_shipped_configs():
    assert {p.name for p in SHIPPED_CONFIGS} >= {f"{f}{s}.yaml" for f in FAMILIES for s in ("", "-tiny")}


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_its_family_accepts_its_model_section(path):
    cfg = load_engine_config(path)
    assert isinstance(cfg, EngineConfig)
    family_name = path.stem.removesuffix("-tiny")
    assert cfg.family == family_name  # declared, so that another family's training_version is refused
    family = family_class(family_name)(cfg.model)
    for key, value in cfg.model.items():
        assert getattr(family.options, key) == value
    # and no other family takes it silently when it has family-specific keys
    for other in set(FAMILIES) - {family_name}:
        if set(cfg.model) - set(family_class(other).options_cls.__dataclass_fields__):
            with pytest.raises(ConfigError):
                family_class(other)(cfg.model)


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("version", ["fibo", "max", "light", "3.2", "2.3"])
def test_a_shipped_config_trains_exactly_the_versions_of_its_family(path, version):
    cfg = load_engine_config(path)
    version_family = load_version_map()[version]
    if version_family == cfg.family:
        assert family_for_config(version, cfg).name == cfg.family
    else:
        with pytest.raises(ConfigError, match=f"family mismatch: the engine config is written for family "
                                              f"{cfg.family} .* trains family {version_family}"):
            family_for_config(version, cfg)


def test_a_config_without_a_family_fits_every_family():
    for version in ("fibo", "max", "light"):
        assert family_for_config(version, EngineConfig()).name == load_version_map()[version]


def test_an_unknown_family_key_is_refused_with_the_closest_name(tmp_path):
    cfg = load_engine_config(_write(tmp_path, {"family": "fibbo"}))
    with pytest.raises(ConfigError, match=r"family='fibbo' is not a model family \(did you mean fibo\?\)"):
        family_for_config("fibo", cfg)
    with pytest.raises(ConfigError, match="family=3 should name a model family"):
        load_engine_config(_write(tmp_path, {"family": 3}))


def test_the_family_check_names_who_asks_for_which_family():
    cfg = load_engine_config(REPO / "configs" / "bria-2.3.yaml")
    check_config_family(cfg, "bria-2.3", source="x", wanted_by="y")  # its own family passes
    with pytest.raises(ConfigError) as info:
        check_config_family(cfg, "fibo", source="--engine-config fibo=c.yaml", wanted_by="it is given for family fibo",
                            version_map=load_version_map())
    assert info.value.message == (
        "family mismatch: --engine-config fibo=c.yaml is written for family bria-2.3 (its family: key), but it is "
        "given for family fibo. Pass a fibo config (configs/fibo.yaml, or configs/fibo-tiny.yaml for the tiny demo "
        "base), or train a bria-2.3 version (2.3, light)."
    )


def test_defaults_load_without_a_file():
    assert load_engine_config(None) == EngineConfig()


def test_packaged_version_map_covers_all_five_versions():
    assert load_version_map() == {
        "fibo": "fibo", "3.2": "bria-3.2", "2.3": "bria-2.3", "max": "bria-3.2", "light": "bria-2.3"
    }


# ---- unknown keys --------------------------------------------------------------------------------


def test_unknown_top_level_section_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="trainer"):
        load_engine_config(_write(tmp_path, {"trainer": {"steps": 1}}))


def test_misspelt_key_inside_a_section_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.resolutoin"):
        load_engine_config(_write(tmp_path, {"data": {"resolutoin": 512}}))


def test_unknown_model_key_is_refused_by_the_fibo_family(tmp_path):
    cfg = load_engine_config(_write(tmp_path, {"model": {"max_seq_len": 512}}))
    with pytest.raises(ConfigError, match=r"model\.max_seq_len \(did you mean model\.max_sequence_length\?\)"):
        family_for_version("fibo", cfg.model)


@pytest.mark.parametrize(("raw", "message"), [
    ({"dta": {"resolution": 512}}, "unknown section(s) dta (did you mean data?)"),
    ({"data": {"resolutoin": 512}}, "unknown key(s) data.resolutoin (did you mean data.resolution?)"),
    ({"optim": {"learning_rate": 1e-4}}, "unknown key(s) optim.learning_rate (learning_rate is a training "
                                         "parameter, not an engine option: pass --learning-rate to train)"),
    ({"rank": 64}, "unknown section(s) rank (rank is a training parameter"),
    ({"data": {"zzz": 1}}, "unknown key(s) data.zzz; 'data' accepts"),  # nothing close: no guess
    ({"run": {"stop_after_step": 2}}, "unknown key(s) run.stop_after_step (did you mean run.stop_after_steps?)"),
    ({"optim": {"gradient_accumulation_steps": 4}}, "unknown key(s) optim.gradient_accumulation_steps (replaced by "
                                                    "optim.global_batch_size"),
])
def test_an_unknown_key_in_a_file_is_blamed_on_the_file_with_the_closest_name(tmp_path, raw, message):
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_engine_config(path)
    assert info.value.message.startswith(f"{path}: {message}")


@pytest.mark.parametrize(("override", "message"), [
    ("data.resolutoin=512", "--set data.resolutoin=512: unknown key data.resolutoin (did you mean data.resolution?)"),
    ("dta.resolution=512", "--set dta.resolution=512: unknown section dta (did you mean data?)"),
    ("data.batch_size=four", "--set data.batch_size=four: data.batch_size='four' should be of type int"),
    ("data.batch_size=0", "--set data.batch_size=0: config field data.batch_size=0 is invalid"),
    ("run.stop_after_steps=two", "--set run.stop_after_steps=two: run.stop_after_steps='two' should be of type int "
                                 "or null"),
    ("data.resolution=[512", "--set data.resolution=[512: the value is not valid YAML"),
    ("data.resolution.x=1", "--set data.resolution.x=1: name one key as section.key=value"),
])
def test_a_bad_override_is_blamed_on_the_set_not_on_the_file(override, message):
    with pytest.raises(ConfigError) as info:
        load_engine_config(FIBO_TINY, [override])
    assert info.value.message.startswith(message) and str(FIBO_TINY) not in info.value.message


def test_a_bad_value_in_the_file_is_still_blamed_on_the_file(tmp_path):
    path = _write(tmp_path, {"data": {"batch_size": 0}})
    with pytest.raises(ConfigError) as info:  # an override of another key leaves the blame where it belongs
        load_engine_config(path, ["data.resolution=512"])
    assert info.value.message.startswith(f"{path}: config field data.batch_size=0 is invalid")


@pytest.mark.parametrize(("family", "options", "key"), [
    ("fibo", {"max_sequence_length": "abc"}, "model.max_sequence_length='abc' should be of type int"),
    ("fibo", {"logit_normal_std": True}, "model.logit_normal_std=True should be of type float or int"),
    ("bria-3.2", {"shift": "four"}, "model.shift='four' should be of type float or int"),
    ("bria-2.3", {"snr_gamma": "5"}, "model.snr_gamma='5' should be of type float or int or null"),
])
def test_a_wrongly_typed_model_option_is_a_config_error(family, options, key):
    with pytest.raises(ConfigError) as info:  # not a TypeError from the family's range check
        family_class(family)(options)
    assert info.value.message.startswith(key)
    family_class("bria-2.3")({"snr_gamma": None})  # null where the option allows it


@pytest.mark.parametrize("section", ["data", "model"])
def test_section_that_is_not_a_mapping_is_refused(tmp_path, section):
    with pytest.raises(ConfigError, match=section):
        load_engine_config(_write(tmp_path, {section: [1, 2]}))


@pytest.mark.parametrize(("global_batch", "batch_size", "processes", "accumulation"), [
    (4, 1, 1, 4), (4, 1, 2, 2), (4, 1, 4, 1), (4, 2, 1, 2), (6, 1, 3, 2), (8, 2, 2, 2),
])
def test_accumulation_is_the_global_batch_shared_by_micro_batches_and_processes(global_batch, batch_size, processes,
                                                                              accumulation):
    config = engine_config_from_dict({"optim": {"global_batch_size": global_batch}, "data": {"batch_size": batch_size}})
    assert config.accumulation_steps(processes) == accumulation


def test_a_global_batch_the_processes_cannot_share_is_refused_with_the_numbers():
    config = load_engine_config(REPO / "configs" / "fibo.yaml")  # Bria's 1 x 4
    with pytest.raises(ConfigError) as info:
        config.accumulation_steps(8)
    assert info.value.message == (
        "optim.global_batch_size=4 is not a multiple of data.batch_size (1) x 8 process(es) = 8: use a global batch "
        "size that is a multiple of 8 (e.g. 8), a data.batch_size that divides it, or run on 1 or 2 or 4 process(es)")
    with pytest.raises(ConfigError, match=r"= 3: .*\(e\.g\. 6\)"):
        engine_config_from_dict({"optim": {"global_batch_size": 4}}).accumulation_steps(3)


# ---- invalid values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, field_path",
    [
        ({"data": {"batch_size": 0}}, "data.batch_size"),
        ({"data": {"resolution": 32}}, "data.resolution"),
        ({"data": {"num_workers": -1}}, "data.num_workers"),
        ({"optim": {"adam_beta1": 1.0}}, "optim.adam_beta1"),
        ({"optim": {"global_batch_size": 0}}, "optim.global_batch_size"),
        ({"optim": {"adam_epsilon": 0}}, "optim.adam_epsilon"),
        ({"run": {"mixed_precision": "fp16"}}, "run.mixed_precision"),
        ({"run": {"log_with": "wandb"}}, "run.log_with"),
        ({"run": {"seed": -1}}, "run.seed"),
        ({"lora": {"target_modules": []}}, "lora.target_modules"),
        ({"lora": {"init": "kaiming"}}, "lora.init"),
    ],
)
def test_invalid_value_is_refused_naming_section_and_field(tmp_path, raw, field_path):
    with pytest.raises(ConfigError) as info:
        load_engine_config(_write(tmp_path, raw))
    assert field_path in info.value.message


@pytest.mark.parametrize(
    "options, field_path",
    [
        ({"max_sequence_length": 5000}, "model.max_sequence_length"),
        ({"max_sequence_length": 0}, "model.max_sequence_length"),
        ({"uniform_sigma_fraction": 1.5}, "model.uniform_sigma_fraction"),
        ({"logit_normal_std": 0}, "model.logit_normal_std"),
    ],
)
def test_invalid_model_value_is_refused_by_the_family(tmp_path, options, field_path):
    cfg = load_engine_config(_write(tmp_path, {"model": options}))
    with pytest.raises(ConfigError) as info:
        family_for_version("fibo", cfg.model)
    assert field_path in info.value.message


def test_wrongly_typed_value_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="data"):
        load_engine_config(_write(tmp_path, {"data": {"batch_size": "four"}}))


# ---- overrides -----------------------------------------------------------------------------------


def test_overrides_apply_typed_values():
    cfg = load_engine_config(FIBO_TINY, ["data.resolution=512", "run.log_with=none"])
    assert cfg.data.resolution == 512
    assert type(cfg.data.resolution) is int
    assert cfg.run.log_with == "none"
    # the rest of the file is kept
    assert cfg.data.min_side == 128
    assert cfg.model == {"max_sequence_length": 3000}


def test_overrides_apply_without_a_file():
    cfg = load_engine_config(None, ["optim.weight_decay=0.01", "run.gradient_checkpointing=true"])
    assert cfg.optim.weight_decay == 0.01
    assert cfg.run.gradient_checkpointing is True


def test_override_creates_a_section_missing_from_the_file():
    cfg = load_engine_config(FIBO_TINY, ["optim.adam_beta2=0.99", "model.logit_normal_std=0.5"])
    assert cfg.optim.adam_beta2 == 0.99
    assert cfg.model["logit_normal_std"] == 0.5


@pytest.mark.parametrize("override", ["data.resolution", "resolution512"])
def test_malformed_override_is_refused(override):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_engine_config(FIBO_TINY, [override])


def test_override_of_an_unknown_key_is_refused():
    with pytest.raises(ConfigError, match=r"data\.resolutoin"):
        load_engine_config(FIBO_TINY, ["data.resolutoin=512"])


def test_override_with_an_invalid_value_is_refused():
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        load_engine_config(FIBO_TINY, ["data.batch_size=0"])


# ---- bad files -----------------------------------------------------------------------------------


def test_missing_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_engine_config(path)
    assert str(path) in info.value.message


def test_invalid_yaml_is_refused_naming_the_file(tmp_path):
    path = _write(tmp_path, "data: [unclosed\n  resolution: : 512\n")
    with pytest.raises(ConfigError) as info:
        load_engine_config(path)
    assert info.value.message == (f"config file {path} is not valid YAML: expected ',' or ']', but got ':' "
                                  "at line 2, column 13")


def test_a_yaml_python_tag_is_refused_on_one_line_and_never_run(tmp_path):
    marker = tmp_path / "executed"
    path = _write(tmp_path, f'data: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError) as info:
        load_engine_config(path)
    assert str(path) in info.value.message and "python/object/apply:os.system" in info.value.message
    assert "\n" not in info.value.message and not marker.exists()


@pytest.mark.parametrize("text", ["- data\n- optim\n", "just a string\n", "42\n"])
def test_yaml_that_is_not_a_mapping_is_refused_naming_the_file(tmp_path, text):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_engine_config(path)
    assert str(path) in info.value.message


def test_binary_file_is_refused_naming_the_file(tmp_path):
    # e.g. an image or a weights file passed as --config by mistake
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    with pytest.raises(ConfigError) as info:
        load_engine_config(path)
    assert str(path) in info.value.message


def test_empty_file_gives_the_defaults(tmp_path):
    assert load_engine_config(_write(tmp_path, "")) == EngineConfig()


# ---- fingerprint ---------------------------------------------------------------------------------


def test_fingerprint_is_stable():
    assert EngineConfig().fingerprint() == EngineConfig().fingerprint()
    assert load_engine_config(FIBO_TINY).fingerprint() == load_engine_config(FIBO_TINY).fingerprint()


@pytest.mark.parametrize(
    "changed",
    [
        EngineConfig(data=DataConfig(resolution=512)),
        EngineConfig(model={"max_sequence_length": 512}),
    ],
)
def test_fingerprint_changes_when_a_value_changes(changed):
    assert changed.fingerprint() != EngineConfig().fingerprint()


def test_fingerprint_changes_with_an_override():
    base = load_engine_config(FIBO_TINY)
    assert load_engine_config(FIBO_TINY, ["run.seed=1"]).fingerprint() != base.fingerprint()
