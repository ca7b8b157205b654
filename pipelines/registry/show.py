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
    from pipelines.eval.gate import gate_suite

    gate = gate_suite(c, name)
    rows = []
    for mv in sorted(c.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        metric, value = gate_value(mv, gate)
        rows.append({"version": mv.version, "aliases": ",".join(sorted(aliases.get(str(mv.version), []))),
                     "gate_metric": metric, "value": value,
                     "run_id": mv.run_id,
                     "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(mv.creation_timestamp / 1000))})
    return rows


def gate_value(mv, gate) -> tuple[str, str]:
    """The gate suite's primary metric for this version ("" until it has been evaluated on it);
    models registered before gate suites show their own eval_loss."""
    from pipelines.eval.record import version_result

    if gate is None:
        return "eval_loss (own split)", mv.tags.get("lorapipe.metric.eval_loss", "")
    result = version_result(mv, gate.fingerprint)
    value = result.metrics.get(gate.suite.primary.metric) if result else None
    return gate.suite.primary.metric, f"{value:.6g}" if value is not None else ""


def list_models(tracking_uri: str) -> list[dict]:
    reachable(tracking_uri)
    c = mlflow_client(tracking_uri)
    return [{"name": m.name, "latest": max((int(v.version) for v in (m.latest_versions or [])), default=0),
             "aliases": ", ".join(f"{a}=v{v}" for a, v in sorted((m.aliases or {}).items()))}
            for m in c.search_registered_models()]
