"""MLflow registry: log a run directory's adapter and merged model, register both as versions,
and move aliases only when the gate metric says the new version is better.

Everything here reads only the run directory. The registry only ever sees complete artifacts:
the merge is finished and verified on local disk before anything is uploaded, and a version
is created only after its artifacts are logged.
"""
from __future__ import annotations

import getpass
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipelines.core.errors import UserError
from pipelines.core.secrets import redact_mapping
from pipelines.tracking.runs import client as mlflow_client
from pipelines.tracking.runs import start_run, with_retries
from pipelines.train.rundir import RunDir

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
GATE_TAGS = ("lorapipe.gate_metric", "lorapipe.gate_mode", "lorapipe.gate_margin")


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise UserError(f"registered model name {name!r} is not allowed: use letters, digits, '.', '_' or '-' "
                        "(starting with a letter or digit, at most 200 characters)")
    return name


def reachable(uri: str) -> None:
    """Fail with one line (after bounded retries) when the tracking server cannot be reached."""
    c = mlflow_client(uri)
    try:
        with_retries(lambda: c.search_experiments(max_results=1), attempts=3, what="MLflow server check")
    except Exception as e:
        raise UserError(f"MLflow at {redact_mapping({'u': uri})['u']} is unreachable "
                        f"({type(e).__name__}); nothing was registered") from None


def _run_exists(c, run_id: Optional[str]) -> bool:
    if not run_id:
        return False
    try:
        c.get_run(run_id)
        return True
    except Exception:
        return False


def lineage_tags(lineage: dict) -> dict[str, str]:
    keys = ("base_model", "base_model_sha256", "dataset_fingerprint", "lorapipe_version", "git_commit",
            "tune_trial_id", "seed")
    return {f"lorapipe.{k}": str(lineage.get(k)) for k in keys if lineage.get(k) is not None}


def metric_tags(metrics: dict, prefix: str = "lorapipe.metric.") -> dict[str, str]:
    return {f"{prefix}{k}": repr(float(v)) for k, v in metrics.items() if isinstance(v, (int, float))}


def _find_versions(c, name: str, digest: str) -> list:
    """Versions of `name` already registered from this exact adapter (idempotent register)."""
    from mlflow.exceptions import MlflowException

    try:
        found = c.search_model_versions(f"name='{name}'")
    except MlflowException:
        return []
    return [v for v in found if v.tags.get("lorapipe.adapter_sha256") == digest]


def _ensure_registered_model(c, name: str, description: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description=description)


@dataclass
class Registered:
    name: str
    adapter_version: str
    merged_version: str
    run_id: str
    created: bool


def register_run(run_dir: str | Path, name: Optional[str] = None, tracking_uri: Optional[str] = None) -> Registered:
    from pipelines.registry.merge import merge_run

    run = RunDir.open(run_dir)
    run.verify_digests()
    cfg, metrics, lineage = run.config(), run.metrics(), run.lineage()
    name = check_name(name or cfg.registry_name())
    uri = tracking_uri or cfg.tracking_uri()
    reachable(uri)
    c = mlflow_client(uri)
    digest = run.digest_of("adapter/adapter_model.safetensors")

    existing_a, existing_m = _find_versions(c, f"{name}-adapter", digest), _find_versions(c, f"{name}-merged", digest)
    if existing_a and existing_m:
        return Registered(name, existing_a[0].version, existing_m[0].version, existing_m[0].run_id, created=False)
    run_id = lineage.get("mlflow_run_id")
    if not _run_exists(c, run_id):
        run_id = start_run(uri, cfg.mlflow.experiment, run.path.name, cfg.model_dump(mode="json"),
                           {"lorapipe.registered_from": str(run.path)})

    with tempfile.TemporaryDirectory(prefix="lorapipe-merge-") as tmp:
        merged_dir = Path(tmp) / "merged"
        report = merge_run(run.path, merged_dir)  # complete and verified before any upload
        tags = {**lineage_tags(lineage), "lorapipe.run_dir": str(run.path), "lorapipe.adapter_sha256": digest}
        for k, v in tags.items():
            with_retries(lambda: c.set_tag(run_id, k, v), what="MLflow set_tag")
        with_retries(lambda: c.log_artifacts(run_id, str(run.adapter), "adapter"), what="upload adapter")
        with_retries(lambda: c.log_artifacts(run_id, str(merged_dir), "merged"), what="upload merged model")
        for f in ("config.yaml", "metrics.json", "lineage.json"):
            with_retries(lambda: c.log_artifact(run_id, str(run.path / f), "run"), what=f"upload {f}")
    artifact_uri = c.get_run(run_id).info.artifact_uri
    gate = {"lorapipe.gate_metric": cfg.registry.gate_metric, "lorapipe.gate_mode": cfg.registry.gate_mode,
            "lorapipe.gate_margin": repr(cfg.registry.margin)}
    parity = {"lorapipe.merge_method": report["method"],
              "lorapipe.merge_max_abs_logit_diff": repr(report.get("max_abs_logit_diff")),
              "lorapipe.merge_max_rel_logit_diff": repr(report.get("max_rel_logit_diff"))}
    version_tags = {**tags, **metric_tags(metrics), **gate, **parity}
    versions = {}
    for kind, desc in (("adapter", "PEFT LoRA adapter; load onto lorapipe.base_model"),
                       ("merged", "base + adapter merged (dequantize-then-merge for QLoRA)")):
        model_name = f"{name}-{kind}"
        with_retries(lambda: _ensure_registered_model(c, model_name, desc), what="create registered model")
        mv = with_retries(lambda: c.create_model_version(model_name, source=f"{artifact_uri}/{kind}", run_id=run_id,
                                                         tags={**version_tags, "lorapipe.kind": kind}),
                          what="create model version")
        versions[kind] = mv.version
    return Registered(name, versions["adapter"], versions["merged"], run_id, created=True)


# -- promotion -------------------------------------------------------------------------------
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
    note = {f"lorapipe.promoted.{alias}.at": stamp, f"lorapipe.promoted.{alias}.by": getpass.getuser()}
    if force:
        note.update({f"lorapipe.forced.{alias}.by": getpass.getuser(), f"lorapipe.forced.{alias}.at": stamp,
                     f"lorapipe.forced.{alias}.reason": reason or "(no reason given)"})
    for k, v in note.items():
        with_retries(lambda: c.set_model_version_tag(name, str(version), k, v), what="tag version")
    was = f" (was v{current.version})" if current is not None else " (first promotion)"
    how = "forced" if force and current is not None else f"{gate.metric}={cand_value:.6g}"
    how += "" if gated else " (ungated alias)"
    return Promotion(True, f"{name}@{alias} -> v{version}{was}; {how}")


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
