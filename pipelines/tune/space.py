"""The tune section as Ray Tune sees it: sampling domains, the base config as the first point, and
the JSON encoding of choice values Optuna cannot hold (lists such as target-module sets)."""
from __future__ import annotations

import json
from typing import Any, Optional

from pipelines.config.schema import PipelineConfig
from pipelines.config.tune_space import ALPHA_RATIO, TuneSection

ENCODED = "__json__:"  # choice values Optuna cannot hold (lists) travel as JSON strings


def encode_space(space: dict) -> dict:
    from ray.tune.search.sample import Categorical

    for key, dom in space.items():
        if isinstance(dom, Categorical) and any(not isinstance(c, (str, int, float, bool, type(None))) for c in dom.categories):
            dom.categories = [ENCODED + json.dumps(c) for c in dom.categories]
    return space


def decode_values(values: dict) -> dict:
    return {k: json.loads(v[len(ENCODED):]) if isinstance(v, str) and v.startswith(ENCODED) else v
            for k, v in values.items()}


def default_point(cfg: PipelineConfig, section: TuneSection) -> Optional[dict]:
    """The base config's own values as the first suggestion (TPE and random search), so the search
    tries the config as written before anything else; None when a base value lies outside its
    searched domain (then it is not tried). A grid tries only its grid points."""
    point = {}
    data = cfg.model_dump(mode="json")
    for key, dist in section.space.items():
        if key == ALPHA_RATIO:
            value: Any = cfg.lora.alpha / cfg.lora.r
        else:
            value = data
            for part in key.split("."):
                value = value[part]
        inside = (value in dist.choice) if dist.choice is not None else \
            (getattr(dist, dist.kind)[0] <= value <= getattr(dist, dist.kind)[1])
        if not inside:
            return None
        point[key] = ENCODED + json.dumps(value) if isinstance(value, (list, dict)) else value
    return point


def to_ray_space(section: TuneSection) -> dict:
    """Ray Tune sampling objects; grid uses grid_search over the grid values."""
    from ray import tune

    space = {}
    for key, d in section.space.items():
        if section.search == "grid":
            space[key] = tune.grid_search(d.grid_values(section.grid_points))
        elif d.kind == "choice":
            space[key] = tune.choice(d.choice)
        elif d.kind == "uniform":
            space[key] = tune.uniform(*d.uniform)
        elif d.kind == "loguniform":
            space[key] = tune.loguniform(*d.loguniform)
        else:
            space[key] = tune.randint(*d.randint)
    return space
