"""Aliases on common ground: an alias moves to a version only when it beats the alias's holder on
the SAME suite (the registered model's gate suite), both evaluated (or read from cache) now.
Forced moves and rollbacks are explicit and recorded (who, when, why) as version tags."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from pipelines.core.errors import UserError
from pipelines.eval.gate import GateSuite, gate_suite, verdict
from pipelines.eval.suite import prepare_suite
from pipelines.registry.register import check_name
from pipelines.tracking.auth import authorize_alias_move
from pipelines.tracking.runs import client as mlflow_client
from pipelines.tracking.runs import reachable, with_retries


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
    rows: list[dict] = field(default_factory=list)  # candidate and holder on the gate suite
    reasons: list[str] = field(default_factory=list)


def version_on_suite(c, mv, gate: GateSuite, uri: str):
    """The version's result for the gate suite: its recorded one, else evaluated now (cached)."""
    from pipelines.eval.record import version_result
    from pipelines.eval.run import evaluate

    found = version_result(mv, gate.fingerprint)
    return found if found is not None else evaluate(f"models:/{mv.name}/{mv.version}", gate.suite, tracking_uri=uri)


def compare_on_gate(c, name: str, candidate, holder, uri: str) -> tuple[bool, list[dict], list[str]]:
    """(passes, rows, reasons) for candidate vs holder on the model's gate suite."""
    gate = gate_suite(c, name)
    if gate is None:
        raise UserError(f"{name} has no gate suite (registered before eval suites); set one with "
                        f"`lorapipe registry set-gate {name} --suite FILE`")
    now = prepare_suite(gate.suite).fingerprint
    if now != gate.fingerprint:
        raise UserError(f"{name}'s gate suite data changed since it was set (fingerprint {gate.fingerprint[:12]} "
                        f"recorded, {now[:12]} now): results from different suites are never compared; "
                        f"set it again with `lorapipe registry set-gate {name} --suite FILE`")
    cand, hold = version_on_suite(c, candidate, gate, uri), version_on_suite(c, holder, gate, uri)
    if cand.fingerprint != hold.fingerprint:
        raise UserError(f"refusing to compare results of different suites ({cand.fingerprint[:12]} vs {hold.fingerprint[:12]})")
    if cand.tokenizer != hold.tokenizer:
        raise UserError(f"{name} v{candidate.version} and v{holder.version} have bases with different tokenizers: "
                        "their suite metrics do not compare")
    ok, reasons = verdict(gate.suite, cand.metrics, hold.metrics)
    rows = [{"model": f"candidate v{candidate.version}", **cand.metrics},
            {"model": f"holder v{holder.version}", **hold.metrics}]
    return ok, rows, reasons


def alias_move(name: str, version: str, alias: str, tracking_uri: str):
    """(client, the version to move `alias` to, the identity allowed to move it, the alias's holder
    now). The permission is checked here, before any write; a refusal names what is missing."""
    reachable(tracking_uri)
    c = mlflow_client(tracking_uri)
    check_name(name)
    target = get_version(c, name, version)
    who = authorize_alias_move(tracking_uri, c, name, alias)
    return c, target, who, current_alias(c, name, alias)


def promote(name: str, version: str, alias: str = "champion", *, force: bool = False, reason: str = "",
            tracking_uri: str, gated: bool = True) -> Promotion:
    """Move `alias` to `version` if it beats the alias's holder on the model's gate suite.
    gated=False is for aliases that simply track the latest output (e.g. `candidate`)."""
    c, candidate, who, current = alias_move(name, version, alias, tracking_uri)
    if current is not None and current.version == candidate.version:
        return Promotion(True, f"{name}@{alias} is already version {version}")
    rows, reasons = [], []
    if current is not None and gated:
        ok, rows, reasons = compare_on_gate(c, name, candidate, current, tracking_uri)
        if not ok and not force:
            return Promotion(False, f"refused: {name} v{version} does not beat {alias} v{current.version} on the gate "
                                    f"suite ({'; '.join(reasons)}); use --force --reason to override", rows, reasons)
    move_alias(c, name, alias, str(version), "promoted", who.audit_name, force=force and current is not None,
               reason=reason)
    was = f" (was v{current.version})" if current is not None else " (first promotion)"
    how = "forced" if force and current is not None and reasons else ("gate passed" if rows else "no holder to beat")
    return Promotion(True, f"{name}@{alias} -> v{version}{was}; {how}" + ("" if gated else " (ungated alias)"), rows, reasons)


def move_alias(c, name: str, alias: str, version: str, action: str, by: str, *, force: bool = False,
               reason: str = "", extra: Optional[dict] = None) -> None:
    """Set the alias and stamp the version: lorapipe.<action>.<alias>.{at,by} (+ forced.* / extra);
    `by` is the identity the tracking server authenticated (tracking.auth)."""
    with_retries(lambda: c.set_registered_model_alias(name, alias, version), what="set alias")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    note = {f"lorapipe.{action}.{alias}.at": stamp, f"lorapipe.{action}.{alias}.by": by, **(extra or {})}
    if force:
        note.update({f"lorapipe.forced.{alias}.by": by, f"lorapipe.forced.{alias}.at": stamp,
                     f"lorapipe.forced.{alias}.reason": reason or "(no reason given)"})
    for k, v in note.items():
        with_retries(lambda: c.set_model_version_tag(name, version, k, v), what="tag version")


def rollback(name: str, alias: str, to_version: str, reason: str, *, tracking_uri: str) -> str:
    """Move `alias` back to a version that held it before (no gate: an explicit, audited decision).
    A version that never held the alias is refused: that is a promotion, and goes through the gate."""
    if not reason.strip():
        raise UserError("rollback needs --reason TEXT (it is recorded on the version)")
    c, target, who, current = alias_move(name, to_version, alias, tracking_uri)
    if current is None:
        raise UserError(f"{name}@{alias} has no holder: nothing to roll back (use promote)")
    if current.version == target.version:
        raise UserError(f"{name}@{alias} is already version {to_version}")
    if f"lorapipe.promoted.{alias}.at" not in target.tags:
        raise UserError(f"{name} v{to_version} never held {alias}; rollback only returns to an earlier holder "
                        "(use promote, which goes through the gate)")
    move_alias(c, name, alias, str(to_version), "rollback", who.audit_name, extra={
        f"lorapipe.rollback.{alias}.reason": reason, f"lorapipe.rollback.{alias}.from_version": str(current.version)})
    return f"{name}@{alias} -> v{to_version} (rolled back from v{current.version}: {reason})"
