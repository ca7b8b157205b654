"""The config schema and loader: shipped presets validate, bad values give one-line errors that
name the key, cross-field rules bite, overrides parse as YAML, derived figures and round trips."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pipelines.config.load import (
    apply_overrides,
    config_from_yaml_text,
    dump_config,
    load_config,
    parse_override,
    read_yaml,
    validate_config,
)
from pipelines.config.schema import PipelineConfig
from pipelines.core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
TINY = ROOT / "configs" / "tiny-cpu.yaml"


def minimal(**sections) -> dict:
    """The smallest valid config (an unquantized base so that ZeRO rules stay out of the way)."""
    data = {"model": {"path": "some/model", "quantization": "none"}, "data": {"path": "rows.jsonl"}}
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return data


def error_of(data: dict) -> str:
    with pytest.raises(UserError) as exc:
        validate_config(data)
    msg = str(exc.value)
    assert "\n" not in msg, f"error is not one line: {msg!r}"
    assert "Traceback" not in msg
    return msg


# --------------------------------------------------------------------------- presets
def test_there_are_presets():
    names = {p.name for p in PRESETS}
    assert "tiny-cpu.yaml" in names
    assert len(PRESETS) >= 2


def leaves(data, prefix=()):
    """(key path, value) for every scalar or list written in a YAML mapping. `tune.space` (its keys
    are dotted config paths) is compared whole."""
    for key, value in data.items():
        if isinstance(value, dict) and value and prefix + (key,) != ("tune", "space"):
            yield from leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_every_top_level_preset_validates_alone(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    # Every value the file writes is what the config holds (no silent renames, drops or coercions).
    resolved = cfg.model_dump(mode="json")
    for key, value in leaves(read_yaml(path)):
        node = resolved
        for part in key:
            node = node[part]
        assert node == value, f"{path.name}: {key} is {node!r} after validation, the file says {value!r}"


def test_tiny_preset_figures():
    cfg = load_config(TINY)
    assert cfg.model.quantization == "nf4" and cfg.model.dtype == "fp32"
    assert cfg.lora.r == 8 and cfg.lora.alpha == 16
    assert cfg.global_batch_size() == 8 * 1 * 2


# --------------------------------------------------------------------------- unknown keys
@pytest.mark.parametrize("overrides, bad, suggestion", [
    (["lora.rr=3"], "lora.rr", "lora.r"),
    (["lora.alhpa=3"], "lora.alhpa", "lora.alpha"),
    (["train.learning_rat=0.1"], "train.learning_rat", None),
    (["trian.lr=0.1"], "trian", "train"),
    (["model.quant_storag=bf16"], "model.quant_storag", "model.quant_storage"),
    (["deepspeed.stag=3"], "deepspeed.stag", "deepspeed.stage"),
])
def test_unknown_key_names_the_nearest_valid_key(overrides, bad, suggestion):
    with pytest.raises(UserError) as exc:
        load_config(TINY, overrides)
    msg = str(exc.value)
    assert "\n" not in msg
    assert f"unknown key {bad!r}" in msg
    if suggestion:
        assert f"did you mean {suggestion!r}" in msg
    else:
        assert "did you mean" not in msg


def test_unknown_key_without_near_match_lists_the_valid_keys():
    msg = error_of(minimal(lora={"zzzzzz": 1}))
    assert "unknown key 'lora.zzzzzz'" in msg
    for key in ("r", "alpha", "dropout", "target_modules", "use_rslora", "use_dora", "bias"):
        assert key in msg


def test_unknown_top_level_key():
    data = minimal()
    data["lroa"] = {"r": 3}
    assert "did you mean 'lora'" in error_of(data)


# --------------------------------------------------------------------------- ranges
@pytest.mark.parametrize("section, key, value", [
    ("lora", "r", 0),
    ("lora", "r", -4),
    ("train", "lr", 0),
    ("train", "lr", -1e-4),
    ("lora", "dropout", 1.0),
    ("lora", "dropout", -0.1),
    ("deepspeed", "stage", 4),
    ("deepspeed", "stage", -1),
])
def test_out_of_range_value_is_one_line_naming_the_key(section, key, value):
    msg = error_of(minimal(**{section: {key: value}}))
    assert f"{section}.{key}={value!r}" in msg


@pytest.mark.parametrize("section, key, value", [
    ("lora", "r", 1), ("lora", "dropout", 0.0), ("lora", "dropout", 0.999),
    ("deepspeed", "stage", 0), ("deepspeed", "stage", 3), ("train", "lr", 1.0),
])
def test_boundary_values_are_accepted(section, key, value):
    cfg = validate_config(minimal(**{section: {key: value}}))
    assert getattr(getattr(cfg, section), key) == value


def test_missing_required_section_names_it():
    data = minimal()
    del data["data"]
    assert "missing required key 'data'" in error_of(data)


def test_empty_target_modules_rejected():
    assert "lora.target_modules" in error_of(minimal(lora={"target_modules": []}))


# --------------------------------------------------------------------------- cross-field rules
def test_zero3_with_4bit_needs_quant_storage_equal_to_dtype():
    bad = minimal(model={"quantization": "nf4", "dtype": "bf16"}, deepspeed={"stage": 3})
    msg = error_of(bad)
    assert "model.quant_storage" in msg and "deepspeed.stage=3" in msg
    mismatched = minimal(model={"quantization": "nf4", "dtype": "bf16", "quant_storage": "fp32"},
                         deepspeed={"stage": 3})
    assert "model.quant_storage" in error_of(mismatched)
    ok = validate_config(minimal(model={"quantization": "nf4", "dtype": "bf16", "quant_storage": "bf16"},
                                 deepspeed={"stage": 3}))
    assert ok.model.quant_storage == "bf16"
    # Stage 2 does not partition parameters: uint8 storage is fine there.
    assert validate_config(minimal(model={"quantization": "nf4"}, deepspeed={"stage": 2})).deepspeed.stage == 2
    # Unquantized ZeRO-3 has no packed weights to worry about.
    assert validate_config(minimal(deepspeed={"stage": 3})).deepspeed.stage == 3


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_offload_params_needs_stage_3(stage):
    msg = error_of(minimal(deepspeed={"stage": stage, "offload_params": "cpu"}))
    assert "deepspeed.offload_params" in msg and "stage=3" in msg
    ok = validate_config(minimal(deepspeed={"stage": 3, "offload_params": "cpu"}))
    assert ok.deepspeed.offload_params == "cpu"


@pytest.mark.parametrize("warmup, ok", [(99, True), (100, False), (150, False)])
def test_warmup_steps_below_max_steps(warmup, ok):
    data = minimal(train={"max_steps": 100, "warmup_steps": warmup, "eval_every": 50})
    if ok:
        assert validate_config(data).train.warmup_steps == warmup
    else:
        msg = error_of(data)
        assert "train.warmup_steps" in msg and "train.max_steps" in msg


@pytest.mark.parametrize("eval_every, ok", [(100, True), (101, False)])
def test_eval_every_at_most_max_steps(eval_every, ok):
    data = minimal(train={"max_steps": 100, "eval_every": eval_every})
    if ok:
        assert validate_config(data).train.eval_every == eval_every
    else:
        msg = error_of(data)
        assert "train.eval_every=101" in msg and "train.max_steps=100" in msg


def test_train_on_prompt_with_text_format_rejected():
    msg = error_of(minimal(data={"format": "text", "train_on_prompt": True}))
    assert "data.train_on_prompt" in msg
    for fmt in ("alpaca", "chat"):
        assert validate_config(minimal(data={"format": fmt, "train_on_prompt": True})).data.train_on_prompt


# --------------------------------------------------------------------------- overrides
@pytest.mark.parametrize("item, path, value", [
    ("train.max_steps=7", ["train", "max_steps"], 7),
    ("train.lr=0.001", ["train", "lr"], 0.001),
    ("lora.target_modules=[q_proj, v_proj]", ["lora", "target_modules"], ["q_proj", "v_proj"]),
    ("model.quant_storage=null", ["model", "quant_storage"], None),
    ("lora.use_dora=true", ["lora", "use_dora"], True),
    ("name=my-run", ["name"], "my-run"),
    ("run.name=a=b", ["run", "name"], "a=b"),
    ("tune.space={lr: [1, 2]}", ["tune", "space"], {"lr": [1, 2]}),
])
def test_override_values_parse_as_yaml(item, path, value):
    assert parse_override(item) == (path, value)


def test_override_exponent_numbers_are_numbers():
    # The docstring promises 'train.lr=1e-4' -> 1e-4. PyYAML's YAML 1.1 resolver reads '1e-4'
    # (no dot) as a string; pydantic hides that for float fields, but a choice list in a tune
    # space (any type allowed) would keep strings.
    assert parse_override("train.lr=1e-4")[1] == 1e-4
    assert load_config(TINY, ["train.lr=1e-4"]).train.lr == 1e-4
    cfg = load_config(TINY, ["tune.space={train.lr: {choice: [1e-5, 1e-3]}}", "tune.asha.enabled=false"])
    assert cfg.tune.space["train.lr"].choice == [1e-5, 1e-3]


def test_overrides_create_nested_keys_and_replace_values():
    data = {"train": {"lr": 0.1}}
    out = apply_overrides(data, ["train.lr=0.5", "tune.space.lr=[1, 2]", "run.name=x"])
    assert out == {"train": {"lr": 0.5}, "tune": {"space": {"lr": [1, 2]}}, "run": {"name": "x"}}
    # A null section is replaced by a fresh one.
    assert apply_overrides({"tune": None}, ["tune.metric=eval_loss"]) == {"tune": {"metric": "eval_loss"}}


def test_overrides_applied_by_load_config():
    cfg = load_config(TINY, ["train.max_steps=12", "train.eval_every=6", "lora.target_modules=[q_proj]",
                             "model.quant_storage=null", "scaling.num_workers=3"])
    assert cfg.train.max_steps == 12 and cfg.train.eval_every == 6
    assert cfg.lora.target_modules == ["q_proj"]
    assert cfg.model.quant_storage is None
    assert cfg.scaling.num_workers == 3
    # The file itself is untouched by overrides.
    assert load_config(TINY).train.max_steps == 30


@pytest.mark.parametrize("item", ["train.lr", "justtext", ""])
def test_override_without_equals_rejected(item):
    with pytest.raises(UserError) as exc:
        parse_override(item)
    assert "KEY=VALUE" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("item", ["=3", "train..lr=3", ".lr=3", "train.=3"])
def test_override_with_empty_key_part_rejected(item):
    with pytest.raises(UserError, match="empty key"):
        parse_override(item)


def test_override_through_a_scalar_rejected():
    with pytest.raises(UserError, match="'lr' is not a section"):
        apply_overrides({"train": {"lr": 0.1}}, ["train.lr.x=1"])


def test_override_that_breaks_a_rule_is_reported_with_the_key():
    with pytest.raises(UserError) as exc:
        load_config(TINY, ["lora.r=0"])
    assert "lora.r=0" in str(exc.value) and str(exc.value).startswith(str(TINY))


# --------------------------------------------------------------------------- files
def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed\n  path: x\n")
    with pytest.raises(UserError) as exc:
        load_config(p)
    assert "not valid YAML" in str(exc.value) and "\n" not in str(exc.value)


def test_non_mapping_yaml_file(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(p)


# --------------------------------------------------------------------------- derived + round trip
@pytest.mark.parametrize("micro, accum, workers", [(1, 1, 1), (4, 2, 2), (2, 8, 3), (3, 5, 7)])
def test_global_batch_size(micro, accum, workers):
    cfg = validate_config(minimal(train={"micro_batch_size": micro, "grad_accum": accum},
                                  scaling={"num_workers": workers}))
    assert cfg.global_batch_size() == micro * accum * workers


def test_run_and_registry_names_default_down_the_chain():
    cfg = validate_config(minimal(name="base"))
    assert cfg.run_name() == "base" and cfg.registry_name() == "base"
    cfg = validate_config({**minimal(name="base"), "run": {"name": "r1"}})
    assert cfg.run_name() == "r1" and cfg.registry_name() == "r1"
    cfg = validate_config({**minimal(name="base"), "run": {"name": "r1"}, "registry": {"name": "reg"}})
    assert cfg.registry_name() == "reg"


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_dump_config_round_trips(path):
    cfg = load_config(path, ["train.lr=0.0005", "lora.target_modules=[q_proj, v_proj]"])
    text = dump_config(cfg)
    again = config_from_yaml_text(text)
    assert again == cfg
    assert again.model_dump() == cfg.model_dump()
    assert dump_config(again) == text
    # The dump is complete: every section is written out, defaults included.
    dumped = yaml.safe_load(text)
    assert set(dumped) == set(PipelineConfig.model_fields)
    assert dumped["train"]["betas"] == list(cfg.train.betas)


def test_config_from_yaml_text_reports_bad_text():
    cfg = load_config(TINY)
    data = yaml.safe_load(dump_config(cfg))
    data["lora"]["rr"] = 3
    with pytest.raises(UserError) as exc:
        config_from_yaml_text(yaml.safe_dump(data))
    assert "did you mean 'lora.r'" in str(exc.value)


def test_validation_does_not_mutate_input():
    data = minimal(train={"max_steps": 10, "eval_every": 5})
    before = copy.deepcopy(data)
    validate_config(data)
    assert data == before


# --------------------------------------------------------------------------- method
@pytest.mark.parametrize("quantization, method", [("nf4", "qlora"), ("fp4", "qlora"), ("none", "lora")])
def test_method_is_inferred_from_the_quantization(quantization, method):
    assert validate_config(minimal(model={"quantization": quantization})).method == method


def test_method_defaults_to_qlora_with_the_default_quantization():
    data = minimal()
    del data["model"]["quantization"]  # the schema's default: nf4
    assert validate_config(data).method == "qlora"


@pytest.mark.parametrize("method, quantization", [("full", "none"), ("lora", "none"), ("qlora", "nf4")])
def test_a_method_alone_sets_the_quantization_it_needs(method, quantization):
    data = minimal(method=method)
    del data["model"]["quantization"]
    cfg = validate_config(data)
    assert (cfg.method, cfg.model.quantization) == (method, quantization)
    assert "quantization" not in data["model"]  # the input is not changed


def test_every_preset_keeps_its_meaning():
    assert load_config(TINY).method == "qlora" and not load_config(TINY).is_full


@pytest.mark.parametrize("method, quantization, words", [
    ("full", "nf4", "method=full trains every weight; a 4-bit base cannot be trained: set model.quantization=none"),
    ("qlora", "none", "method=qlora trains an adapter on a 4-bit base: set model.quantization=nf4"),
    ("lora", "fp4", "set model.quantization=none, or method=qlora"),
])
def test_method_and_quantization_must_agree(method, quantization, words):
    assert words in error_of(minimal(method=method, model={"quantization": quantization}))


def test_unknown_method_names_the_allowed_ones():
    msg = error_of(minimal(method="prefix"))
    assert "method='prefix'" in msg and "'full'" in msg


def test_full_finetuning_ignores_the_lora_section():
    cfg = validate_config(minimal(method="full", lora={"use_dora": True, "r": 64}))
    assert cfg.is_full and cfg.method == "full"


def test_full_method_survives_a_round_trip():
    cfg = load_config(TINY, ["method=full", "model.quantization=none"])
    assert config_from_yaml_text(dump_config(cfg)) == cfg


def test_a_searched_quantization_reinfers_the_method():
    from pipelines.config.load import apply_trial_values

    cfg = load_config(TINY)
    assert apply_trial_values(cfg, {"model.quantization": "none"}).method == "lora"
    full = load_config(TINY, ["method=full", "model.quantization=none"])
    assert apply_trial_values(full, {"train.lr": 1e-4}).method == "full"
