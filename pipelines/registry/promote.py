"""Aliases: move one to a version only when the gate says the version beats the alias's holder;
forced moves are recorded (who, when, why) as version tags."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

from pipelines.core.errors import UserError
from pipelines.registry.register import check_name
from pipelines.tracking.auth import authorize_alias_move
from pipelines.tracking.runs import client as mlflow_client
from pipelines.tracking.runs import reachable, with_retries


@dataclass
class Gate:
    metric: str
    mode: str
    margin: float

    def beats(self, candidate: float, current: float) -> bool:
        if self.mode == "min":
            return candidate < current - self.margin
        return candidate > current + self.margin


def version_metric(mv, metric: str) -> float:
    raw = mv.tags.get(f"lorapipe.metric.{metric}")
    if raw is None:
        raise UserError(f"version {mv.version} of {mv.name} has no {metric!r} metric to gate on")
    return float(raw)


def get_version(c, name: str, version: str):
    from mlflow.exceptions import MlflowException

    if not str(version).isdigit():
        raise UserError(f"version {version!r} is not a version number")
    try:
        return c.get_model_version(name, str(version))
    except MlflowException:
        raise UserError(f"{name} has no version {version}") from None


def current_alias(c, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


@dataclass
class Promotion:
    promoted: bool
    message: str


def promote(name: str, version: str, alias: str = "champion", *, force: bool = False, reason: str = "",
            tracking_uri: str, gate: Optional[Gate] = None, gated: bool = True) -> Promotion:
    """Move `alias` to `version` if it beats the alias's current version on the gate metric.
    gated=False is for aliases that simply track the latest output (e.g. `candidate`)."""
    reachable(tracking_uri)
    c = mlflow_client(tracking_uri)
    check_name(name)
    candidate = get_version(c, name, version)
    who = authorize_alias_move(tracking_uri, c, name, alias)  # before any write; names a missing permission
    gate = gate or Gate(candidate.tags.get("lorapipe.gate_metric", "eval_loss"),
                        candidate.tags.get("lorapipe.gate_mode", "min"),
                        float(candidate.tags.get("lorapipe.gate_margin", "0.0")))
    current = current_alias(c, name, alias)
    if current is not None and current.version == candidate.version:
        return Promotion(True, f"{name}@{alias} is already version {version}")
    cand_value = version_metric(candidate, gate.metric)
    if current is not None and not force and gated:
        cur_value = version_metric(current, gate.metric)
        if not gate.beats(cand_value, cur_value):
            better = "lower" if gate.mode == "min" else "higher"
            return Promotion(False, f"refused: {name} v{version} {gate.metric}={cand_value:.6g} does not beat "
                                    f"{alias} v{current.version} {gate.metric}={cur_value:.6g} "
                                    f"({better} by more than {gate.margin:g} needed); use --force to override")
    with_retries(lambda: c.set_registered_model_alias(name, alias, str(version)), what="set alias")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    note = {f"lorapipe.promoted.{alias}.at": stamp, f"lorapipe.promoted.{alias}.by": who.audit_name}
    if force:
        note.update({f"lorapipe.forced.{alias}.by": who.audit_name, f"lorapipe.forced.{alias}.at": stamp,
                     f"lorapipe.forced.{alias}.reason": reason or "(no reason given)"})
    for k, v in note.items():
        with_retries(lambda: c.set_model_version_tag(name, str(version), k, v), what="tag version")
    was = f" (was v{current.version})" if current is not None else " (first promotion)"
    how = "forced" if force and current is not None else f"{gate.metric}={cand_value:.6g}"
    how += "" if gated else " (ungated alias)"
    return Promotion(True, f"{name}@{alias} -> v{version}{was}; {how}")
