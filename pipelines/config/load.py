"""YAML + dotted KEY=VALUE overrides -> validated PipelineConfig, with one-line errors."""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from pipelines.config.schema import PipelineConfig
from pipelines.config.tune_space import ALPHA_RATIO
from pipelines.core.errors import UserError


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where '1e-4' is a string; overrides like train.lr=1e-4 and
    tune ranges like [1e-5, 1e-3] mean numbers (YAML 1.2)."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=1e-4' -> (['train', 'lr'], 1e-4); the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise UserError(f"override {item!r} is not KEY=VALUE (e.g. train.lr=1e-4)")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override {item!r} has an empty key")
    try:
        value = yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise UserError(f"override {item!r}: {part!r} is not a section")
            node = node[part]
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"config {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config {p} must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> PipelineConfig:
    data = apply_overrides(read_yaml(path), overrides)
    return validate_config(data, source=str(path))


def validate_config(data: dict, source: str = "config") -> PipelineConfig:
    """The schema, its cross-field rules, and (with a tune section) every searched key and value."""
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(f"{source}: {describe_validation_error(e, PipelineConfig)}") from None
    if cfg.tune is not None:
        check_tune_space(cfg, source)
    return cfg


def check_tune_space(cfg: PipelineConfig, source: str) -> None:
    """Each searched key is a config key, and the base config validates with each choice and
    each bound applied: a bad range fails here, not in trial 7."""
    for key, dist in cfg.tune.space.items():
        if key == ALPHA_RATIO:
            bad = [v for v in dist.probe_values() if not isinstance(v, (int, float)) or v <= 0]
            if bad:
                raise UserError(f"{source}: tune.space.{key}: value {bad[0]!r} must be a positive number")
            continue
        *parents, leaf = key.split(".")
        valid = fields_at(PipelineConfig, parents)
        if leaf not in valid:
            near = nearest_key(leaf, valid)
            hint = f"; did you mean {'.'.join(parents + near)!r}?" if near else ""
            raise UserError(f"{source}: tune.space key {key!r} is not a config key{hint}")
        for value in dist.probe_values():
            apply_trial_values(cfg, {key: value}, source=f"{source}: tune.space.{key}")


def apply_trial_values(cfg: PipelineConfig, values: dict[str, Any], source: str = "trial") -> PipelineConfig:
    """A validated copy of cfg (without its tune section) with `values` applied: dotted keys,
    plus lora.alpha_ratio (alpha = ratio * the rank after the other values)."""
    data = cfg.model_dump(mode="json")
    data["tune"] = None
    if "model.quantization" in values and "method" not in values:
        del data["method"]  # inferred again from the searched quantization (qlora <-> lora)
    ratio = values.get(ALPHA_RATIO)
    for key, value in values.items():
        if key == ALPHA_RATIO:
            continue
        node = data
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    if ratio is not None:
        data["lora"]["alpha"] = float(ratio) * data["lora"]["r"]
    return validate_config(data, source=source)


def describe_validation_error(err: ValidationError, schema: type[BaseModel]) -> str:
    """The first error as one line: dotted key, what was given, what is allowed."""
    first = err.errors()[0]
    # Drop pydantic's union-member tags (e.g. "literal['all-linear']", "list[str]") from the key.
    loc = [str(p) for p in first["loc"] if not re.search(r"[\[\]]", str(p))]
    key = ".".join(loc) or "(root)"
    if first["type"] == "extra_forbidden":
        valid = fields_at(schema, loc[:-1])
        near = nearest_key(loc[-1], valid)
        hint = f"; did you mean {'.'.join(loc[:-1] + near)!r}?" if near else f"; valid keys: {', '.join(valid)}"
        return f"unknown key {key!r}{hint}"
    if first["type"] == "missing":
        return f"missing required key {key!r}"
    msg = first["msg"].removeprefix("Value error, ")
    if "input" in first and first["type"] != "value_error" and loc:
        return f"{key}={first['input']!r}: {msg}"
    return f"{key}: {msg}" if loc else msg


def nearest_key(bad: str, valid: list[str]) -> list[str]:
    """The valid key a typo most likely meant: a close spelling, else a shared prefix (rank -> r)."""
    close = difflib.get_close_matches(bad, valid, n=1, cutoff=0.6)
    if close:
        return close
    prefixed = [v for v in valid if bad.startswith(v) or v.startswith(bad)]
    return sorted(prefixed, key=len, reverse=True)[:1]


def fields_at(schema: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names of the (nested) section at loc, for 'did you mean'."""
    model = schema
    for part in loc:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return []
        model = inner[0]
    return list(model.model_fields)


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_from_yaml_text(text: str) -> PipelineConfig:
    return validate_config(yaml_load(text), source="config.yaml")
