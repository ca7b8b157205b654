"""Embedded defaults that more than one stage falls back on (one definition each)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def default_tracking_uri(explicit: Optional[str] = None) -> str:
    """--tracking-uri / mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else the embedded sqlite
    store in the working directory."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


# The GPU catalogue (memory, peak FLOP/s, links, prices): `lorapipe plan` reads it, and the config
# checks scaling.gpu_kind against its names.
GPU_CATALOGUE_PATH = Path(__file__).resolve().parents[2] / "configs" / "gpus" / "catalogue.yaml"


def catalogued_gpus(path: Path = GPU_CATALOGUE_PATH) -> list[str]:
    """The GPU kinds of the catalogue (not its `cpu` mode)."""
    import yaml

    return [name for name, g in yaml.safe_load(Path(path).read_text())["gpus"].items() if g["memory_gib"] is not None]
