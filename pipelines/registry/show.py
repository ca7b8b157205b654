"""`lorapipe registry list|show`: registered models, their versions, aliases and gate values."""
from __future__ import annotations

import time

from pipelines.core.errors import UserError
from pipelines.tracking.runs import client as mlflow_client
from pipelines.tracking.runs import reachable


def describe_model(name: str, tracking_uri: str) -> list[dict]:
    """Rows for `lorapipe registry show NAME`: version, aliases, gate metric, run, created."""
    reachable(tracking_uri)
    c = mlflow_client(tracking_uri)
    from mlflow.exceptions import MlflowException

    try:
        model = c.get_registered_model(name)
    except MlflowException:
        raise UserError(f"no registered model named {name!r}") from None
    aliases: dict[str, list[str]] = {}
    for alias, v in (model.aliases or {}).items():
        aliases.setdefault(str(v), []).append(alias)
    rows = []
    for mv in sorted(c.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        metric = mv.tags.get("lorapipe.gate_metric", "eval_loss")
        rows.append({"version": mv.version, "aliases": ",".join(sorted(aliases.get(str(mv.version), []))),
                     "gate_metric": metric, "value": mv.tags.get(f"lorapipe.metric.{metric}", ""),
                     "run_id": mv.run_id,
                     "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(mv.creation_timestamp / 1000))})
    return rows


def list_models(tracking_uri: str) -> list[dict]:
    reachable(tracking_uri)
    c = mlflow_client(tracking_uri)
    return [{"name": m.name, "latest": max((int(v.version) for v in (m.latest_versions or [])), default=0),
             "aliases": ", ".join(f"{a}=v{v}" for a, v in sorted((m.aliases or {}).items()))}
            for m in c.search_registered_models()]
