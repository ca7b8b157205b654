"""Embedded defaults that more than one stage falls back on (one definition each)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def default_tracking_uri(explicit: Optional[str] = None) -> str:
    """--tracking-uri / mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else the embedded sqlite
    store in the working directory."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"
